"""Screening: stream candidates through every property model, one shard at a time.

Candidates are featurised into OUT/features (a dataset folder: incremental, every id once in
a shard or in its rejects), then each feature shard becomes one result shard under
OUT/results, written atomically; a result shard that exists is not recomputed, so a killed
run started again with the same arguments finishes the rest and nothing twice. Several
models of one property form an ensemble: the result holds their mean, their spread and
their count. Filters, ranking and the Pareto front (crystalformer/ranking.py) stream the
result shards in bounded memory into ranked.parquet. No Prefect import here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crystalformer import conf, expressions
from crystalformer.datasets import (
    SEND_TRIES,
    Progress,
    Report,
    dask_client,
    featurize_inputs,
)
from crystalformer.model.base import PropertyModel
from crystalformer.predict import predict_table
from crystalformer.ranking import pareto_front as pareto_front  # public here before ranking.py
from crystalformer.ranking import rank as rank
from crystalformer.ranking import write_ranked
from crystalformer.report import write_report
from crystalformer.screen_run import (
    FEATURES,
    MAX_IMAGES_PER_BATCH,
    RANKED,
    REPORT,
    RESULTS,
    RUN_FILE,
    STD_SUFFIX,
    Ranking,
    ScreenOptions,
    default_ranking,
)
from crystalformer.shards import SHARD_STEM, Manifest, sha256_of, write_atomic
from crystalformer.sources import count_all, resolve_all
from crystalformer.tracking import download_model
from crystalformer.train import MODEL_WEIGHTS, SPLIT_FILE, load_model
from crystalformer.version import __version__

# Result shards as result_name writes them (folder tag, feature shard, its hash, the models'
# tag; results of older versions lack the last), and write_atomic's temporaries of them.
_RESULT = rf"[0-9a-f]{{8}}-{SHARD_STEM}-[0-9a-f]{{12}}(-[0-9a-f]{{12}})?\.parquet"
RESULT_FILE = re.compile(rf"{_RESULT}|\.{_RESULT}\.\d+\.tmp")
CARRIED = ["id", "source", "formula", "n_atoms", "structure_hash"]


@dataclass(frozen=True)
class ScreenModel:
    """A trained model as screening sees it: where it came from, what it predicts, and the
    structure hashes of its training crystals (for the leakage flag)."""

    uri: str
    folder: Path
    targets: tuple[str, ...]
    weights_sha256: str  # what the model is, whatever its URI points at today
    training_crystals: int  # in its split.parquet's train part (0 without one)
    units: dict[str, str | None] = field(default_factory=dict)  # target -> unit, from its card


def describe_model(uri: str, folder: Path) -> ScreenModel:
    """Targets, weights hash, units and training-set size of a model folder."""
    _, card = load_model(folder)
    weights = sha256_of(Path(folder) / MODEL_WEIGHTS)
    trained_on = len(training_hashes(str(folder), weights))
    units = dict(card.get("units", {}))
    return ScreenModel(uri, Path(folder), tuple(card["targets"]), weights, trained_on, units)


@functools.lru_cache(maxsize=32)
def training_hashes(folder: str, weights_sha256: str) -> frozenset[str]:
    """Structure hashes of a model's training crystals (its split.parquet, when present),
    read once per process: a screening task carries the folder, not the set (about 1 MB for
    mp2018's 27,000 crystals). The weights hash keys the cache to what the folder holds."""
    split_path = Path(folder) / SPLIT_FILE
    if not split_path.exists():
        return frozenset()
    split = pq.read_table(split_path, columns=["structure_hash", "split"])
    train = split.filter(pc.equal(split["split"], "train"))
    return frozenset(train["structure_hash"].to_pylist())


def model_set_tag(models: Sequence[ScreenModel]) -> str:
    """Names the models behind a result shard: another model set (an alias moved, other
    --models) gives other names, so no result is ever reused under a model that did not
    make it."""
    return hashlib.sha256(" ".join(m.weights_sha256 for m in models).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=32)
def _loaded(folder: str, device: str | None, compiled: bool) -> PropertyModel:
    """One copy of each model per process (Dask workers load their own), prepared on
    conf/runtime.yaml's runtime with this run's device and kernels."""
    model, _ = load_model(Path(folder))
    runtime = conf.runtime_config().with_options(device=device, compiled=compiled)
    return runtime.prepare(model).eval()


def ensemble_columns(
    predictions: dict[str, list[np.ndarray]], n_rows: int
) -> dict[str, np.ndarray]:
    """Per property: mean over its models, their spread (std, NaN for one model), count."""
    columns = {}
    for target, values in predictions.items():
        stacked = np.stack(values) if values else np.full((1, n_rows), np.nan)
        columns[target] = stacked.mean(axis=0)
        columns[f"{target}{STD_SUFFIX}"] = (
            stacked.std(axis=0, ddof=1) if len(values) > 1 else np.full(n_rows, np.nan)
        )
        columns[f"{target}_n_models"] = np.full(n_rows, len(values), np.int16)
    return columns


def screen_shard(
    shard: str,
    models: Sequence[ScreenModel],
    out: str,
    device: str | None = None,
    compiled: bool = False,
    max_images: int = MAX_IMAGES_PER_BATCH,
) -> int:
    """One feature shard in, one result shard out (atomically); returns its row count.

    The unit of work a Dask worker runs: only paths travel, the worker reads its own shard
    and loads its own models, one row group at a time (a row group holds a bounded number
    of images, so the worker's memory does not depend on how big the shard's crystals are).
    """
    parquet = pq.ParquetFile(shard)
    training = frozenset().union(
        *(training_hashes(str(m.folder), m.weights_sha256) for m in models)
    )
    parts = [
        _screen_table(parquet.read_row_group(k), models, training, device, compiled, max_images)
        for k in range(parquet.num_row_groups)
    ]
    result = pa.concat_tables(parts)
    write_atomic(Path(out), lambda tmp: pq.write_table(result, tmp, compression="zstd"))
    return result.num_rows


def _screen_table(
    table: pa.Table,
    models: Sequence[ScreenModel],
    training: frozenset[str],
    device: str | None,
    compiled: bool,
    max_images: int,
) -> pa.Table:
    """Result rows of featurised crystals: carried columns, labels, ensembles, leakage flag."""
    predictions: dict[str, list[np.ndarray]] = {}
    for described in models:
        model = _loaded(str(described.folder), device, compiled)
        values = predict_table(model, table, max_images)
        for k, target in enumerate(described.targets):
            predictions.setdefault(target, []).append(values[:, k])
    labels = [name for name in table.schema.names if name in _label_columns(table)]
    columns = {name: table[name] for name in CARRIED}
    columns.update({f"input_{name}": table[name] for name in labels})
    columns.update(ensemble_columns(predictions, table.num_rows))
    hashes = table["structure_hash"].to_pylist()
    columns["in_training"] = pa.array([h in training for h in hashes], pa.bool_())
    return pa.table(columns)


def _label_columns(table: pa.Table) -> list[str]:
    """The shard's target columns (labels or numbers the candidates came with)."""
    return json.loads((table.schema.metadata or {}).get(b"targets", b"[]"))


@dataclass(frozen=True)
class ScreenSummary:
    out: Path
    screened: int
    passed_filter: int
    rejected: int
    shards_done: int
    shards_skipped: int
    seconds: float
    ranking: Ranking

    def line(self) -> str:
        rate = self.screened / max(self.seconds, 1e-9)
        return (
            f"{self.screened} screened ({self.passed_filter} pass the filter), "
            f"{self.rejected} rejected; {self.shards_done} result "
            f"shards written, {self.shards_skipped} already done; {self.seconds:.1f} s "
            f"({rate:.0f} crystals/s) -> {self.out}"
        )


def result_name(shard: Path, models: Sequence[ScreenModel]) -> str:
    """A result shard is named after its feature shard's content and the models that screen
    it, so a changed shard or a changed model set is redone."""
    return f"{shard.stem}-{sha256_of(shard)[:12]}-{model_set_tag(models)}.parquet"


def predict_folders(
    feature_folders: Sequence[Path],
    models: Sequence[ScreenModel],
    options: ScreenOptions,
    client=None,
    report: Report | None = None,
) -> tuple[list[Path], int]:
    """Result shards for every shard of the feature folders under `options.out`: (their
    paths, how many were already there). Progress: a bar, and lines to `report`.

    Result shards this project wrote for feature shards or models that are no longer the
    run's are removed (nothing else in OUT/results is touched), so the results hold each
    featurised crystal once, predicted by these models.
    """
    results = Path(options.out) / RESULTS
    results.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, Path] = {}
    for folder in feature_folders:
        manifest = Manifest.load(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder}: not a featurised dataset (no manifest.json)")
        for shard in manifest.shards:
            path = folder / shard.file
            wanted[path] = results / f"{_folder_tag(folder)}-{result_name(path, models)}"
    written_here = {p for p in results.iterdir() if RESULT_FILE.fullmatch(p.name)}
    for stale in written_here - set(wanted.values()):
        stale.unlink()
    todo = {shard: target for shard, target in wanted.items() if not target.exists()}
    bar = Progress("screening", "shard", len(todo), options.progress, report)
    if report is not None:
        done = len(wanted) - len(todo)
        report(f"screening {bar.count()} with {len(models)} models ({done} already done)")
    run = (options.device, options.compiled, options.max_images)
    if client is None:
        for shard, target in todo.items():
            screen_shard(str(shard), models, str(target), *run)
            bar.update()
    else:
        from distributed import as_completed

        sent = {}  # future key -> (shard, target, tries)
        pending = as_completed()

        def send(shard: Path, target: Path, tries: int = 1) -> None:
            future = client.submit(screen_shard, str(shard), list(models), str(target), *run,
                                   pure=False)  # fmt: skip
            sent[future.key] = (shard, target, tries)
            pending.add(future)

        for shard, target in todo.items():
            send(shard, target)
        for future in pending:
            shard, target, tries = sent.pop(future.key)
            try:
                future.result()
            except (OSError, CancelledError):
                # the result's worker died while handing it over: the shard is done if its
                # file is there (written atomically), else sent again, SEND_TRIES at most
                if not target.exists():
                    if tries >= SEND_TRIES:
                        raise
                    send(shard, target, tries + 1)
                    continue
            bar.update()
    bar.close()
    return list(wanted.values()), len(wanted) - len(todo)


