"""Featurisation throughput per core: ours against the reference preprocessing, same crystals.

    .venv/bin/python bench/featurize.py [--n 1000] [--dataset mp2018] [--repeat 2]
                                        [--out FILE] [--no-profile]

Every case runs in a fresh single-threaded subprocess on the same N real crystals (a dataset
registered in conf/datasets.yaml; its validation file when it has one):

    ours-cif      featurize_chunk on CIF text (parse, validate, primitive cell, image list)
    ours-arrays   featurize_chunk on pre-parsed arrays (lattice, frac_coords, numbers)
    ours-shards   featurize_inputs on CIF text into a dataset folder (Parquet included)
    ref-cif       Structure.from_str(cif) -> SpacegroupAnalyzer(...)
                  .get_primitive_standard_structure() -> get_neighbor_list(6.93)
    ref-arrays    the same two last steps on pre-built pymatgen Structures
    parse-*       CIF text to sites alone: gemmi, our `structures.parse`, pymatgen's CifParser

Preparation (reading the table, pre-parsing) is untimed; each case warms up on one crystal,
then times all N --repeat times with time.perf_counter and keeps the best run (process CPU
time is reported beside it: on a busy machine it is the steadier per-core figure). Memory is
the peak resident set size of the case's process (VmHWM), given with the same figure taken
just before the timed runs. Timing, memory and the report come from bench/harness.py.
A correctness check, gemmi-vs-pymatgen comparisons (bench/featurize_checks.py) and a cProfile
of the CIF path follow.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import itertools
import json
import pstats
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from featurize_checks import (  # bench/featurize_checks.py
    REFERENCE_CUTOFF,
    compare_with_reference,
    correctness,
    gemmi_checks,
    gemmi_sites,
    print_check,
    print_gemmi,
    pymatgen_cif,
    structure_of,
)
from harness import (  # bench/harness.py
    RESULTS,
    Column,
    Session,
    load_inputs,
    machine_info,
    print_table,
    rss_mib,
    run_case_process,
    time_repeats,
)

PROFILE_TOP = 15
THREADS = 1  # per case process: per-core figures


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    reference: str | None  # the case it is compared with


CASES = (
    Case("ours-cif", "ours: CIF text -> image lists", "ref-cif"),
    Case("ours-arrays", "ours: arrays -> image lists", "ref-arrays"),
    Case("ours-shards", "ours: CIF text -> Parquet shards", "ref-cif"),
    Case("ref-cif", "reference: CIF text -> neighbour list", None),
    Case("ref-arrays", "reference: Structure -> neighbour list", None),
    Case("parse-gemmi", "parse only: gemmi", "parse-pymatgen"),
    Case("parse-ours", "parse only: structures.parse (gemmi + fallback)", "parse-pymatgen"),
    Case("parse-pymatgen", "parse only: pymatgen CifParser", None),
)


# --- the driver ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="crystals (default 1000)")
    parser.add_argument("--dataset", default="mp2018", help="a CIF dataset in conf/datasets.yaml")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "featurize.json", help="JSON results file"
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per case (best kept)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.inputs)))
        return

    session = Session("featurize.py")
    raws, file = load_inputs(args.dataset, args.n)
    print(f"{len(raws)} crystals from {file}, one thread per process, best of {args.repeat} runs\n")
    with tempfile.TemporaryDirectory(prefix="bench-featurize-") as tmp:
        inputs = Path(tmp) / "inputs.json"
        raw_fields = [dataclasses.asdict(raw) for raw in raws]
        shared = {"raws": raw_fields, "dataset": args.dataset, "repeat": args.repeat}
        inputs.write_text(json.dumps(shared))
        runs = {case.name: spawn(case.name, inputs) for case in CASES}
        check = spawn("check", inputs)
        findings = spawn("gemmi-checks", inputs)
        profile = None if args.no_profile else spawn("profile", inputs)

    rows = figures(runs)
    agreement = compare_with_reference(
        runs["ours-cif"]["per_crystal"], runs["ref-cif"]["per_crystal"], [r.id for r in raws]
    )
    print_figures(rows)
    print_check(check, agreement)
    print_gemmi(check["gemmi_vs_pymatgen"], findings)
    if profile:
        print_profile(profile)

    machine = machine_info(
        ("numpy", "pymatgen", "gemmi", "spglib", "pyarrow"), threads_per_process=THREADS
    )
    report = {
        **session.header(machine),
        "dataset": args.dataset,
        "file": file,
        "n": len(raws),
        "repeat": args.repeat,
        "settings": runs["ours-cif"]["settings"],
        "reference": {"cutoff": REFERENCE_CUTOFF, "symprec": 0.01},
        "memory": "peak resident set size of the case's own process (VmHWM)",
        "cases": rows,
        "structure_sizes": sizes(runs),
        "check": {**{k: v for k, v in check.items() if k != "gemmi_vs_pymatgen"}, **agreement},
        "gemmi": {"real_p1_cifs": check["gemmi_vs_pymatgen"], **findings},
        "profile": profile,
    }
    session.write(args.out, report)


def spawn(name: str, inputs: Path) -> dict:
    """Run one case in a fresh single-threaded interpreter; its JSON result."""
    return run_case_process("featurize.py", name, ["--inputs", str(inputs)], THREADS)


# --- the cases (each in its own process) --------------------------------------------------------


def run_worker(name: str, inputs: Path) -> dict:
    warnings.simplefilter("ignore")  # pymatgen warns on most CIFs; warnings are not the work
    from crystalformer.records import RawInput

    data = json.loads(inputs.read_text())
    raws = [RawInput(**fields) for fields in data["raws"]]
    if name == "check":
        return correctness(raws)
    if name == "gemmi-checks":
        return gemmi_checks(raws)
    if name == "profile":
        return profile_cif_path(raws)
    items, run, describe = prepare(name, raws, data["dataset"], inputs.parent)
    run(items[:1])  # warm-up: imports, caches, first-call costs
    rss_before = rss_mib()
    timings = time_repeats(lambda: run(items), data["repeat"])
    return {
        "seconds": min(timings.wall),
        "cpu_seconds": min(timings.cpu),
        "all_seconds": timings.wall,
        "n": len(items),
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss_mib(),
        **describe(timings.output),
    }


def prepare(name: str, raws: list, dataset: str, workdir: Path) -> tuple[list, Callable, Callable]:
    """(items, run(items) -> output, describe(output) -> dict) for one case."""
    from crystalformer.conf import default_settings, featurize_config
    from crystalformer.datasets import featurize_inputs
    from crystalformer.featurize import featurize_chunk
    from crystalformer.sources.snapshots import registered_dataset

    settings = default_settings()
    if name == "ours-cif":
        return raws, lambda items: featurize_chunk(items, settings), describe_ours(settings)
    if name == "ours-arrays":
        return (
            as_arrays(raws),
            lambda items: featurize_chunk(items, settings),
            describe_ours(settings),
        )
    if name == "ours-shards":
        units = registered_dataset(dataset).units()
        shard_size = featurize_config().shard_size
        runs = itertools.count()

        def run(items):
            out = workdir / f"shards-{next(runs)}"  # a new dataset folder each run
            return featurize_inputs(
                items, out, settings, units, shard_size=shard_size, progress=False
            )

        def describe(summary):
            size = sum(p.stat().st_size for p in summary.out.glob("*.parquet"))
            return {"accepted": summary.accepted, "rejected": summary.rejected, "bytes": size}

        return raws, run, describe
    if name == "ref-cif":
        return [raw.payload for raw in raws], reference_from_cif, describe_reference
    if name == "ref-arrays":
        return [structure_of(raw.payload) for raw in raws], reference, describe_reference
    if name == "parse-gemmi":
        return [raw.payload for raw in raws], parse_all(gemmi_sites), describe_parse
    if name == "parse-ours":
        from crystalformer.structures import parse

        return raws, parse_all(parse), describe_parse
    if name == "parse-pymatgen":
        return [raw.payload for raw in raws], parse_all(pymatgen_cif), describe_parse
    raise SystemExit(f"unknown case {name!r}")


def as_arrays(raws: list) -> list:
    """Each CIF parsed once (untimed) into a RawInput of format "arrays" (no disorder)."""
    from crystalformer.records import InputRejected, RawInput
    from crystalformer.structures import parse

    arrays = []
    for raw in raws:
        try:
            crystal = parse(raw)
        except InputRejected:
            continue
        payload = {
            "lattice": crystal.lattice,
            "frac_coords": crystal.frac_coords,
            "numbers": crystal.numbers,
        }
        arrays.append(RawInput(raw.id, raw.source, "arrays", payload, dict(raw.targets), raw.split))
    return arrays


def describe_ours(settings) -> Callable[[Any], dict]:
    def describe(result) -> dict:
        return {
            "accepted": len(result.rows),
            "rejected": len(result.rejects),
            "reject_reasons": sorted({r.reason for r in result.rejects})[:5],
            "settings": {
                "r_cut": settings.r_cut,
                "cell": settings.cell,
                "symprec": settings.symprec,
            },
            "per_crystal": {row.crystal.id: image_counts(row) for row in result.rows},
        }

    return describe


def image_counts(row) -> dict:
    """Atoms, images within r_cut (self terms included), distinct (i, j) pairs, neighbours."""
    images, n_atoms = row.images, row.crystal.n_atoms
    i, j = np.divmod(images.pair, n_atoms)
    self_term = (i == j) & ~images.shift.any(axis=1)
    return {
        "atoms": n_atoms,
        "images": len(images.pair),
        "pairs": len(np.unique(images.pair)),
        "neighbours": int(np.count_nonzero((images.dist <= REFERENCE_CUTOFF) & ~self_term)),
    }


def reference(structures: list) -> list[tuple[int, int]]:
    """The reference preprocessing from a Structure: (atoms, neighbours) per crystal."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    out = []
    for structure in structures:
        primitive = SpacegroupAnalyzer(structure).get_primitive_standard_structure()
        centres = primitive.get_neighbor_list(REFERENCE_CUTOFF)[0]
        out.append((len(primitive), len(centres)))
    return out


