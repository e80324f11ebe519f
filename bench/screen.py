"""Screening throughput and memory, end to end, as a user runs it (`crystalformer screen`).

    .venv/bin/python bench/screen.py [--workers 2] [--sizes 10000,100000]
                                     [--cif-size 10000] [--models URI,URI] [--no-compile]
                                     [--out FILE]

Two property models (e_above_hull and band_gap) with the paper's architecture: given with
--models, or trained for one epoch on 200 MP-20 crystals into a temporary data root
(untimed; their accuracy does not matter here, their cost does). Candidates are generated
by `crystalformer generate` (pymatgen's AFLOW prototypes × substitutions) at threshold 1e-6,
capped at the largest size; each smaller size is a seeded random sample of that set, so
runs of different sizes screen the same kind of crystals and their memory can be compared.

Cases, each a fresh `crystalformer screen ... --workers W` process, timed from start to
exit (featurisation, prediction, ranking, report), with the peak of the summed RSS of the
process and its children (Dask workers), and the peaks of the process alone and of its
largest child, sampled every 0.1 s:

    startup      10 candidates: what a process costs before its first crystal (torch,
                 Dask workers, models, kernel compilation)
    N            N generated candidates as a Parquet table of structure JSON
    cif-N        the same crystals as the N case (N from --cif-size) as a CSV table of CIF
                 text (written by pymatgen, untimed)
    shards-N     the largest N again, from the feature folder its run wrote (no parsing or
                 image enumeration: prediction, ranking and the report)

All with `--compile` (torch.compile'd kernels, the screen default) unless --no-compile.
Startup is paid once per process, so small runs understate the steady rate; the table
says how long each process lived.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from harness import (  # bench/harness.py
    RESULTS,
    Column,
    code_state,
    communicate_sampling_rss,
    print_table,
    utc_now,
    write_json,
)

CLI = str(Path(sys.executable).with_name("crystalformer"))
THRESHOLD = 1e-6  # substitution probability: enough candidates for 100,000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--models", default=None, help="two model URIs, comma-separated")
    parser.add_argument("--cif-size", type=int, default=10_000, help="one of --sizes")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS / "screen.json")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.cif_size not in sizes:
        parser.error(f"--cif-size {args.cif_size} is not one of --sizes {args.sizes}")
    work = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    env = {**os.environ, "CRYSTALFORMER_DATA_ROOT": str(work / "root")}
    env.pop("MLFLOW_TRACKING_URI", None)
    models = args.models.split(",") if args.models else train_models(work, env)
    print(f"models: {models}; {args.workers} workers; work folder {work}")

    tables = candidate_tables(work, sizes, env)
    startup = work / "candidates-startup.parquet"
    pd.read_parquet(tables[sizes[0]]).head(10).to_parquet(startup)
    cif_table = work / f"candidates-{args.cif_size}-cif.csv"
    to_cif_table(tables[args.cif_size], cif_table)

    cases = [("startup", startup)] + [(str(size), tables[size]) for size in sizes]
    cases += [(f"cif-{args.cif_size}", cif_table)]
    rows = [run_case(name, [str(path)], models, work / f"screen-{name}", args, env)
            for name, path in cases]  # fmt: skip
    largest = max(sizes)
    features = [str(work / f"screen-{largest}" / "features")]
    rows.append(run_case(f"shards-{largest}", features, models, work / "screen-shards", args, env))

    print()
    print_table(TABLE, rows)
    result = {
        "benchmark": "bench/screen.py",
        "command": f".venv/bin/python bench/screen.py --workers {args.workers} "
        f"--sizes {args.sizes} --cif-size {args.cif_size}"
        + ("" if args.compile else " --no-compile"),
        "date": utc_now(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "code": code_state(),
        "models": models,
        "cases": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


def train_models(work: Path, env: dict) -> list[str]:
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


def candidate_tables(work: Path, sizes: list[int], env: dict) -> dict[int, Path]:
    """The largest size generated; the others seeded random samples of it (in its order)."""
    largest = max(sizes)
    path = work / f"candidates-{largest}.parquet"
    subprocess.run(
        [CLI, "generate", "--out", str(path), "--threshold", str(THRESHOLD),
         "--max-candidates", str(largest)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    frame = pd.read_parquet(path)
    if len(frame) < largest:
        raise RuntimeError(f"the generator gave {len(frame)} candidates, fewer than {largest}")
    tables = {largest: path}
    for size in sorted(set(sizes) - {largest}):
        tables[size] = work / f"candidates-{size}.parquet"
        frame.sample(n=size, random_state=0).sort_index().to_parquet(tables[size], index=False)
    return tables


def to_cif_table(candidates: Path, path: Path) -> None:
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    frame = pd.read_parquet(candidates, columns=["id", "structure"])
    cifs = [str(CifWriter(Structure.from_str(text, fmt="json"))) for text in frame["structure"]]
    pd.DataFrame({"id": frame["id"], "cif": cifs}).to_csv(path, index=False)


def run_case(name: str, sources, models, out: Path, args, env: dict) -> dict:
    command = [CLI, "screen", *sources, "--out", str(out), "--workers", str(args.workers),
               "--quiet", "--compile" if args.compile else "--no-compile"]  # fmt: skip
    for uri in models:
        command += ["--models", uri]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr, memory = communicate_sampling_rss(process)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{stderr.decode()[-3000:]}")
    screened = int(stdout.decode().split(" screened")[0].split()[-1])
    row = {
        "case": name,
        "crystals": screened,
        "compiled": args.compile,
        "seconds": round(seconds, 1),
        "crystals_per_s": round(screened / seconds, 1),
        "peak_rss_mib": round(memory.total / 2**20),
        "peak_main_mib": round(memory.main / 2**20),
        "peak_worker_mib": round(memory.child / 2**20),
        "median_main_mib": round(statistics.median(memory.main_samples or [0]) / 2**20),
        "summary": stdout.decode().strip().splitlines()[0],
    }
    print(
        f"  {name}: {row['crystals_per_s']} crystals/s, peak RSS {row['peak_rss_mib']} MiB "
        f"(main {row['peak_main_mib']}, largest worker {row['peak_worker_mib']})"
    )
    return row


TABLE = (
    Column("case", "<14", "case"),
    Column("crystals", ">10", "crystals"),
    Column("seconds", ">10", "seconds"),
    Column("crystals/s", ">12", "crystals_per_s"),
    Column("peak RSS MiB", ">14", "peak_rss_mib"),
    Column("main", ">7", "peak_main_mib"),
    Column("worker", ">8", "peak_worker_mib"),
    Column("main median", ">13", "median_main_mib"),
)


if __name__ == "__main__":
    main()