def _folder_tag(folder: Path) -> str:
    """Distinguishes result shards of different feature folders with equal shard names."""
    return hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]


# --- the whole run ------------------------------------------------------------------------------


def screen(options: ScreenOptions, report: Report | None = None) -> ScreenSummary:
    """`crystalformer screen` and the `screen` flow: featurise, predict, rank, report.
    `report` (a flow's logger) hears each stage and how far it got.

    Candidates are anything `featurize` reads, or featurised dataset folders (used as they
    are when their r_cut suffices). Re-running with the same options skips the crystals and
    result shards already done.
    """
    started = time.perf_counter()
    for text, what in ((options.filter_expr, "filter"), (options.rank_by, "rank-by")):
        if text:
            expressions.parse(text, what)  # refused before any work, not after screening
    out = Path(options.out)
    _refuse_foreign_out(out)
    out.mkdir(parents=True, exist_ok=True)
    models = [describe_model(uri, download_model(uri, options.root)) for uri in options.models]
    if not models:
        raise ValueError("screening needs at least one model")
    widest = max((load_model(m.folder)[0].config for m in models), key=lambda c: c.r_cut)
    ready = [Path(c) for c in options.candidates if Manifest.load(Path(c)) is not None]
    for folder in ready:
        if Manifest.load(folder).r_cut < widest.r_cut:
            raise ValueError(
                f"{folder} was featurised with r_cut {Manifest.load(folder).r_cut:.4g} Å; the "
                f"models need {widest.r_cut:.4g} Å: pass its original inputs instead"
            )
    raw_specs = [c for c in options.candidates if Path(c) not in ready]
    settings_config = conf.featurize_config()
    folders = list(ready)
    with dask_client(options.workers, options.scheduler) as client:
        if raw_specs:
            inputs, units = resolve_all(raw_specs)
            featurize_inputs(
                inputs,
                out / FEATURES,
                settings_config.settings(widest),
                units,
                shard_size=options.shard_size or settings_config.shard_size,
                client=client,
                progress=options.progress,
                total=count_all(raw_specs) if options.progress or report else None,
                report=report,
                label=", ".join(raw_specs),
            )
            folders.append(out / FEATURES)
        results, skipped = predict_folders(folders, models, options, client, report)
    ranking = default_ranking(options.rank_by, [t for m in models for t in m.targets])
    ranked = write_ranked(
        results,
        out / RANKED,
        filter_expr=options.filter_expr,
        rank_by=ranking.rank_by,
        tie_break=ranking.tie_break,
        pareto=options.pareto,
        top=options.top,
    )
    summary = ScreenSummary(
        out=out,
        screened=ranked.rows,
        passed_filter=ranked.passed,
        rejected=count_rejects(folders),
        shards_done=len(results) - skipped,
        shards_skipped=skipped,
        seconds=time.perf_counter() - started,
        ranking=ranking,
    )
    metadata = run_metadata(options, models, summary)
    (out / RUN_FILE).write_text(json.dumps(metadata, indent=1))
    write_report(ranked.sample, metadata, out, top=options.top)  # histograms: of the sample
    return summary