def reference_from_cif(cifs: list[str]) -> list[tuple[int, int]]:
    return reference([structure_of(cif) for cif in cifs])


def describe_reference(out: list[tuple[int, int]]) -> dict:
    return {"per_crystal": out}


def parse_all(function: Callable) -> Callable[[list], dict]:
    def run(items: list) -> dict:
        failed = 0
        for item in items:
            try:
                function(item)
            except Exception:
                failed += 1
        return {"failed": failed}

    return run


def describe_parse(out: dict) -> dict:
    return out


# --- profile ------------------------------------------------------------------------------------


PROFILE_STAGES = (  # (label, a fragment of the file's path, function name)
    ("load (parse + validate)", "crystalformer/structures.py", "load"),
    ("  parse", "crystalformer/structures.py", "parse"),
    ("    gemmi fast path", "crystalformer/structures.py", "_read_p1_cif_with_gemmi"),
    ("  validate", "crystalformer/structures.py", "validate"),
    ("structure_hash", "crystalformer/structures.py", "structure_hash"),
    ("featurize", "crystalformer/featurize.py", "featurize"),
    ("  reduce_cell", "crystalformer/lattice.py", "reduce_cell"),
    ("    primitive pre-test", "crystalformer/lattice.py", "_has_fractional_translation"),
    ("    spglib standardize_cell", "spglib/", "standardize_cell"),
    ("    niggli_basis", "crystalformer/lattice.py", "niggli_basis"),
    ("  enumerate_images", "crystalformer/lattice.py", "enumerate_images"),
    ("  check_separation", "crystalformer/structures.py", "check_separation"),
    ("  reduced_formula", "crystalformer/featurize.py", "reduced_formula"),
    ("  equivalent_atoms", "crystalformer/lattice.py", "equivalent_atoms"),
)


