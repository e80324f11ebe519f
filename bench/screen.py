"""Screening throughput, memory and where the time goes, end to end, as a user runs it
(`crystalformer screen`).

    .venv/bin/python bench/screen.py [--workers 2] [--sizes 10000,100000]
                                     [--cif-size 10000] [--models URI,URI] [--no-compile]
                                     [--from-dataset NAME] [--threshold T] [--pool N]
                                     [--rss-every S] [--keep-work] [--out FILE]

Candidates come from `crystalformer generate`, up to --pool of them (default: the largest
size); each smaller size is a seeded random sample of that set (in its order), so runs of
different sizes screen the same kind of crystals and their memory can be compared. The
generated set is written once into var/bench/ and reused while the generator's code
(crystalformer/sources/candidates.py, structures.py, conf/generate.yaml) and pymatgen are
unchanged; how long generating it took is recorded (`generation`), never counted in a case.

- AFLOW prototypes (the default): pymatgen's prototypes × substitutions at threshold 1e-6;
  two property models (e_above_hull and band_gap) with the paper's architecture, given with
  --models or trained for one epoch on 200 MP-20 crystals into a temporary data root
  (untimed; their accuracy does not matter here, their cost does); a CIF case at
  --cif-size (10,000); RSS sampled every 0.1 s; written to bench/results/screen.json.
- Known crystals (`--from-dataset mp2018`, issue 18.3): `generate --from mp2018` at
  threshold 1e-4 (substitutions into the dataset's crystals); the three shipped models
  (models/formation_energy_per_atom, models/e_above_hull, models/log10_bulk_modulus_vrh)
  unless --models; no CIF case unless --cif-size; RSS sampled every 0.5 s; written to
  bench/results/screen-scale.json, with a `scale` section comparing the largest size with
  the smallest (crystals/s against issue 18.3's 280, RSS ratios against its 1.15).

Cases, each a fresh `crystalformer screen ... --workers W` process (this script run with a
hidden --timed flag: the same command, its stages timed), timed from start to exit:

    startup      10 candidates: what a process costs before its first crystal (torch,
                 Dask workers, models, kernel compilation)
    N            N generated candidates as a Parquet table of structure JSON, end to end
                 (featurisation, prediction, ranking, report)
    cif-N        the same crystals as the N case (N from --cif-size) as a CSV table of CIF
                 text (written by pymatgen, untimed)
    shards-N     N again, from the feature folder the N case wrote (no parsing or image
                 enumeration: prediction, ranking and the report)

Memory: the peak of the summed RSS of the process and its children (Dask workers), the peak
and median of the process alone, the peak of its largest child and the largest median of a
child that lived through the run (a worker), sampled every --rss-every seconds. Each size's
run folders (about 1 GB for a million crystals from mp2018: 454 MB of feature shards at
442,000) are removed after its cases unless --keep-work. All with `--compile`
(torch.compile'd kernels, the screen default) unless --no-compile. Startup is paid once per
process, so small runs understate the steady rate; the table says how long each process
lived. The report is rewritten after each case, so a run stopped at the largest size keeps
the smaller ones.

Where the time goes (`profile` of each case, the second table), in wall seconds, in order:
`before` (from the process's start to starting the Dask workers: interpreter, imports,
reading the models), the stages of `crystalformer.screen.screen` (starting the workers,
featurisation, the workers importing the prediction code, prediction, stopping the workers,
ranking, the report), `exit` (after the command returned) and `other` (the rest: screen.json,
counting rejects). Per model: the seconds inside its `predict_table` calls summed over the
workers (`worker_seconds`; `ms_per_crystal` on one worker's core; the first model's include
each worker's kernel compilation, a few seconds) and divided by the number of workers
(`seconds`, the table's column: its share of the prediction stage when the workers are busy
together); `predict_other_s` is the rest of that stage (reading shards, writing results,
waiting for the last shard). The timers wrap those functions in the command's process and,
through `Client.run`, in each worker; they change nothing else, except that the workers
import the prediction code (torch) just before prediction rather than in their first
prediction task: its own stage, `import_in_workers`.

Issue 18.3's runs, on a quiet machine (nothing else running; generating the 1,000,000 takes
about 3.5 min, once):

    .venv/bin/python bench/screen.py --from-dataset mp2018 --workers 2 \\
        --sizes 100000,1000000

or one size at a time, from the same generated million (the 100,000 a sample of it; the
`scale` section then has to be worked out from the two reports by hand):

    .venv/bin/python bench/screen.py --from-dataset mp2018 --workers 2 --sizes 100000 \\
        --pool 1000000 --out bench/results/screen-scale-100000.json
    .venv/bin/python bench/screen.py --from-dataset mp2018 --workers 2 --sizes 1000000 \\
        --out bench/results/screen-scale-1000000.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness import (  # bench/harness.py (only light imports: Dask workers import this file)
    RESULTS,
    ROOT,
    Column,
    Session,
    communicate_sampling_rss,
    print_table,
    write_json,
)

CLI = str(Path(sys.executable).with_name("crystalformer"))
CACHE = ROOT / "var" / "bench"  # generated candidates, kept between runs (outside git)
# What the generated candidates depend on: a change to one of these generates them again.
GENERATOR_FILES = (
    "crystalformer/sources/candidates.py",
    "crystalformer/structures.py",
    "conf/generate.yaml",
)
SHIPPED_MODELS = (
    "models/formation_energy_per_atom",
    "models/e_above_hull",
    "models/log10_bulk_modulus_vrh",
)
SCALE_RATE = 280  # crystals/s: issue 18.3's goal, a million in under 60 minutes
SCALE_RSS = 1.15  # issue 18.3: RSS at a million within 15% of RSS at 100,000


@dataclass(frozen=True)
class Candidates:
    """Where a run's candidates come from, and the defaults that go with them."""

    dataset: str | None  # `generate --from` this dataset; None: the AFLOW prototypes
    threshold: float  # least substitution probability
    cif_size: int | None  # the size with a CIF case (None: none)
    rss_every: float  # seconds between RSS samples
    out: Path


