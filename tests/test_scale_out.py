"""Scale-out on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
127.0.0.1, started as docs/how-to/dask-cluster.md starts them (not a LocalCluster).

`crystalformer screen --scheduler` screens 400 MP crystals and a broken CIF with the shipped
formation-energy model, and one worker is SIGKILLed (nanny and worker: a lost machine) as
soon as the first feature shard, or the first result shard, is written. The run must finish
on the other worker with every candidate once in the ranking or the rejects, one complete
result shard per feature shard, and the very numbers of a single-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import BAD, SNAPSHOTS

from crystalformer.screen import screen
from crystalformer.screen_run import FEATURES, RANKED, RESULTS, ScreenOptions
from crystalformer.shards import REJECTS, Manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = ROOT / "models" / "formation_energy_per_atom"
PREDICTED = ["formation_energy_per_atom", "formation_energy_per_atom_std"]
# 41 shards of 10 (the broken CIF takes a place in a chunk): each stage runs for seconds
# after its first shard is written, so the kill lands mid-stage.
N_CANDIDATES = 400
SHARD_SIZE = 10
HOST = "127.0.0.1"
STARTUP_S = 120  # imports on a busy 2-core machine
# The how-to's settings for a worker, and one intra-op thread (what a Dask nanny gives its
# worker unless the environment says otherwise, set here so that it is not).
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own process group (a worker's nanny and worker die together)."""
    with log.open("w") as sink:
        return subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL if it is still there after 20 s; only while the
    group's leader is not reaped, so that the group id is still this process's."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue


def read_address(scheduler_file: Path, scheduler: subprocess.Popen) -> str:
    deadline = time.monotonic() + STARTUP_S
    while not scheduler_file.exists():
        assert scheduler.poll() is None, "dask scheduler exited: see scheduler.log"
        assert time.monotonic() < deadline, "dask scheduler wrote no scheduler file"
        time.sleep(0.1)
    time.sleep(0.1)  # written in one call: let it land
    return json.loads(scheduler_file.read_text())["address"]


def worker_count(address: str, wait_for: int | None = None) -> int:
    from distributed import Client

    with Client(address, timeout=STARTUP_S) as client:
        if wait_for is not None:
            client.wait_for_workers(wait_for, timeout=STARTUP_S)
        return len(client.scheduler_info()["workers"])


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """A scheduler and two one-thread workers, dashboards included, all on 127.0.0.1; every
    process group stopped afterwards, whatever happened."""
    dask = str(BIN / "dask")
    started: list[subprocess.Popen] = []
    try:
        scheduler_file = tmp_path / "scheduler.json"
        scheduler = start(
            [dask, "scheduler", "--host", HOST, "--port", "0", "--dashboard-address",
             f"{HOST}:0", "--scheduler-file", str(scheduler_file)],
            tmp_path / "scheduler.log",
        )  # fmt: skip
        started.append(scheduler)
        address = read_address(scheduler_file, scheduler)
        for k in range(2):
            started.append(
                start(
                    [
                        dask,
                        "worker",
                        address,
                        "--host",
                        HOST,
                        "--dashboard-address",
                        f"{HOST}:0",
                        "--nworkers",
                        "1",
                        "--nthreads",
                        "1",
                        "--local-directory",
                        str(tmp_path / f"worker-{k}"),
                    ],
                    tmp_path / f"worker-{k}.log",
                    WORKER_ENV,
                )  # fmt: skip
            )
        assert worker_count(address, wait_for=2) == 2
        yield Cluster(address, scheduler, started[1:])
    finally:
        for process in reversed(started):
            stop(process)


def listening_hosts(processes: list[subprocess.Popen]) -> set[str]:
    """The addresses the processes and their children listen on."""
    pids = set()
    for process in processes:
        parent = psutil.Process(process.pid)
        pids |= {parent.pid, *(child.pid for child in parent.children(recursive=True))}
    return {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.pid in pids and c.status == psutil.CONN_LISTEN
    }


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> tuple[Path, list[str]]:
    """400 MP crystals as a CSV of CIFs, with a broken CIF (atoms too close) among them."""
    frame = pd.read_csv(SNAPSHOTS / "mp2018_cgcnn" / "val.csv.gz", nrows=N_CANDIDATES)
    broken = pd.DataFrame(
        {"material_id": ["close_atoms"], "cif": [(BAD / "close_atoms.cif").read_text()]}
    )
    frame = pd.concat([frame.iloc[:200], broken, frame.iloc[200:]])[["material_id", "cif"]]
    path = tmp_path_factory.mktemp("candidates") / "candidates.csv"
    frame.to_csv(path, index=False)
    return path, frame["material_id"].tolist()


@pytest.fixture(scope="module")
def one_process(candidates, tmp_path_factory, one_torch_thread) -> pd.DataFrame:
    """The ranking of the same candidates screened in this process, on one thread."""
    out = tmp_path_factory.mktemp("one-process")
    screen(ScreenOptions(
        [str(candidates[0])], [str(MODEL)], out, shard_size=SHARD_SIZE, device="cpu",
        compiled=False, progress=False,
    ))  # fmt: skip
    return pd.read_parquet(out / RANKED).set_index("id").sort_index()


