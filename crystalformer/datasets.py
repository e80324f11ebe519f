"""Featurise a stream of inputs into a dataset folder, serially or on Dask workers.

The driver reads inputs, cuts them into shard-sized chunks, and commits each finished shard
to the manifest. Workers parse, featurise and write their own shard, so only raw text goes
out and only a small outcome comes back. Every input ends as one row or one reject.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from crystalformer import conf
from crystalformer.featurize import FeaturizeSettings, featurize_chunk
from crystalformer.idindex import IdIndex
from crystalformer.records import RawInput, Reject
from crystalformer.shards import (
    DUPLICATE,
    MANIFEST,
    DatasetFolder,
    Manifest,
    ShardInfo,
    write_shard,
)
from crystalformer.sources import count_all, resolve_all
from crystalformer.sources.snapshots import registered_dataset

# A line for a person, e.g. a flow's logger.info: featurising says what it does through it.
Report = Callable[[str], None]
REPORT_EVERY = 10.0  # seconds between progress lines to a Report


@dataclass(frozen=True)
class FeaturizeSummary:
    out: Path
    accepted: int
    rejected: int
    skipped: int
    shards: int
    version: int
    seconds: float

    @property
    def nothing_read(self) -> bool:
        return self.accepted + self.skipped == 0

    def line(self) -> str:
        rate = (self.accepted + self.skipped) / max(self.seconds, 1e-9)
        return (
            f"{self.accepted} featurised, {self.skipped} unchanged (skipped), "
            f"{self.rejected} rejected, {self.shards} new shards in {self.seconds:.1f} s "
            f"({rate:.0f} crystals/s) -> {self.out} (dataset version {self.version})"
        )


@dataclass(frozen=True)
class ShardOutcome:
    shard: ShardInfo | None
    accepted: list[str]
    rejects: list[Reject]
    skipped: int


def featurize_to_shard(
    raws: list[RawInput],
    settings: FeaturizeSettings,
    known: dict[str, str],
    folder: str,
    name: str,
    targets: list[str],
    version: int,
) -> ShardOutcome:
    """One chunk in, one shard file out: the unit of work a Dask worker runs."""
    result = featurize_chunk(raws, settings, known)
    shard = None
    if result.rows:
        shard = write_shard(Path(folder), name, result.rows, targets, settings, version)
    accepted = [row.crystal.id for row in result.rows]
    return ShardOutcome(shard, accepted, result.rejects, len(result.skipped))


def dataset_folder(
    spec: str, root: Path, progress: bool = True, report: Report | None = None
) -> tuple[Path, str]:
    """(folder, name) of a featurised dataset folder, or of a registered dataset's folder
    under ROOT/datasets/ (featurised from its snapshot on first use, minutes for mp2018:
    `report` hears what it does and how far it got)."""
    path = Path(spec)
    if (path / MANIFEST).exists():
        return path, path.name
    if registered_dataset(spec) is None:
        raise FileNotFoundError(
            f"{spec!r} is neither a featurised dataset folder (no {MANIFEST}) nor a dataset "
            "in conf/datasets.yaml"
        )
    folder = root / "datasets" / spec
    if Manifest.load(folder) is None:
        featurize_sources([spec], folder, progress=progress, report=report)
    return folder, spec


def featurize_sources(
    sources: list[str],
    out: Path,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    shard_size: int | None = None,
    keep_cell: bool = False,
    r_cut: float | None = None,
    progress: bool = True,
    report: Report | None = None,
) -> FeaturizeSummary:
    """`featurize` as users call it: sources by name or path, settings from conf/. With a
    bar or a `report`, the inputs are counted first (0.55 s for mp2018's 29,708 rows) so
    that progress has a total."""
    settings_config = conf.featurize_config()
    overrides: dict = {"primitive": False} if keep_cell else {}
    if r_cut is not None:
        overrides["r_cut"] = r_cut
    settings_config = settings_config.model_copy(update=overrides)
    inputs, units = resolve_all(sources)
    total = count_all(sources) if progress or report else None
    with dask_client(workers, scheduler) as client:
        return featurize_inputs(
            inputs,
            out,
            settings_config.settings(conf.model_config()),
            units,
            shard_size=shard_size or settings_config.shard_size,
            client=client,
            progress=progress,
            total=total,
            report=report,
            label=", ".join(sources),
        )


def featurize_inputs(
    inputs: Iterable[RawInput | Reject],
    out: Path,
    settings: FeaturizeSettings,
    units: Mapping[str, str | None] | None = None,
    *,
    shard_size: int = 2000,
    client=None,
    progress: bool = True,
    total: int | None = None,
    report: Report | None = None,
    label: str = "inputs",
) -> FeaturizeSummary:
    """Featurise `inputs` into the dataset folder `out`, skipping what it already holds.

    Progress (a bar when `progress`; to `report`, "featurising <label> (N inputs) into
    <out>" and then progress lines) counts inputs done against `total`, the number of
    inputs when the caller knows it (sources.count_all).

    With a Dask `client` chunks run on its workers (which must see `out`); at most two
    chunks per worker are in flight, so memory stays flat however many inputs there are.
    """
    start = time.perf_counter()
    folder = DatasetFolder(out, settings, units or {})
    counts = {"accepted": 0, "rejected": 0, "skipped": 0, "shards": 0}
    bar = Progress("featurising", "input", total, progress, report)
    if report is not None:
        report(f"featurising {label} ({bar.count()}) into {out}")

    def commit(outcome: ShardOutcome, early_rejects: list[Reject]) -> None:
        rejects = early_rejects + outcome.rejects
        folder.commit(outcome.shard, outcome.accepted, rejects)
        counts["accepted"] += len(outcome.accepted)
        counts["rejected"] += len(rejects)
        counts["skipped"] += outcome.skipped
        counts["shards"] += outcome.shard is not None
        bar.update(len(outcome.accepted) + len(rejects) + outcome.skipped)
        # Arrow's allocator keeps what the reader freed for reuse; hand it back each shard,
        # so between shards the driver holds only what it uses.
        pa.default_memory_pool().release_unused()

    def submissions() -> Iterator[tuple[tuple, list[Reject]]]:
        for chunk in chunked(inputs, shard_size):
            raws, early = split_duplicates(chunk, folder.ids)
            for raw in raws:
                for name in raw.targets:
                    folder.manifest.targets.setdefault(name, None)
            known = folder.ids.keys(raw.id for raw in raws)
            name = folder.new_shard_name()
            args = (raws, settings, known, str(folder.path), name, folder.target_names)
            yield (*args, folder.manifest.version + 1), early

    try:
        if client is None:
            for args, early in submissions():
                commit(featurize_to_shard(*args), early)
        else:
            _run_on_dask(client, submissions(), commit)
        folder.finish()
    finally:
        bar.close()
        folder.close()
    return FeaturizeSummary(
        out=folder.path,
        version=folder.manifest.version,
        seconds=time.perf_counter() - start,
        **counts,
    )


class Progress:
    """How far a long stage got, for a person: a tqdm bar (with a total, and so an ETA, when
    the count is known) and a line to `report` every REPORT_EVERY seconds and at the end,
    e.g. 'featurising: 4000/27424 inputs done (15%) in 36 s, about 3.5 min left'."""

    def __init__(
        self, stage: str, unit: str, total: int | None, bar: bool, report: Report | None
    ) -> None:
        desc = stage if total is not None else f"{stage} (total unknown)"
        self.bar = tqdm(total=total, unit=unit, desc=desc, disable=not bar, mininterval=1.0)
        self.stage, self.unit, self.total, self.report, self.done = stage, unit, total, report, 0
        self.start = self.reported = time.perf_counter()

    def count(self) -> str:
        """'27424 inputs', or that the count is unknown."""
        return f"{self.unit} count unknown" if self.total is None else self._many(self.total)

    def _many(self, n: int) -> str:
        return f"{n} {self.unit}" if n == 1 else f"{n} {self.unit}s"

    def update(self, done: int = 1) -> None:
        self.bar.update(done)
        self.done += done
        if self.report is not None and time.perf_counter() - self.reported >= REPORT_EVERY:
            self.reported = time.perf_counter()
            self.report(self.line())

    def line(self) -> str:
        seconds = time.perf_counter() - self.start
        if self.total is None:
            return f"{self.stage}: {self._many(self.done)} done in {seconds:.0f} s (total unknown)"
        share = 100 * self.done / max(self.total, 1)
        done = f"{self.done}/{self._many(self.total)} done ({share:.0f}%)"
        if self.done >= self.total:
            return f"{self.stage}: {done} in {seconds:.0f} s"
        left = seconds * (self.total - self.done) / max(self.done, 1) / 60
        return f"{self.stage}: {done} in {seconds:.0f} s, about {left:.1f} min left"

    def close(self) -> None:
        self.bar.close()
        if self.report is not None:
            self.report(self.line())


# Times a chunk is sent to the cluster before a lost worker fails the run.
SEND_TRIES = 3


def _run_on_dask(client, submissions, commit) -> None:
    from distributed import as_completed

    window = 2 * max(1, len(client.scheduler_info().get("workers", {})))
    pending = as_completed()
    sent = {}  # future key -> (the task's arguments, the chunk's early rejects, tries)

    def send(args: tuple, early: list[Reject], tries: int = 1) -> None:
        # The chunk goes to a worker on its own, not inline in the task: the scheduler then
        # never unpickles it (it kept a copy of some, growing with the run). Scattered data
        # lives on that worker only, so Dask cannot rerun the task when the worker is lost:
        # the chunk is sent again (the scatter to a dying worker fails with an OSError; a
        # task whose input died with its worker is cancelled).
        raws, *rest = args
        try:
            [raws_on_worker] = client.scatter([raws], hash=False)
        except OSError:
            if tries >= SEND_TRIES:
                raise
            time.sleep(1.0)  # time for the scheduler to drop the dead worker
            send(args, early, tries + 1)
            return
        future = client.submit(featurize_to_shard, raws_on_worker, *rest, pure=False)
        sent[future.key] = (args, early, tries)
        pending.add(future)

    def receive(done) -> None:
        args, early, tries = sent.pop(done.key)
        try:
            outcome = done.result()
        except CancelledError:
            if tries >= SEND_TRIES:
                raise
            send(args, early, tries + 1)
        else:
            commit(outcome, early)

    for args, early in submissions:
        send(args, early)
        while pending.count() >= window:
            receive(next(pending))
    for done in pending:  # also the chunks sent again meanwhile
        receive(done)


def chunked(inputs: Iterable, size: int) -> Iterator[list]:
    """Lists of up to `size` items, lazily: memory stays flat for any number of inputs."""
    iterator = iter(inputs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def split_duplicates(
    chunk: list[RawInput | Reject], ids: IdIndex
) -> tuple[list[RawInput], list[Reject]]:
    """Raw inputs to featurise, and rejects: read failures and ids already read this run."""
    raws, rejects = [], []
    for item in chunk:
        if isinstance(item, Reject):
            rejects.append(item)
        elif (first := ids.first_read(item.id, item.origin)) is not None:
            reason = f"duplicate id: already read from {first}"
            rejects.append(Reject(item.id, item.source, DUPLICATE, reason, item.origin))
        else:
            raws.append(item)
    return raws, rejects


# glibc malloc settings for our Dask workers, read when each worker process starts. Dask's
# default (trim the heap above 64 KiB) also fixes the mmap threshold at 128 KiB, so every
# batch's large temporaries were fresh mmaps whose pages fault in on each use: the model ran
# 1.7x slower under it (841 vs 1,420 crystals/s, one model, 6,000 generated candidates).
# Keeping blocks up to 32 MiB (glibc's maximum) in a heap trimmed only above 1 GiB reuses
# them instead.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20, "MALLOC_TRIM_THRESHOLD_": 2**30}


@contextmanager
def _dask_logs_at(level: int, client_level: int) -> Iterator[None]:
    """Dask's loggers at these levels for a while (`distributed.client` has its own)."""
    loggers = {logging.getLogger("distributed"): level,
               logging.getLogger("distributed.client"): client_level}  # fmt: skip
    before = {logger: logger.level for logger in loggers}
    for logger, new_level in loggers.items():
        logger.setLevel(new_level)
    try:
        yield
    finally:
        for logger, old_level in before.items():
            logger.setLevel(old_level)


def _answers(address: str, timeout: float = 2.0) -> bool:
    """Whether the scheduler still takes connections: a client can fail on a connection the
    scheduler dropped before its status says it lost it."""
    from distributed.comm import get_address_host_port

    try:
        with socket.create_connection(get_address_host_port(address), timeout=timeout):
            return True
    except OSError:
        return False


class ClusterLost(RuntimeError):
    """The Dask scheduler went away during a run: the cluster failed, not the command."""


@contextmanager
def dask_client(workers: int = 1, scheduler: str | None = None):
    """A Dask client: an existing scheduler, a LocalCluster on 127.0.0.1, or None (serial)."""
    if scheduler is None and workers <= 1:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        client = Client(scheduler)
        try:
            # Like LocalCluster's silence_logs: a lost scheduler is told once, by ClusterLost,
            # not by Dask's connection logs (tracebacks at INFO among them).
            with _dask_logs_at(logging.ERROR, client_level=logging.CRITICAL):
                yield client
        except Exception as error:  # what surfaces varies: OSError, CancelledError, ...
            if client.status == "running" and _answers(scheduler):
                raise  # the run's own error (a full disk, a bad path), not the cluster's
            with _dask_logs_at(logging.CRITICAL + 1, client_level=logging.CRITICAL + 1):
                client.close()  # its reconnecting, cancelled, logs a traceback
            raise ClusterLost(
                f"lost the Dask scheduler at {scheduler} mid-run ({type(error).__name__}); "
                "the shards finished so far are kept: restart the cluster and run the same "
                "command again to resume"
            ) from error
        finally:
            client.close()
        return
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC}
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