def profile_cif_path(raws: list) -> dict:
    """cProfile of featurize_chunk on CIF text: stage totals and the top functions."""
    from crystalformer.conf import default_settings
    from crystalformer.featurize import featurize_chunk

    settings = default_settings()
    featurize_chunk(raws[:1], settings)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(featurize_chunk, raws, settings)
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    n = len(raws)

    def per_crystal_ms(value: float) -> float:
        return round(1e3 * value / n, 4)

    stages = {}
    for label, file, function in PROFILE_STAGES:
        entries = [v for (f, _, name), v in stats.items() if file in f and name == function]
        if entries:
            stages[label] = {
                "cum_ms": per_crystal_ms(sum(v[3] for v in entries)),
                "calls": round(sum(v[1] for v in entries) / n, 2),
            }
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:PROFILE_TOP]
    return {
        "profiled_ms_per_crystal": per_crystal_ms(seconds),
        "stages": stages,
        "top_self_time": [
            {
                "function": f"{Path(f).name}:{line}({name})",
                "self_ms": per_crystal_ms(v[2]),
                "cum_ms": per_crystal_ms(v[3]),
                "calls": round(v[1] / n, 2),
            }
            for (f, line, name), v in top
        ],
    }


# --- reporting ----------------------------------------------------------------------------------


