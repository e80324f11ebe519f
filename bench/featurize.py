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
the peak resident set size of the case's process (getrusage ru_maxrss), given with the same
figure taken just before the timed runs.
A correctness check, gemmi-vs-pymatgen comparisons and a cProfile of the CIF path follow.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import pickle
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_CUTOFF = 6.93  # Å, the reference preprocessing's neighbour radius
TIE_TOLERANCE = 1e-6  # Å: a neighbour this close to the cutoff may fall either side
GEMMI_SAMPLE = 100  # crystals re-written with symmetry for the gemmi checks
PROFILE_TOP = 15
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "featurize.json"


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


# One thread for every numerical library in the case processes: per-core figures.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


# --- the driver ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="crystals (default 1000)")
    parser.add_argument("--dataset", default="mp2018", help="a CIF dataset in conf/datasets.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per case (best kept)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.inputs)))
        return

    started, load_before = time.perf_counter(), os.getloadavg()
    raws, file = load_inputs(args.dataset, args.n)
    print(f"{len(raws)} crystals from {file}, one thread per process, best of {args.repeat} runs\n")
    with tempfile.TemporaryDirectory(prefix="bench-featurize-") as tmp:
        inputs = Path(tmp) / "inputs.pkl"
        shared = {"raws": raws, "dataset": args.dataset, "repeat": args.repeat}
        inputs.write_bytes(pickle.dumps(shared))
        runs = {case.name: spawn(case.name, inputs) for case in CASES}
        check = spawn("check", inputs)
        findings = spawn("gemmi-checks", inputs)
        profile = None if args.no_profile else spawn("profile", inputs)

    rows = figures(runs)
    agreement = compare_with_reference(
        runs["ours-cif"]["per_crystal"], runs["ref-cif"]["per_crystal"], [r.id for r in raws]
    )
    print_table(rows)
    print_check(check, agreement)
    print_gemmi(check["gemmi_vs_pymatgen"], findings)
    if profile:
        print_profile(profile)

    report = {
        "benchmark": "bench/featurize.py",
        "command": " ".join([".venv/bin/python", "bench/featurize.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_state(),
        "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        "dataset": args.dataset,
        "file": file,
        "n": len(raws),
        "repeat": args.repeat,
        "settings": runs["ours-cif"]["settings"],
        "reference": {"cutoff": REFERENCE_CUTOFF, "symprec": 0.01},
        "memory": "peak resident set size of the case's own process (getrusage ru_maxrss)",
        "cases": rows,
        "structure_sizes": sizes(runs),
        "check": {**{k: v for k, v in check.items() if k != "gemmi_vs_pymatgen"}, **agreement},
        "gemmi": {"real_p1_cifs": check["gemmi_vs_pymatgen"], **findings},
        "profile": profile,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\nwrote {args.out} ({report['wall_seconds']} s in all; load average "
        f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs)"
    )


def load_inputs(dataset_name: str, n: int):
    """The first n readable CIF inputs of a registered dataset (its validation file if any)."""
    from crystalformer.config import datasets_config
    from crystalformer.records import RawInput
    from crystalformer.sources.snapshots import snapshot_inputs

    datasets = datasets_config().datasets
    if dataset_name not in datasets:
        raise SystemExit(
            f"unknown dataset {dataset_name!r}; conf/datasets.yaml has {sorted(datasets)}"
        )
    dataset = datasets[dataset_name]
    if dataset.structure_column != "cif":
        raise SystemExit(f"{dataset_name} holds {dataset.structure_column}, not CIF text")
    files = [f for f in dataset.files if "val" in Path(f).name] or dataset.files
    items = snapshot_inputs(dataset.model_copy(update={"files": files}))
    raws = list(itertools.islice((r for r in items if isinstance(r, RawInput)), n))
    if not raws:
        raise SystemExit(f"{dataset_name}: no readable rows in {files}")
    return raws, ", ".join(f"data/snapshots/{f}" for f in files)


def spawn(name: str, inputs: Path) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    done = subprocess.run(
        [*command, "--inputs", str(inputs)],
        capture_output=True,
        text=True,
        env={**os.environ, **dict.fromkeys(THREAD_VARIABLES, "1")},
    )
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
    print(f"  ran {name}", file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the cases (each in its own process) --------------------------------------------------------


def run_worker(name: str, inputs: Path) -> dict:
    warnings.simplefilter("ignore")  # pymatgen warns on most CIFs; warnings are not the work
    data = pickle.loads(inputs.read_bytes())
    raws = data["raws"]
    if name == "check":
        return correctness(raws)
    if name == "gemmi-checks":
        return gemmi_checks(raws)
    if name == "profile":
        return profile_cif_path(raws)
    items, run, describe = prepare(name, raws, data["dataset"], inputs.parent)
    run(items[:1])  # warm-up: imports, caches, first-call costs
    rss_before = max_rss_mib()
    wall, cpu, output = [], [], None
    for _ in range(data["repeat"]):
        output = None  # the previous repeat's output must not add to the peak
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        output = run(items)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "seconds": min(wall),
        "cpu_seconds": min(cpu),
        "all_seconds": wall,
        "n": len(items),
        "rss_before_mib": rss_before,
        "peak_rss_mib": max_rss_mib(),
        **describe(output),
    }


def prepare(name: str, raws: list, dataset: str, workdir: Path) -> tuple[list, Callable, Callable]:
    """(items, run(items) -> output, describe(output) -> dict) for one case."""
    from crystalformer.config import default_settings, featurize_config
    from crystalformer.featurize import featurize_chunk
    from crystalformer.pipeline import featurize_inputs
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


def structure_of(cif: str):
    from pymatgen.core import Structure

    return Structure.from_str(cif, "cif")


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


def gemmi_sites(cif: str):
    """CIF text to (lattice, frac, numbers, occupancy) with gemmi, symmetry applied."""
    import gemmi

    small = gemmi.make_small_structure_from_block(gemmi.cif.read_string(cif)[0])
    sites = small.get_all_unit_cell_sites()
    lattice = np.array(small.cell.orth.mat.tolist()).T
    frac = np.array([site.fract.tolist() for site in sites]).reshape(-1, 3)
    numbers = np.array([site.element.atomic_number for site in sites])
    return lattice, frac, numbers, np.array([site.occ for site in sites])


def pymatgen_cif(cif: str):
    from pymatgen.io.cif import CifParser

    return CifParser.from_str(cif).parse_structures(primitive=False)[0]


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


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- correctness --------------------------------------------------------------------------------


def correctness(raws: list) -> dict:
    """Our neighbours within 6.93 Å against pymatgen's get_neighbor_list on our stored cell."""
    from pymatgen.core import Lattice, Structure

    from crystalformer.config import default_settings
    from crystalformer.featurize import featurize_chunk

    result = featurize_chunk(raws, default_settings())
    mismatches, ties_only, worst_distance = [], 0, 0.0
    for row in result.rows:
        crystal, images = row.crystal, row.images
        structure = Structure(
            Lattice(crystal.lattice), crystal.numbers.tolist(), crystal.frac_coords
        )
        theirs = np.sort(structure.get_neighbor_list(REFERENCE_CUTOFF)[3])
        i, j = np.divmod(images.pair, crystal.n_atoms)
        keep = (images.dist <= REFERENCE_CUTOFF) & ((i != j) | images.shift.any(axis=1))
        ours = np.sort(images.dist[keep])
        if len(ours) == len(theirs):
            if len(ours):
                worst_distance = max(worst_distance, float(np.abs(ours - theirs).max()))
            continue
        near = np.count_nonzero(np.abs(images.dist - REFERENCE_CUTOFF) <= TIE_TOLERANCE)
        near += np.count_nonzero(np.abs(theirs - REFERENCE_CUTOFF) <= TIE_TOLERANCE)
        if abs(len(ours) - len(theirs)) <= near:
            ties_only += 1
        else:
            mismatches.append({"id": crystal.id, "ours": len(ours), "pymatgen": len(theirs)})
    return {
        "crystals_checked": len(result.rows),
        "rejected": [(r.id, r.reason) for r in result.rejects],
        "neighbour_count_mismatches": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "boundary_ties": ties_only,
        "max_distance_difference": worst_distance,
        "gemmi_vs_pymatgen": compare_parsers(raws),
    }


def compare_parsers(raws: list) -> dict:
    """gemmi and pymatgen on the same CIF text: sites, species, positions, and our path."""
    fast, differ, worst, failures = 0, [], 0.0, []
    for raw in raws:
        fast += our_path(raw.payload) == "gemmi"
        try:
            distance = site_distance(gemmi_sites(raw.payload), pymatgen_cif(raw.payload))
        except Exception as error:
            failures.append((raw.id, f"{type(error).__name__}: {str(error)[:100]}"))
            continue
        if distance is None:
            differ.append(raw.id)
        else:
            worst = max(worst, distance)
    return {
        "crystals": len(raws),
        "our_gemmi_path": fast,
        "different_sites": len(differ),
        "different_examples": differ[:5],
        "max_position_difference": worst,
        "failures": failures[:5],
    }


def site_distance(gemmi_result, structure) -> float | None:
    """Largest distance (Å) from a gemmi site to the nearest pymatgen site of the same element,
    both ways; None when the site counts or element counts differ."""
    _, frac, numbers, _ = gemmi_result
    theirs = np.array([site.specie.Z for site in structure])
    if len(numbers) != len(theirs) or sorted(numbers.tolist()) != sorted(theirs.tolist()):
        return None
    if not len(numbers):
        return 0.0
    d = frac[:, None, :] - structure.frac_coords[None, :, :]
    d -= np.round(d)
    distance = np.linalg.norm(d @ structure.lattice.matrix, axis=-1)
    distance[numbers[:, None] != theirs[None, :]] = np.inf
    return float(max(distance.min(axis=1).max(), distance.min(axis=0).max()))


def compare_with_reference(ours: dict, reference_rows: list, ids: list[str]) -> dict:
    """Our stored cell against the reference's primitive standard cell, crystal by crystal."""
    same_atoms = same_neighbours = compared = 0
    for raw_id, (atoms, neighbours) in zip(ids, reference_rows, strict=True):
        if raw_id in ours:
            compared += 1
            same_atoms += ours[raw_id]["atoms"] == atoms
            same_neighbours += ours[raw_id]["neighbours"] == neighbours
    return {
        "vs_reference_cell_same_atom_count": same_atoms,
        "vs_reference_cell_same_neighbour_count": same_neighbours,
        "vs_reference_cell_compared": compared,
    }


# --- gemmi beyond plain P1 ----------------------------------------------------------------------


def gemmi_checks(raws: list) -> dict:
    """gemmi against pymatgen on symmetrised CIFs, partial occupancies and malformed text."""
    return {
        "symmetrised": symmetrised_cifs(raws[:GEMMI_SAMPLE]),
        "partial_occupancy": partial_occupancy(),
        "malformed": malformed(raws[0].payload),
    }


def symmetrised_cifs(raws: list) -> dict:
    """Real crystals re-written by CifWriter(symprec=0.01): asymmetric unit + symmetry ops."""
    from pymatgen.io.cif import CifWriter

    texts = [str(CifWriter(structure_of(raw.payload), symprec=0.01)) for raw in raws]
    non_p1 = sum("_symmetry_Int_Tables_number   1\n" not in text for text in texts)
    differ, worst = 0, 0.0
    for text in texts:
        distance = site_distance(gemmi_sites(text), pymatgen_cif(text))
        if distance is None:
            differ += 1
        else:
            worst = max(worst, distance)
    timings = {}
    for name, function in (("gemmi", gemmi_sites), ("pymatgen", pymatgen_cif)):
        function(texts[0])
        start = time.perf_counter()
        for text in texts:
            function(text)
        timings[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / len(texts)
    return {
        "crystals": len(texts),
        "non_p1": non_p1,
        "different_sites": differ,
        "max_position_difference": worst,
        **timings,
    }


def partial_occupancy() -> dict:
    """A mixed site, a vacancy, and an atom 0.3 Å off a special position."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    rock_salt = Lattice.cubic(4.2)
    cases = {
        "(Mg0.5Fe0.5)O, P1": CifWriter(
            Structure(rock_salt, [{"Mg": 0.5, "Fe": 0.5}, "O"], [[0, 0, 0], [0.5] * 3])
        ),
        "(Mg0.5Fe0.5)O, Fm-3m": CifWriter(
            Structure(rock_salt, [{"Mg": 0.5, "Fe": 0.5}, "O"], [[0, 0, 0], [0.5] * 3]),
            symprec=0.01,
        ),
        "Mg0.7O (vacancy), P1": CifWriter(
            Structure(rock_salt, [{"Mg": 0.7}, "O"], [[0, 0, 0], [0.5] * 3])
        ),
    }
    out = {}
    for name, writer in cases.items():
        text = str(writer)
        _, _, numbers, occupancy = gemmi_sites(text)
        structure = pymatgen_cif(text)
        out[name] = {
            "gemmi_sites": [f"Z{z}:{o:g}" for z, o in zip(numbers, occupancy, strict=True)],
            "pymatgen_sites": [site.species.formula for site in structure],
            "our_path": our_path(text),
        }
    # A P4/mmm cell with one Cu site 0.15 Å above the z=0 mirror: two atoms 0.3 Å apart.
    text = SPLIT_SITE_CIF
    _, frac, numbers, _ = gemmi_sites(text)
    out["Cu 0.15 Å off a mirror (images 0.3 Å apart), P4/mmm"] = {
        "gemmi_sites": len(numbers),
        "pymatgen_sites": len(pymatgen_cif(text)),
    }
    return out


SPLIT_SITE_CIF = """data_split
_symmetry_space_group_name_H-M   'P 4/m m m'
_symmetry_Int_Tables_number   123
_cell_length_a   3.0
_cell_length_b   3.0
_cell_length_c   10.0
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Cu  Cu1  0.0  0.0  0.015  1
"""


def malformed(good: str) -> dict:
    """What gemmi, pymatgen and our featurize_chunk make of broken CIF text."""
    lines = good.splitlines()

    def without(prefix: str) -> str:
        return "\n".join(line for line in lines if not line.startswith(prefix))

    first_site = next(line for line in lines[::-1] if line.startswith("  ")).split()
    coordinates = "  ".join(first_site[3:6])
    cases = {
        "truncated in the atom loop": "\n".join(lines[:-1]) + "\n  " + first_site[0] + "  X9  1",
        "no atom loop": "\n".join(lines[:12]),
        "no data_ header": without("data_"),
        "POSCAR text": "NaCl\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\ndirect\n0 0 0\n.5 .5 .5\n",
        "coordinate 'abc'": good.replace(coordinates, "abc  " + "  ".join(first_site[4:6]), 1),
        "no _cell_length_c": without("_cell_length_c"),
        "no _cell_angle_alpha": without("_cell_angle_alpha"),
        "element 'Xx'": good.replace(f"  {first_site[0]}  {first_site[1]}", "  Xx  Xx1", 1),
        "occupancy '?'": good.replace(f"{coordinates}  1", f"{coordinates}  ?", 1),
        "uncertainty 0.625(3)": good.replace(coordinates, coordinates.replace("  ", "(3)  ", 1), 1),
        "two data blocks": good + "\n" + good.replace("data_", "data_second", 1),
    }
    return {name: malformed_outcome(text) for name, text in cases.items()}


def malformed_outcome(text: str) -> dict:
    import gemmi

    from crystalformer.config import default_settings
    from crystalformer.featurize import featurize_chunk
    from crystalformer.records import RawInput

    try:
        doc = gemmi.cif.read_string(text)
        small = gemmi.make_small_structure_from_block(doc[0])
        cell = small.cell
        gemmi_says = (
            f"{len(small.sites)} sites, {len(doc)} block(s), cell "
            f"{cell.a:g} {cell.b:g} {cell.c:g} {cell.alpha:g} {cell.beta:g} {cell.gamma:g}"
        )
        first = small.sites[0] if small.sites else None
        if first is not None:
            gemmi_says += (
                f", first site {first.element.name} {first.fract.tolist()} occ {first.occ:g}"
            )
    except Exception as error:
        gemmi_says = f"{type(error).__name__}: {str(error)[:80]}"
    try:
        structures = (
            __import__("pymatgen.io.cif", fromlist=["CifParser"])
            .CifParser.from_str(text)
            .parse_structures(primitive=False)
        )
        pymatgen_says = f"{[len(s) for s in structures]} sites"
    except Exception as error:
        pymatgen_says = f"{type(error).__name__}: {str(error)[:80]}"
    result = featurize_chunk([RawInput("x", "bench", "cif", text)], default_settings())
    if result.rows:
        crystal = result.rows[0].crystal
        lengths = np.linalg.norm(crystal.lattice, axis=1)
        ours = f"accepted: {result.rows[0].formula}, |a|,|b|,|c| = {np.round(lengths, 3).tolist()}"
    else:
        ours = f"rejected ({result.rejects[0].stage}): {result.rejects[0].reason[:90]}"
    return {
        "gemmi": gemmi_says,
        "pymatgen": pymatgen_says,
        "ours": ours,
        "our_path": our_path(text),
    }


def our_path(text: str) -> str:
    """Which reader `structures.parse` uses for this text (a private function: may move)."""
    from crystalformer import structures

    fast = getattr(structures, "_read_p1_cif_with_gemmi", None)
    if fast is None:
        return "unknown"
    return "gemmi" if fast(text) is not None else "pymatgen"


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
    from crystalformer.config import default_settings
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


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<50}{'crystals/s':>11}{'ms/crystal':>12}{'cpu ms':>9}{'peak MiB':>10}"
        f"{'(start)':>9}  speed-up (wall, cpu)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        speedup = ""
        if "speedup" in row:
            speedup = f"{row['speedup']:>5.1f}x {row['speedup_cpu']:>5.1f}x vs {row['vs']}"
        print(
            f"{row['label']:<50}{row['crystals_per_s']:>11.1f}{row['ms_per_crystal']:>12.3f}"
            f"{row['cpu_ms_per_crystal']:>9.3f}{row['peak_rss_mib']:>10.0f}"
            f"{row['rss_before_mib']:>9.0f}  {speedup}"
        )
    print(
        "best of the repeats by wall clock (perf_counter); cpu ms: process CPU time, best repeat;"
        "\npeak MiB: peak RSS of the case's process (ru_maxrss); (start): the same before timing"
    )


def print_check(check: dict, agreement: dict) -> None:
    print(
        f"\ncorrectness on {check['crystals_checked']} accepted crystals "
        f"({len(check['rejected'])} rejected): neighbours within {REFERENCE_CUTOFF} Å vs "
        f"pymatgen get_neighbor_list on our stored cell: {check['neighbour_count_mismatches']} "
        f"mismatches, {check['boundary_ties']} boundary ties, largest distance difference "
        f"{check['max_distance_difference']:.2e} Å"
    )
    for example in check["mismatch_examples"]:
        print(f"  mismatch {example}")
    for raw_id, reason in check["rejected"][:5]:
        print(f"  rejected {raw_id}: {reason}")
    print(
        f"vs the reference's primitive standard cell: same atom count "
        f"{agreement['vs_reference_cell_same_atom_count']}/{agreement['vs_reference_cell_compared']}"
        f", same neighbour count {agreement['vs_reference_cell_same_neighbour_count']}"
        f"/{agreement['vs_reference_cell_compared']}"
    )


def print_gemmi(real: dict, findings: dict) -> None:
    print(
        f"\ngemmi vs pymatgen on the {real['crystals']} input CIFs: {real['different_sites']} "
        f"with different sites, largest position difference {real['max_position_difference']:.2e}"
        f" Å, {real['our_gemmi_path']} took our gemmi path, failures {real['failures']}"
    )
    sym = findings["symmetrised"]
    print(
        f"symmetrised (CifWriter symprec=0.01, {sym['non_p1']}/{sym['crystals']} non-P1): "
        f"{sym['different_sites']} with different sites, largest position difference "
        f"{sym['max_position_difference']:.2e} Å; gemmi {sym['gemmi_ms']:.3f} ms, pymatgen "
        f"{sym['pymatgen_ms']:.3f} ms per CIF"
    )
    print("partial occupancy and special positions (sites as read):")
    for name, outcome in findings["partial_occupancy"].items():
        path = f", our reader: {outcome['our_path']}" if "our_path" in outcome else ""
        sites = f"gemmi {outcome['gemmi_sites']}, pymatgen {outcome['pymatgen_sites']}"
        print(f"  {name}: {sites}{path}")
    print("malformed text:")
    for name, outcome in findings["malformed"].items():
        print(f"  {name} [{outcome['our_path']}]")
        for who in ("gemmi", "pymatgen", "ours"):
            print(f"      {who:<9}{outcome[who]}")


def print_profile(profile: dict) -> None:
    ms = profile["profiled_ms_per_crystal"]
    print(f"\nprofile of featurize_chunk on CIF text ({ms} ms/crystal under cProfile)")
    for label, stage in profile["stages"].items():
        print(f"  {label:<32}{stage['cum_ms']:>8.3f} ms  {stage['calls']:>6} calls/crystal")
    print(f"  top {PROFILE_TOP} by self time (ms per crystal):")
    for entry in profile["top_self_time"]:
        print(f"    {entry['self_ms']:>7.3f} self {entry['cum_ms']:>7.3f} cum  {entry['function']}")


def code_state() -> dict:
    """The commit benchmarked and the files that differed from it (read-only git calls)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": modified}


def machine_info() -> dict:
    import gemmi
    import pyarrow
    import spglib

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pymatgen": version("pymatgen"),
        "gemmi": gemmi.__version__,
        "spglib": spglib.__version__,
        "pyarrow": pyarrow.__version__,
        "threads_per_process": 1,
    }


if __name__ == "__main__":
    main()