def run_metadata(
    options: ScreenOptions, models: Sequence[ScreenModel], summary: ScreenSummary
) -> dict:
    """What screen.json and the report say about a run: inputs, the models by their weights,
    the ranking options (`rank_by` as given; `ranking` as applied) and the counts."""
    return {
        "candidates": list(options.candidates),
        "models": [
            {
                "uri": m.uri,
                "targets": list(m.targets),
                "units": m.units,
                "weights_sha256": m.weights_sha256,
                "training_crystals": m.training_crystals,
            }
            for m in models
        ],
        "filter": options.filter_expr,
        "rank_by": options.rank_by,
        "pareto": options.pareto,
        "top": options.top,
        "compiled_kernels": options.compiled,
        "library_version": __version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        **{k: v for k, v in asdict(summary).items() if k != "out"},
    }


def _refuse_foreign_out(out: Path) -> None:
    """OUT is new, empty or an earlier screening run's: never overwrite a user's files."""
    if out.is_file():
        raise ValueError(f"--out {out} is a file: give a folder")
    ours = {FEATURES, RESULTS, RANKED, RUN_FILE, REPORT}
    if out.is_dir() and any(out.iterdir()) and not ours & {p.name for p in out.iterdir()}:
        raise ValueError(
            f"--out {out} is not empty and is not a screening run's folder: choose an empty "
            "or new folder"
        )


def count_rejects(folders: Sequence[Path]) -> int:
    """The feature folders' rejects, as their manifests count them."""
    return sum(Manifest.load(Path(folder)).rejects for folder in folders)