PROTOTYPES = Candidates(None, 1e-6, 10_000, 0.1, RESULTS / "screen.json")
KNOWN_CRYSTALS = Candidates("mp2018", 1e-4, None, 0.5, RESULTS / "screen-scale.json")


def main() -> None:
    if sys.argv[1:2] == ["--timed"]:
        timed_screen(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--models", default=None, help="model URIs, comma-separated")
    parser.add_argument("--cif-size", type=int, default=None, help="one of --sizes")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--from-dataset", default=None, help="e.g. mp2018 (default: AFLOW)")
    parser.add_argument("--threshold", type=float, default=None, help="generate's threshold")
    parser.add_argument("--pool", type=int, default=None, help="candidates to sample from")
    parser.add_argument("--rss-every", type=float, default=None, help="seconds")
    parser.add_argument("--keep-work", action="store_true", help="keep the run folders")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    mode = PROTOTYPES
    if args.from_dataset:
        mode = replace(KNOWN_CRYSTALS, dataset=args.from_dataset)
    given = {"threshold": args.threshold, "cif_size": args.cif_size,
             "rss_every": args.rss_every, "out": args.out}  # fmt: skip
    mode = replace(mode, **{key: value for key, value in given.items() if value is not None})
    sizes = [int(size) for size in args.sizes.split(",")]
    pool_size = args.pool or max(sizes)
    if mode.cif_size is not None and mode.cif_size not in sizes:
        parser.error(f"--cif-size {mode.cif_size} is not one of --sizes {args.sizes}")
    if pool_size < max(sizes):
        parser.error(f"--pool {pool_size} is smaller than the largest size {max(sizes)}")

    session = Session("screen.py")
    work = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    env = {**os.environ, "CRYSTALFORMER_DATA_ROOT": str(work / "root")}
    env.pop("MLFLOW_TRACKING_URI", None)
    if args.models:
        models = args.models.split(",")
    elif mode.dataset:
        models = [str(ROOT / folder) for folder in SHIPPED_MODELS]
    else:
        models = train_models(env)
    print(f"models: {models}; {args.workers} workers; work folder {work}")
    pool, generation = candidate_pool(mode, pool_size, env)
    print(f"candidates: {generation['summary']} ({generation['seconds']} s to generate)")

    report = {
        **session.header({"platform": platform.platform(), "cpus": os.cpu_count()}),
        "candidates": {"dataset": mode.dataset, "threshold": mode.threshold},
        "generation": generation,
        "models": models,
        "workers": args.workers,
        "rss_every_s": mode.rss_every,
        "cases": [],
    }

    def run(name: str, sources: list[Path], out: Path) -> None:
        report["cases"].append(run_case(name, sources, models, out, args, env, mode.rss_every))
        write_json(mode.out, report)

    run("startup", [first_rows(pool, 10, work / "candidates-startup.parquet")], work / "startup")
    for size in sizes:
        folder = work / f"size-{size}"
        folder.mkdir()
        table = pool if size == pool_size else folder / "candidates.parquet"
        if table != pool:
            sample_rows(pool, size, table)
        run(str(size), [table], folder / "screen")
        if size == mode.cif_size:
            to_cif_table(table, folder / "candidates-cif.csv")
            run(f"cif-{size}", [folder / "candidates-cif.csv"], folder / "screen-cif")
        run(f"shards-{size}", [folder / "screen" / "features"], folder / "shards")
        if not args.keep_work:
            shutil.rmtree(folder)

    print()
    print_table(TABLE, report["cases"])
    print("\nwhere the time goes (wall seconds; per model: its share of the prediction stage)")
    print_table(profile_columns(report["cases"]), report["cases"])
    if mode.dataset and len(sizes) > 1:
        report["scale"] = scale(report["cases"], min(sizes), max(sizes))
        print(f"\nscale: {json.dumps(report['scale'])}")
    session.write(mode.out, report)
    if not args.keep_work:
        shutil.rmtree(work)


def train_models(env: dict) -> list[str]:
    """Two briefly trained models (e_above_hull, band_gap) on the bundled MP-20 subset."""
    uris = []
    for target in ("e_above_hull", "band_gap"):
        done = subprocess.run(
            [CLI, "train", "--data", "mp20_biternary", "--target", target, "--epochs", "1",
             "--max-crystals", "200", "--quiet"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        run_id = done.stdout.strip().split("MLflow run ")[-1].split()[0]
        uris.append(f"runs:/{run_id}")
    return uris


# --- candidates ---------------------------------------------------------------------------------


def candidate_pool(mode: Candidates, size: int, env: dict) -> tuple[Path, dict]:
    """The generator's first `size` candidates and how they were made, generated into CACHE
    unless it holds them from the same generator code."""
    from importlib.metadata import version

    name = f"candidates-{mode.dataset or 'aflow'}-{mode.threshold:g}-{size}"
    path, record_path = CACHE / f"{name}.parquet", CACHE / f"{name}.json"
    code = hashlib.sha256(version("pymatgen").encode())
    for file in GENERATOR_FILES:
        code.update((ROOT / file).read_bytes())
    if record_path.exists() and path.exists():
        record = json.loads(record_path.read_text())
        if record["generator_sha256"] == code.hexdigest():
            return path, {**record, "cached": True}
    command = [CLI, "generate", "--out", str(path), "--threshold", str(mode.threshold),
               "--max-candidates", str(size), "--quiet"]  # fmt: skip
    if mode.dataset:
        command += ["--from", mode.dataset]
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    record = {
        "command": " ".join(["crystalformer", *command[1:]]),
        "file": str(path.relative_to(ROOT)),
        "seconds": round(time.perf_counter() - started, 1),
        "summary": done.stdout.strip().splitlines()[0],
        "counts": done.stdout.strip().splitlines()[1],
        "generator_sha256": code.hexdigest(),
    }
    made = row_count(path)
    if made < size:
        raise RuntimeError(f"the generator gave {made} candidates, fewer than {size}: {record}")
    write_json(record_path, record)
    return path, {**record, "cached": False}


def row_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def first_rows(table: Path, n: int, path: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.ParquetFile(table).read_row_group(0).slice(0, n), path)
    return path


def sample_rows(table: Path, n: int, path: Path, seed: int = 0) -> None:
    """A seeded random sample of n rows of a table, in its order: the rows pandas'
    `sample(n=n, random_state=seed).sort_index()` picks, read one row group at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(table)
    picks = np.sort(np.random.RandomState(seed).choice(source.metadata.num_rows, n, False))
    pending, start = [], 0
    with pq.ParquetWriter(path, source.schema_arrow) as writer:
        for k in range(source.num_row_groups):
            group = source.read_row_group(k)
            chosen = picks[(picks >= start) & (picks < start + group.num_rows)] - start
            pending.append(group.take(chosen))
            start += group.num_rows
            if sum(part.num_rows for part in pending) >= 1000 or k == source.num_row_groups - 1:
                writer.write_table(pa.concat_tables(pending))
                pending = []


def to_cif_table(candidates: Path, path: Path) -> None:
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    frame = pd.read_parquet(candidates, columns=["id", "structure"])
    cifs = [str(CifWriter(Structure.from_str(text, fmt="json"))) for text in frame["structure"]]
    pd.DataFrame({"id": frame["id"], "cif": cifs}).to_csv(path, index=False)


# --- one case -----------------------------------------------------------------------------------


def run_case(name: str, sources, models, out: Path, args, env: dict, rss_every: float) -> dict:
    timings = out.with_name(f"{out.name}-timings.json")
    command = [sys.executable, __file__, "--timed", str(timings), "screen", *map(str, sources),
               "--out", str(out), "--workers", str(args.workers), "--quiet",
               "--compile" if args.compile else "--no-compile"]  # fmt: skip
    for uri in models:
        command += ["--models", uri]
    started, clock = time.perf_counter(), time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr, memory = communicate_sampling_rss(process, rss_every)
    seconds = time.perf_counter() - started
    clocks = {"started": clock, "exited": time.time()}
    if process.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{stderr.decode()[-3000:]}")
    screened = int(stdout.decode().split(" screened")[0].split()[-1])
    row = {
        "case": name,
        "crystals": screened,
        "compiled": args.compile,
        "seconds": round(seconds, 1),
        "crystals_per_s": round(screened / seconds, 1),
        "peak_rss_mib": mib(memory.total),
        "peak_main_mib": mib(memory.main),
        "peak_worker_mib": mib(memory.child),
        "median_main_mib": mib(statistics.median(memory.main_samples or [0])),
        "median_worker_mib": mib(memory.worker_median()),
        "summary": stdout.decode().strip().splitlines()[0],
        "profile": profile({**json.loads(timings.read_text()), **clocks}, seconds),
    }
    print(
        f"  {name}: {row['crystals_per_s']} crystals/s, peak RSS {row['peak_rss_mib']} MiB "
        f"(main {row['peak_main_mib']}, largest worker {row['peak_worker_mib']}; medians "
        f"{row['median_main_mib']}, {row['median_worker_mib']})"
    )
    return row


def mib(size: float) -> int:
    return round(size / 2**20)


def profile(timings: dict, seconds: float) -> dict:
    """Stage wall times, what the process spent before and after them, and each model's
    prediction time. `timings`: what timed_screen wrote, and the case's clock (time.time())
    when its process started and exited."""
    stages = timings["stages"]
    before = timings["workers_clock"] - timings["started"]
    after = timings["exited"] - timings["returned_clock"]
    workers = max(len(timings["workers"]), 1)
    spent: dict[str, float] = {}
    crystals: dict[str, int] = {}
    for worker in timings["workers"].values():
        for model, value in worker["seconds"].items():
            spent[model] = spent.get(model, 0.0) + value
            crystals[model] = crystals.get(model, 0) + worker["crystals"][model]
    models = {
        model: {
            "seconds": round(value / workers, 1),
            "worker_seconds": round(value, 1),
            "crystals": crystals[model],
            "ms_per_crystal": round(1000 * value / max(crystals[model], 1), 3),
        }
        for model, value in spent.items()
    }
    return {
        "before_s": round(before, 1),
        **{f"{stage}_s": round(stages.get(stage, 0.0), 1) for stage in STAGES.values()},
        "exit_s": round(after, 1),
        "other_s": round(seconds - before - sum(stages.values()) - after, 1),
        "workers": workers,
        "models": models,
        "predict_other_s": round(stages.get("predict", 0.0) - sum(spent.values()) / workers, 1),
    }


def scale(cases: list[dict], small: int, large: int) -> dict:
    """The largest size against issue 18.3's goals: its end-to-end rate and minutes, and its
    RSS as a ratio of the smallest size's (end to end)."""
    rows = {row["case"]: row for row in cases}
    low, high = rows[str(small)], rows[str(large)]
    keys = ("peak_main_mib", "median_main_mib", "peak_worker_mib", "median_worker_mib")
    ratios = {key: round(high[key] / max(low[key], 1), 3) for key in keys}
    return {
        "sizes": [small, large],
        "crystals_per_s": high["crystals_per_s"],
        "minutes": round(high["seconds"] / 60, 1),
        "rate_goal_met": high["crystals_per_s"] >= SCALE_RATE,
        "rss_ratio": ratios,
        "rss_goal_met": all(ratio <= SCALE_RSS for ratio in ratios.values()),
    }


# --- the timed command (a case's own process) ---------------------------------------------------

# The stages of a run, in order: crystalformer.screen's functions whose calls are one (or the
# Dask client's start and stop), and the stage's name in `profile`.
STAGES = {
    "start_workers": "start_workers",
    "featurize_inputs": "featurise",
    "import_in_workers": "import_in_workers",
    "predict_folders": "predict",
    "stop_workers": "stop_workers",
    "write_ranked": "rank",
    "write_report": "report",
}


def timed_screen(timings: Path, arguments: list[str]) -> None:
    """`crystalformer ARGUMENTS` (a screen command) in this process, with the stages of
    `crystalformer.screen.screen` timed and each model's prediction timed in every process
    that predicts; the times go to `timings` (JSON) when the command ends.

    The prediction timers are set up in the workers just before prediction (importing
    crystalformer.screen there: torch and the models' code, which the workers' first
    prediction would import anyway; featurisation never imports them), and read back when it
    ends."""
    import crystalformer.screen as screen
    from crystalformer.cli import app

    stages: dict[str, float] = {}
    workers: dict[str, dict] = {}
    clocks: dict[str, float] = {}  # time.time() when the workers start and the command returns
    for function in ("featurize_inputs", "write_ranked", "write_report"):
        setattr(screen, function, _timed(getattr(screen, function), stages, STAGES[function]))
    client_of, predict_folders = screen.dask_client, screen.predict_folders

    @contextlib.contextmanager
    def timed_client(*args, **kwargs):
        clocks["workers_clock"], started = time.time(), time.perf_counter()
        with client_of(*args, **kwargs) as client:
            stages["start_workers"] = time.perf_counter() - started
            try:
                yield client
            finally:
                stopping = time.perf_counter()
        stages["stop_workers"] = time.perf_counter() - stopping

    def timed_predict(folders, models, options, client=None, report=None):
        started = time.perf_counter()
        if client is None:
            time_model_predictions()
        else:
            client.run(time_model_predictions)
        stages["import_in_workers"] = time.perf_counter() - started
        predict = _timed(predict_folders, stages, "predict")
        try:
            return predict(folders, models, options, client, report)
        finally:
            if client is None:
                workers["main"] = model_prediction_times()
            else:
                workers.update(client.run(model_prediction_times))

    screen.dask_client, screen.predict_folders = timed_client, timed_predict
    try:
        app(arguments, prog_name="crystalformer")
    finally:
        clocks["returned_clock"] = time.time()
        timings.write_text(json.dumps({"stages": stages, "workers": workers, **clocks}))


def _timed(function, stages: dict[str, float], stage: str):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - started

    return timed


def time_model_predictions() -> None:
    """In this process (a Dask worker, through Client.run): time each `predict_table` call
    of screening, by the name of the model's folder. Self-contained: Client.run sends it by
    value."""
    import time
    from pathlib import Path

    import crystalformer.screen as screen

    if hasattr(screen, "_bench_model_times"):
        return
    spent: dict[str, float] = {}
    crystals: dict[str, int] = {}
    names: dict[int, str] = {}
    load, predict = screen._loaded, screen.predict_table

    def loaded(folder, *args):
        model = load(folder, *args)
        names[id(model)] = Path(folder).name
        return model

    def predicted(model, table, *args):
        started = time.perf_counter()
        values = predict(model, table, *args)
        name = names.get(id(model), "unknown")
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
        crystals[name] = crystals.get(name, 0) + table.num_rows
        return values

    screen._loaded, screen.predict_table = loaded, predicted
    screen._bench_model_times = {"seconds": spent, "crystals": crystals}


def model_prediction_times() -> dict:
    import crystalformer.screen as screen

    return getattr(screen, "_bench_model_times", {"seconds": {}, "crystals": {}})


# --- tables -------------------------------------------------------------------------------------

TABLE = (
    Column("case", "<14", "case"),
    Column("crystals", ">10", "crystals"),
    Column("seconds", ">10", "seconds"),
    Column("crystals/s", ">12", "crystals_per_s"),
    Column("peak RSS MiB", ">14", "peak_rss_mib"),
    Column("main", ">7", "peak_main_mib"),
    Column("worker", ">8", "peak_worker_mib"),
    Column("main median", ">13", "median_main_mib"),
    Column("worker median", ">15", "median_worker_mib"),
)


def profile_columns(cases: list[dict]) -> list[Column]:
    """case, seconds, the stages in order, and within prediction one column per model."""

    def stage(header: str, key: str) -> Column:
        return Column(header, f">{len(header) + 2}", lambda row: row["profile"][f"{key}_s"])

    models = list(dict.fromkeys(m for row in cases for m in row["profile"]["models"]))
    columns = [Column("case", "<14", "case"), Column("seconds", ">9", "seconds")]
    columns += [stage("before", "before"), stage("workers up", "start_workers")]
    columns += [stage("featurise", "featurise"), stage("imports", "import_in_workers")]
    columns += [stage("predict", "predict")]
    columns += [
        Column(model, f">{len(model) + 2}.1f", functools.partial(model_seconds, model=model))
        for model in models
    ]
    columns += [stage("workers down", "stop_workers"), stage("rank", "rank")]
    return columns + [stage("report", "report"), stage("exit", "exit"), stage("other", "other")]


def model_seconds(row: dict, model: str) -> float:
    return row["profile"]["models"].get(model, {}).get("seconds", float("nan"))


if __name__ == "__main__":
    main()