def figures(runs: dict) -> list[dict]:
    rows = []
    for case in CASES:
        run = runs[case.name]
        rate = run["n"] / run["seconds"]
        row = {
            "case": case.name,
            "label": case.label,
            "n": run["n"],
            "seconds": round(run["seconds"], 3),
            "all_seconds": [round(x, 3) for x in run["all_seconds"]],
            "crystals_per_s": round(rate, 1),
            "ms_per_crystal": round(1e3 / rate, 4),
            "cpu_ms_per_crystal": round(1e3 * run["cpu_seconds"] / run["n"], 4),
            "peak_rss_mib": round(run["peak_rss_mib"], 1),
            "rss_before_mib": round(run["rss_before_mib"], 1),
        }
        if case.reference:
            ref = runs[case.reference]
            row["vs"] = case.reference
            row["speedup"] = round(rate / (ref["n"] / ref["seconds"]), 2)
            row["speedup_cpu"] = round(
                (ref["cpu_seconds"] / ref["n"]) / (run["cpu_seconds"] / run["n"]), 2
            )
        for key in ("accepted", "rejected", "failed", "bytes"):
            if key in run:
                row[key] = run[key]
        rows.append(row)
    return rows


def sizes(runs: dict) -> dict:
    ours = list(runs["ours-cif"]["per_crystal"].values())
    reference_rows = runs["ref-cif"]["per_crystal"]

    def mean(values) -> float:
        return round(float(np.mean(values)), 2) if len(values) else 0.0

    return {
        "atoms_per_crystal": mean([c["atoms"] for c in ours]),
        "images_per_crystal": mean([c["images"] for c in ours]),
        "images_per_atom": mean([c["images"] / c["atoms"] for c in ours]),
        "max_images": max((c["images"] for c in ours), default=0),
        "pairs_per_crystal": mean([c["pairs"] for c in ours]),
        "neighbours_within_6.93_per_crystal": mean([c["neighbours"] for c in ours]),
        "reference_atoms_per_crystal": mean([a for a, _ in reference_rows]),
        "reference_neighbours_per_crystal": mean([b for _, b in reference_rows]),
    }


TABLE = (
    Column("case", "<50", "label"),
    Column("crystals/s", ">11.1f", "crystals_per_s"),
    Column("ms/crystal", ">12.3f", "ms_per_crystal"),
    Column("cpu ms", ">9.3f", "cpu_ms_per_crystal"),
    Column("peak MiB", ">10.0f", "peak_rss_mib"),
    Column("(start)", ">9.0f", "rss_before_mib"),
    Column("  speed-up (wall, cpu)", "", lambda row: "  " + speedup(row)),
)


def speedup(row: dict) -> str:
    if "speedup" not in row:
        return ""
    return f"{row['speedup']:>5.1f}x {row['speedup_cpu']:>5.1f}x vs {row['vs']}"


def print_figures(rows: list[dict]) -> None:
    print_table(TABLE, rows, rule=True)
    print(
        "best of the repeats by wall clock (perf_counter); cpu ms: process CPU time, best repeat;"
        "\npeak MiB: peak RSS of the case's process (VmHWM); (start): the same before timing"
    )


def print_profile(profile: dict) -> None:
    ms = profile["profiled_ms_per_crystal"]
    print(f"\nprofile of featurize_chunk on CIF text ({ms} ms/crystal under cProfile)")
    for label, stage in profile["stages"].items():
        print(f"  {label:<32}{stage['cum_ms']:>8.3f} ms  {stage['calls']:>6} calls/crystal")
    print(f"  top {PROFILE_TOP} by self time (ms per crystal):")
    for entry in profile["top_self_time"]:
        print(f"    {entry['self_ms']:>7.3f} self {entry['cum_ms']:>7.3f} cum  {entry['function']}")


if __name__ == "__main__":
    main()