def shards_in(folder: Path) -> list[Path]:
    """Written feature or result shards (write_atomic's temporaries are hidden .tmp files)."""
    return sorted(folder.glob("*shard-*.parquet"))


@pytest.mark.parametrize("stage", [FEATURES, RESULTS])
def test_losing_a_worker_mid_stage_screens_every_candidate_once_as_one_process_does(
    stage, cluster, candidates, one_process, tmp_path
):
    table, ids = candidates
    assert listening_hosts([cluster.scheduler, *cluster.workers]) == {HOST}

    out, log = tmp_path / "cluster-run", tmp_path / "cluster-run.log"
    run = start(
        [str(BIN / "crystalformer"), "screen", str(table), "--models", str(MODEL),
         "--out", str(out), "--shard-size", str(SHARD_SIZE), "--device", "cpu",
         "--no-compile", "--quiet", "--scheduler", cluster.address],
        log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not shards_in(out / stage) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(cluster.workers[0].pid, signal.SIGKILL)
        cluster.workers[0].wait()
        done_at_kill = len(shards_in(out / stage))
        assert run.poll() is None and not (out / RANKED).exists(), (
            f"the run ended before the worker was killed ({done_at_kill} {stage} shards): "
            f"give it more candidates. Its log:\n{log.read_text()}"
        )
        assert done_at_kill >= 1, f"no {stage} shard within 300 s:\n{log.read_text()}"
        assert run.wait(timeout=300) == 0, log.read_text()
    finally:
        stop(run)
    assert worker_count(cluster.address) == 1  # the scheduler saw the worker go

    manifest = Manifest.load(out / FEATURES)
    assert done_at_kill < len(manifest.shards)
    assert [p.name for p in shards_in(out / FEATURES)] == sorted(s.file for s in manifest.shards)
    results = shards_in(out / RESULTS)
    assert len(results) == len(manifest.shards)  # one per feature shard, none twice
    assert not [p.name for p in (out / RESULTS).iterdir() if not p.name.startswith(".")
                and p not in results]  # fmt: skip
    rejects = pq.read_table(out / FEATURES / REJECTS).to_pandas()
    assert rejects["id"].tolist() == ["close_atoms"]
    ranked = pd.read_parquet(out / RANKED)
    for screened in (pd.concat([pq.read_table(p).to_pandas() for p in results]), ranked):
        assert sorted([*screened["id"], *rejects["id"]]) == sorted(ids)

    # The same shards, so the same batches, on one thread each: the very same floats.
    ranked = ranked.set_index("id").sort_index()
    for column in PREDICTED:
        np.testing.assert_array_equal(ranked[column], one_process[column])
    pd.testing.assert_frame_equal(ranked, one_process)


def finished(out: Path, stage: str) -> set[str]:
    """The shards a run has finished: feature shards its manifest lists (one a worker wrote
    but the main process never heard of is written again), every result shard."""
    if stage == RESULTS:
        return {p.name for p in shards_in(out / RESULTS)}
    manifest = Manifest.load(out / FEATURES) if (out / FEATURES).is_dir() else None
    return {shard.file for shard in manifest.shards} if manifest is not None else set()


@pytest.mark.parametrize("stage", [FEATURES, RESULTS])
def test_losing_the_scheduler_mid_run_ends_in_one_line_and_a_rerun_resumes(
    stage, cluster, candidates, one_process, tmp_path
):
    """The scheduler SIGKILLed at the first feature, or result, shard: exit code 3 and one
    line saying the cluster was lost, no traceback; the same command without the cluster
    then finishes the run from the shards already written, with the numbers of a
    single-process run."""
    table, ids = candidates
    out, log = tmp_path / "cluster-run", tmp_path / "cluster-run.log"
    command = [
        str(BIN / "crystalformer"), "screen", str(table), "--models", str(MODEL), "--out",
        str(out), "--shard-size", str(SHARD_SIZE), "--device", "cpu", "--no-compile", "--quiet",
    ]  # fmt: skip
    run = start([*command, "--scheduler", cluster.address], log)
    try:
        deadline = time.monotonic() + 300
        while not finished(out, stage) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert run.poll() is None, f"the run ended first:\n{log.read_text()}"
        os.killpg(cluster.scheduler.pid, signal.SIGKILL)
        cluster.scheduler.wait()
        assert run.wait(timeout=300) == 3, log.read_text()
    finally:
        stop(run)
    text = log.read_text()
    assert "Traceback" not in text, text
    failure = [line for line in text.splitlines() if line.startswith("cluster failure:")]
    assert len(failure) == 1 and "lost the Dask scheduler" in failure[0], text
    written = finished(out, stage)
    assert written and not (out / RANKED).exists()

    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the workers and one_process
    rerun = subprocess.run(
        [*command, "--workers", "1"], capture_output=True, text=True, cwd=ROOT, env=one_thread
    )
    assert rerun.returncode == 0, rerun.stderr
    assert written <= finished(out, stage)  # kept, not redone
    ranked = pd.read_parquet(out / RANKED).set_index("id").sort_index()
    rejects = pq.read_table(out / FEATURES / REJECTS).to_pandas()
    assert sorted([*ranked.index, *rejects["id"]]) == sorted(ids)
    pd.testing.assert_frame_equal(ranked, one_process)
