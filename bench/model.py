"""Crystalformer speed and memory: our sparse image lists against a dense formulation.

    .venv/bin/python bench/model.py [--crystals 256] [--batch 128] [--repeat 3]
                                    [--dense-repeat 1] [--threads 1] [--device cpu|cuda]
                                    [--subset 32] [--compile] [--compiled-kernels]
                                    [--encoders crystalformer,crystalframer,sitenet]
                                    [--encoders-only] [--out FILE] [--no-profile]

Real crystals: the first --crystals accepted rows of the mp2018 validation file, featurised
with the default settings (conf/featurize.yaml) into one shard table, untimed. One model with
the paper's defaults (seed 0) has its σ normalisation frozen by a training forward on the
first batch; every case loads that same state, so both formulations use the same weights and
buffers.

The dense formulation (`DenseCrystalformer`, below) evaluates our model's weights the way the
reference implementation does without its CUDA kernels: every crystal's N² (i, j) pairs,
concatenated over the batch with no padding (as the reference's `edges` are), times a fixed
box of 125 images n ∈ [−2, 2]³ per pair, with the (pair, image) distances, the (pair, head,
image) logits and the (pair, image, K) radial basis materialised; α is a log-sum-exp over the
125 images and β the softmax-weighted basis (a batched matmul) times W_h. The attention over
j, the FFN and the pooling are our own code, so the comparison isolates the image sums.

Cases, each in a fresh process (peak RSS: the process's VmHWM):

    ours-train      forward + backward (L1 loss), training mode, the first batch of --batch
    dense-train     the same with the dense formulation
    ours-infer      no_grad forward, eval mode, the same batch
    dense-infer
    ours-infer-b1   no_grad forward one crystal at a time, the batch's first --subset
    dense-infer-b1
    ours-epoch      forward + backward over all --crystals in file order, batches of --batch
    ours-sorted     the same crystals sorted by atom count into batches (bucketing)

With --encoders, each named encoder (conf/model/<name>.yaml, seed 0, σ frozen like ours) also
runs <name>-train and <name>-infer on the first batch, listed with its parameter count
(--encoders-only: just these, no dense cases, check or profile).

Batches are built before timing (ours: from the stored image lists; dense: pair indices and
the cells; the 125-image distances are computed inside the timed forward, as the reference
does). A pass is one batch, one sweep of single crystals, or one epoch. Each case warms up
on one crystal (with --compile, also on the first batch; shapes met later may still compile
inside the timed passes), then runs --repeat timed passes and keeps the best; dense cases
run --dense-repeat passes, 1 by default: a dense batch of 128 takes about a minute here, and
the default run is meant to stay near five minutes. One torch thread by default, per-core
figures as in bench/featurize.py: on this shared two-core machine two threads gave erratic
times (a process on the other core stalls the OpenMP team).

Then a correctness check (the inference cases' float32 outputs on the first batch; ours
against the dense box, as is and cut at r_cut, in float64 on its first --subset) and
a profile of one forward + backward of ours: what autograd saves, and torch.profiler's stages
and operators.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from harness import code_state, load_inputs  # bench/harness.py
from torch import nn

from crystalformer.model import Crystalformer, Runtime, batch_from_table, build_model
from crystalformer.model.batch import TensorBatch
from crystalformer.model.layers import segment_softmax

BOX = 2  # the dense formulation's images: n ∈ [−BOX, BOX]³, 125 per pair
SEED = 0
PROFILE_TOP = 15
SAVED_TOP = 6
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "model.json"
# Tolerances of the correctness check, relative (max |Δ| / max |ours|) over the first batch:
# the same sums in float64 agree to round-off; the dense box as benchmarked keeps images beyond
# r_cut, each weighing < e^-6.1 of its pair's nearest (MODEL.md §1).
CUT_TOLERANCE = 1e-10
TRUNCATION_TOLERANCE = math.exp(-6.1)


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    formulation: str  # "ours" or "dense"
    mode: str  # "train": forward + backward; "infer": no_grad forward
    crystals: str  # "first": the first batch; "single": its first --subset, one at a time;
    # "all": every crystal in file order; "sorted": every crystal sorted by size
    reference: str | None = None  # the case it is compared with
    encoder: str | None = None  # a conf/model/ encoder (variant cases); None: the model above


CASES = (
    Case("ours-train", "ours: forward+backward, batch B", "ours", "train", "first", "dense-train"),
    Case("dense-train", "dense: forward+backward, batch B", "dense", "train", "first"),
    Case("ours-infer", "ours: inference, batch B", "ours", "infer", "first", "dense-infer"),
    Case("dense-infer", "dense: inference, batch B", "dense", "infer", "first"),
    Case("ours-infer-b1", "ours: inference, batch 1", "ours", "infer", "single", "dense-infer-b1"),
    Case("dense-infer-b1", "dense: inference, batch 1", "dense", "infer", "single"),
    Case("ours-epoch", "ours: forward+backward, all, file order", "ours", "train", "all"),
    Case(
        "ours-sorted", "ours: forward+backward, all, sorted by size", "ours", "train", "sorted",
        "ours-epoch",
    ),
)  # fmt: skip


# --- the driver ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crystals", type=int, default=256, help="crystals (default 256)")
    parser.add_argument("--batch", type=int, default=128, help="crystals per batch (128)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per case (best kept)")
    parser.add_argument("--dense-repeat", type=int, default=1, help="timed passes, dense cases")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--subset", type=int, default=32, help="crystals for batch 1 and the float64 check (32)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action="store_true", help="torch.compile both formulations")
    parser.add_argument(
        "--compiled-kernels",
        action="store_true",
        help="ours with compiled kernels (torch.compile'd pair and image work, as "
        "conf/runtime.yaml sets)",
    )
    parser.add_argument(
        "--encoders", default="", help="also time these conf/model/ encoders, comma-separated"
    )
    parser.add_argument("--encoders-only", action="store_true", help="only the --encoders cases")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.workdir)))
        return

    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        workdir = Path(tmp)
        data = prepare_data(args, workdir)
        print(
            f"{data['crystals']} crystals from {data['file']}, batch {args.batch}, "
            f"{args.threads} threads, device {args.device}{', compiled' if args.compile else ''};"
            f" best of {args.repeat} passes ({args.dense_repeat} for dense)\n"
        )
        cases = all_cases(vars(args))
        runs = {case.name: spawn(case.name, workdir, args.threads) for case in cases}
        check = None if args.encoders_only else spawn("check", workdir, args.threads)
        profile = None
        if not (args.no_profile or args.encoders_only):
            profile = spawn("profile", workdir, args.threads)

    rows = figures(cases, runs, data["model"])
    print_table(rows, args.batch)
    print(
        "parameters: " + ", ".join(f"{k} {m['num_parameters']:,}" for k, m in data["model"].items())
    )
    print_sizes(data["sizes"])
    if check:
        print_check(check)
    if profile:
        print_profile(profile)

    report = {
        "benchmark": "bench/model.py",
        "command": " ".join([".venv/bin/python", "bench/model.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(args.device, args.threads),
        "code": code_state(),
        "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        "file": data["file"],
        "crystals": data["crystals"],
        "batch": args.batch,
        "repeat": args.repeat,
        "dense_repeat": args.dense_repeat,
        "subset": args.subset,
        "threads": args.threads,
        "device": args.device,
        "compile": args.compile,
        "compiled_kernels": args.compiled_kernels,
        "encoders": args.encoders,
        "settings": data["settings"],
        "model": data["model"],
        "dense_formulation": {
            "images_per_pair": (2 * BOX + 1) ** 3,
            "box": [-BOX, BOX],
            "pairs": "all N² (i, j) per crystal, concatenated over the batch, no padding",
            "materialised": [
                "(pair, image) distances",
                "(pair, head, image) logits",
                "(pair, image, K) radial basis",
            ],
        },
        "memory": (
            "peak resident set size of the case's own process (VmHWM); working = "
            "peak minus the resident set before the timed passes (model and batches built, "
            "one-crystal warm-up done)"
        ),
        "timing": (
            "best of the timed passes by wall clock (perf_counter), after a one-crystal warm-up"
        ),
        "cases": rows,
        "structure_sizes": data["sizes"],
        "check": check,
        "profile": profile,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\nwrote {args.out} ({report['wall_seconds']} s in all; load average "
        f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs)"
    )


def prepare_data(args: argparse.Namespace, workdir: Path) -> dict:
    """Featurise the crystals into workdir/table.parquet and freeze σ into workdir/model.pt."""
    from crystalformer.config import default_settings
    from crystalformer.featurize import featurize_chunk
    from crystalformer.shards import rows_to_table

    if args.crystals < args.batch:
        raise SystemExit(f"--crystals {args.crystals} is fewer than one batch of {args.batch}")
    settings = default_settings()
    raws, file = load_inputs("mp2018", args.crystals + 64)  # a few spare for rejects
    result = featurize_chunk(raws, settings)
    rows = result.rows[: args.crystals]
    if len(rows) < args.crystals:
        raise SystemExit(f"only {len(rows)} of {args.crystals} crystals featurised from {file}")
    table = rows_to_table(rows, [], settings)
    pq.write_table(table, workdir / "table.parquet")

    torch.manual_seed(SEED)
    model = Crystalformer()
    model.check_cutoff(settings.r_cut)
    freeze_sigma(model, table.slice(0, args.batch))
    torch.save(model.state_dict(), workdir / "model.pt")
    options = {name: getattr(args, name) for name in WORKER_OPTIONS}
    (workdir / "options.json").write_text(json.dumps(options))
    models = {None: model}
    for encoder in encoder_names(options):
        models[encoder] = variant = new_variant(encoder, options["compiled_kernels"])
        freeze_sigma(variant, table.slice(0, args.batch))
        torch.save(variant.state_dict(), workdir / f"model-{encoder}.pt")
    described = {
        name or "ours": {
            "encoder": m.config.encoder,
            "config": {f.name: getattr(m.config, f.name) for f in fields(m.config)},
            "num_parameters": m.num_parameters(),
            "seed": SEED,
            "sigma_frozen_on": f"a training forward on the first {args.batch} crystals",
        }
        for name, m in models.items()
    }
    return {
        "file": file,
        "crystals": len(rows),
        "settings": {"r_cut": settings.r_cut, "cell": settings.cell, "symprec": settings.symprec},
        "model": described,
        "sizes": sizes(table, args.batch, args.subset),
    }


def freeze_sigma(model: nn.Module, table: pa.Table) -> None:
    """A training forward without gradients: fixes σ normalisation where a model has one."""
    model.train()
    with torch.no_grad():
        model(model.make_batch(table))


def encoder_names(options: dict) -> list[str]:
    return [name for name in options["encoders"].split(",") if name]


def new_variant(encoder: str, compiled_kernels: bool) -> nn.Module:
    """The encoder of conf/model/<encoder>.yaml on the CPU, seeded like ours."""
    from crystalformer.config import model_config

    torch.manual_seed(SEED)
    model = build_model(model_config(name=encoder))
    return Runtime(device="cpu", compiled=compiled_kernels).prepare(model)


def all_cases(options: dict) -> list[Case]:
    """The cases a run times: ours against dense (unless encoders only), then each encoder."""
    variants = [
        Case(f"{encoder}-{mode}", f"{encoder}: {label}, batch B", "ours", mode, "first",
             encoder=encoder)
        for encoder in encoder_names(options)
        for mode, label in (("train", "forward+backward"), ("infer", "inference"))
    ]  # fmt: skip
    return variants if options["encoders_only"] else [*CASES, *variants]


def sizes(table: pa.Table, batch: int, subset: int) -> dict:
    """Atoms, stored images and dense (pair, image) entries: first batch, subset, all."""
    n = table["n_atoms"].to_numpy().astype(np.int64)
    images = np.array([len(x) for x in table["image_dist"].to_numpy(zero_copy_only=False)])
    shifts = table["image_shift"].to_numpy(zero_copy_only=False)
    beyond = np.array([bool(len(s)) and int(np.abs(s).max()) > BOX for s in shifts])

    def describe(part: slice) -> dict:
        return {
            "crystals": len(n[part]),
            "atoms_mean": round(float(n[part].mean()), 2),
            "atoms_max": int(n[part].max()),
            "atoms_total": int(n[part].sum()),
            "images_ours": int(images[part].sum()),
            "pairs_dense": int((n[part] ** 2).sum()),
            "pair_images_dense": int((n[part] ** 2).sum()) * (2 * BOX + 1) ** 3,
            "crystals_with_images_beyond_box": int(beyond[part].sum()),
        }

    return {
        "first_batch": describe(slice(0, batch)),
        "subset": describe(slice(0, min(subset, batch))),
        "all": describe(slice(None)),
    }


WORKER_OPTIONS = (  # what every case process reads from options.json
    "batch",
    "repeat",
    "dense_repeat",
    "subset",
    "threads",
    "device",
    "compile",
    "compiled_kernels",
    "encoders",
    "encoders_only",
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def spawn(name: str, workdir: Path, threads: int) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    done = subprocess.run(
        [*command, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env={**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))},
    )
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  ran {name}", file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the cases (each in its own process) --------------------------------------------------------


def run_worker(name: str, workdir: Path) -> dict:
    options = json.loads((workdir / "options.json").read_text())
    torch.set_num_threads(options["threads"])
    if name == "check":
        return correctness(workdir, options)
    if name == "profile":
        return profile_ours(workdir, options)
    case = next((c for c in all_cases(options) if c.name == name), None)
    if case is None:
        raise SystemExit(f"unknown case {name!r}")
    return time_case(case, workdir, options)


def load_model(
    workdir: Path,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    compiled_kernels: bool = False,
) -> tuple[Crystalformer, DenseCrystalformer]:
    """Our model with the benchmark's frozen state, and the dense formulation sharing it."""
    model = Runtime(device="cpu", compiled=compiled_kernels).prepare(Crystalformer())
    model.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    model.to(device=device, dtype=dtype)
    return model, DenseCrystalformer(model)


def time_case(case: Case, workdir: Path, options: dict) -> dict:
    device = torch.device(options["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as in the training recipe
        torch.backends.cudnn.allow_tf32 = False
    table = pq.read_table(workdir / "table.parquet")
    size = options["batch"]
    if case.crystals == "sorted":
        order = np.argsort(table["n_atoms"].to_numpy(), kind="stable")
        table = table.take(order)
    if case.crystals in ("all", "sorted"):
        parts = [table.slice(s, size) for s in range(0, table.num_rows, size)]
    elif case.crystals == "single":
        parts = [table.slice(s, 1) for s in range(min(options["subset"], size))]
    else:
        parts = [table.slice(0, size)]
    model, dense = load_model(workdir, device, compiled_kernels=options["compiled_kernels"])
    if case.encoder:
        model = new_variant(case.encoder, options["compiled_kernels"])
        model.load_state_dict(torch.load(workdir / f"model-{case.encoder}.pt", weights_only=True))
        model.to(device)
    make_batch = model.make_batch if case.formulation == "ours" else dense_batch_from_table
    batches = [make_batch(part).to(device) for part in parts]
    # warm-up: one crystal (lazy initialisation: libraries paged in, kernels, thread pool); a
    # compiled module also runs the first batch (compilation for its shapes)
    warmup_batches = [make_batch(parts[0].slice(0, 1)).to(device)]
    if options["compile"] or (options["compiled_kernels"] and case.formulation == "ours"):
        warmup_batches.append(batches[0])
    module = model if case.formulation == "ours" else dense
    forward: Callable = torch.compile(module, dynamic=True) if options["compile"] else module
    train = case.mode == "train"
    module.train(train)
    parameters = list(model.parameters())
    kept = {}
    if case.crystals == "first" and not train and not case.encoder:  # the check compares these
        model.head.register_forward_hook(
            lambda _, inputs, output: kept.update(encoded=inputs[0], output=output)
        )

    def step(batch) -> None:
        if train:
            forward(batch).abs().mean().backward()  # L1 against zero targets
            for parameter in parameters:
                parameter.grad = None
        else:
            with torch.no_grad():
                forward(batch)

    def one_pass(batches: list) -> None:
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)

    del table, parts
    gc.collect()
    rss_setup_peak = rss_mib()
    start = time.perf_counter()
    one_pass(warmup_batches)
    warmup = time.perf_counter() - start
    warmup_crystals = sum(b.n_crystals for b in warmup_batches)
    del warmup_batches
    kept.clear()
    gc.collect()
    rss_start, rss_before = rss_mib("VmRSS"), rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    repeat = options["dense_repeat" if case.formulation == "dense" else "repeat"]
    seconds, cpu_seconds = [], []
    for _ in range(repeat):
        kept.clear()  # the previous pass's outputs must not add to the peak
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        one_pass(batches)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    for name, tensor in kept.items():
        np.save(workdir / f"{case.name}-{name}.npy", tensor.detach().cpu().double().numpy())
    best = int(np.argmin(seconds))
    result = {
        "seconds": seconds[best],
        "cpu_seconds": cpu_seconds[best],
        "all_seconds": seconds,
        "warmup_seconds": warmup,
        "warmup_crystals": warmup_crystals,
        "n": sum(b.n_crystals for b in batches),
        "batches": len(batches),
        "rss_setup_peak_mib": rss_setup_peak,
        "rss_start_mib": rss_start,
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss_mib(),
    }
    if cuda:
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set size (VmHWM), or the current one (VmRSS), in MiB.

    Not getrusage's ru_maxrss: that survives execve, so a case process would start from the
    driver's own peak (measured here: a child of an 800 MB parent reports 800 MB).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


# --- the dense formulation ----------------------------------------------------------------------


@dataclass
class DenseBatch(TensorBatch):
    """All N² (i, j) pairs of each crystal, concatenated; the cells to place 125 images per pair."""

    n_crystals: int
    species_atom: torch.Tensor  # (S,) as in CrystalBatch
    species_z: torch.Tensor  # (S,)
    species_occupancy: torch.Tensor  # (S,)
    atom_crystal: torch.Tensor  # (A,)
    positions: torch.Tensor  # (A, 3) Cartesian, Å
    lattice: torch.Tensor  # (C, 3, 3) rows = lattice vectors
    shifts: torch.Tensor  # (R, 3) the image box n ∈ [−BOX, BOX]³
    edge_i: torch.Tensor  # (E,) attending atom (global index), E = Σ N²
    edge_j: torch.Tensor  # (E,) attended atom
    edge_crystal: torch.Tensor  # (E,)
    # correctness check only: drop images beyond r_cut and round |r| to float32, as ours store it
    r_cut: float | None = None
    stored_precision: bool = False


def dense_batch_from_table(
    table: pa.Table,
    dtype: torch.dtype = torch.float32,
    r_cut: float | None = None,
    stored_precision: bool = False,
) -> DenseBatch:
    """A dense batch from shard rows: the stored cell's positions and lattice, no image lists."""
    # species and atoms as ours, every atom (the dense formulation knows no equivalent
    # atoms); its images are dropped
    atoms = batch_from_table(table.drop_columns(["equivalent_atom"]), dtype)
    n = table["n_atoms"].to_numpy().astype(np.int64)
    atom_offsets = np.r_[0, np.cumsum(n)[:-1]]
    edge_crystal = np.repeat(np.arange(len(n)), n**2)
    edge_offsets = np.r_[0, np.cumsum(n**2)]
    i, j = np.divmod(np.arange(len(edge_crystal)) - edge_offsets[edge_crystal], n[edge_crystal])
    box = np.arange(-BOX, BOX + 1)
    shifts = np.stack(np.meshgrid(box, box, box, indexing="ij"), -1).reshape(-1, 3)

    def values(column: str, shape: tuple[int, ...]) -> torch.Tensor:
        flat = pc.list_flatten(table[column]).to_numpy()
        return torch.tensor(flat.reshape(shape), dtype=dtype)

    return DenseBatch(
        n_crystals=len(n),
        species_atom=atoms.species_atom,
        species_z=atoms.species_z,
        species_occupancy=atoms.species_occupancy,
        atom_crystal=atoms.atom_crystal,
        positions=values("positions", (-1, 3)),
        lattice=values("lattice", (-1, 3, 3)),
        shifts=torch.from_numpy(shifts).to(dtype),
        edge_i=torch.from_numpy(atom_offsets[edge_crystal] + i),
        edge_j=torch.from_numpy(atom_offsets[edge_crystal] + j),
        edge_crystal=torch.from_numpy(edge_crystal),
        r_cut=r_cut,
        stored_precision=stored_precision,
    )


class DenseCrystalformer(nn.Module):
    """Our Crystalformer's weights, evaluated on all N² pairs × 125 images of every crystal."""

    def __init__(self, model: Crystalformer):
        super().__init__()
        self.model = model  # shared: the same parameters and buffers

    def pair_image_dist_sq(self, batch: DenseBatch) -> torch.Tensor:
        """|p_j + nL − p_i|² for every pair and image, (E, R)."""
        offsets = batch.shifts @ batch.lattice  # (C, R, 3)
        delta = batch.positions[batch.edge_j] - batch.positions[batch.edge_i]  # (E, 3)
        r = delta[:, None, :] + offsets[batch.edge_crystal]  # (E, R, 3)
        dist_sq = r.square().sum(-1)
        if batch.stored_precision:  # shards store |r| as float32
            dist_sq = dist_sq.sqrt().float().to(dist_sq.dtype).square()
        return dist_sq

    def radial_basis(self, dist_sq: torch.Tensor) -> torch.Tensor:
        """b(|r|) per pair and image, (E, R, K), built in place as the reference builds it."""
        rbf = self.model.rbf
        basis = dist_sq.sqrt()[..., None] - rbf.centres
        return basis.div_(rbf.width).square_().mul_(-0.5).exp_()

    def encode(self, batch: DenseBatch) -> torch.Tensor:
        """One vector per crystal, (C, dim), as Crystalformer.encode computes it."""
        model = self.model
        atoms = model.embed.weight.T[batch.species_z - 1] * batch.species_occupancy[:, None]
        x = atoms.new_zeros(len(batch.atom_crystal), model.config.dim)
        x = x.index_add(0, batch.species_atom, atoms)
        dist_sq = self.pair_image_dist_sq(batch)
        basis = self.radial_basis(dist_sq) if model.rbf is not None else None
        outside = dist_sq > batch.r_cut**2 if batch.r_cut is not None else None
        for block in model.blocks:
            x = x + dense_attention(block.attention, x, batch, dist_sq, basis, outside)
            x = x + block.ffn(x)
        counts = torch.bincount(batch.atom_crystal, minlength=batch.n_crystals).clamp_min(1)
        pooled = x.new_zeros(batch.n_crystals, x.shape[1]).index_add(0, batch.atom_crystal, x)
        return pooled / counts[:, None].to(x.dtype)

    def forward(self, batch: DenseBatch) -> torch.Tensor:
        return self.model.head(self.encode(batch))


def dense_attention(
    attention: nn.Module,
    x: torch.Tensor,
    batch: DenseBatch,
    dist_sq: torch.Tensor,
    basis: torch.Tensor | None,
    outside: torch.Tensor | None,
) -> torch.Tensor:
    """A PeriodicAttention's weights with α and β summed over the 125 images of every pair."""
    h, d = attention.config.n_heads, attention.config.head_dim
    q = attention.query(x).view(-1, h, d)
    k = attention.key(x).view(-1, h, d)
    v = attention.value(x).view(-1, h, d)
    sigma = attention.sigma(q)  # (A, H), the same frozen normalisation as ours
    scale = (0.5 / sigma.square())[batch.edge_i]  # (E, H)
    logits = -dist_sq[:, None, :] * scale[:, :, None]  # (E, H, R)
    if outside is not None:
        logits = logits.masked_fill(outside[:, None, :], -torch.inf)
    alpha = torch.logsumexp(logits, dim=-1)  # (E, H)
    scores = (q[batch.edge_i] * k[batch.edge_j]).sum(-1) / math.sqrt(d) + alpha
    weights = segment_softmax(scores, batch.edge_i, len(x))  # over j, for each i
    message = v[batch.edge_j]  # (E, H, D)
    if basis is not None:
        w = torch.softmax(logits, dim=-1)  # (E, H, R)
        if outside is not None:  # a pair with every image beyond r_cut: no term, as in ours
            w = w.nan_to_num(0.0)
        weighted = torch.bmm(w, basis)  # (E, H, R) @ (E, R, K) -> (E, H, K)
        message = message + torch.einsum("ehk,hdk->ehd", weighted, attention.edge)
    y = torch.zeros_like(q).index_add_(0, batch.edge_i, weights[:, :, None] * message)
    return attention.out(y.reshape(-1, h * d))


# --- correctness ---------------------------------------------------------------------------------


def correctness(workdir: Path, options: dict) -> dict:
    """Eval-mode encodings and outputs of both formulations.

    On the first batch, float32 as timed (the outputs the inference cases kept): ours against
    the dense box, so round-off plus truncation: images within the box but beyond r_cut, which
    ours drop, and images within r_cut beyond the box, which the dense box drops. On its first
    --subset crystals, in float64: the dense box as is (truncation alone), cut at r_cut, and cut
    at r_cut with |r| rounded to float32 as the shards store it, where the sums are the same
    and crystals inside the box must agree to round-off; and ours float32 against float64.
    """
    table = pq.read_table(workdir / "table.parquet").slice(0, options["batch"])
    r_cut = float(table.schema.metadata[b"r_cut"])
    shifts = table["image_shift"].to_numpy(zero_copy_only=False)
    beyond = np.array([bool(len(s)) and int(np.abs(s).max()) > BOX for s in shifts])
    ids = table["id"].to_pylist()

    def kept(case: str) -> dict:
        return {part: np.load(workdir / f"{case}-{part}.npy") for part in ("encoded", "output")}

    def outputs(module: nn.Module, batch) -> dict:
        encoded = module.encode(batch)
        return {"encoded": encoded.numpy(), "output": model.head(encoded).numpy()}

    ours32 = kept("ours-infer")
    n = min(options["subset"], table.num_rows)
    subset = table.slice(0, n)
    model, dense = load_model(workdir, "cpu", torch.float64)
    model.eval()
    with torch.no_grad():
        ours64 = outputs(model, batch_from_table(subset, torch.float64))
        dense64 = {
            name: outputs(dense, dense_batch_from_table(subset, torch.float64, **options_))
            for name, options_ in (
                ("float64_box", {}),
                ("float64_cut_at_r_cut", {"r_cut": r_cut}),
                ("float64_cut_stored_precision", {"r_cut": r_cut, "stored_precision": True}),
            )
        }
    out = {
        "crystals": table.num_rows,
        "float64_crystals": n,
        "r_cut": r_cut,
        "crystals_with_images_beyond_box": [ids[c] for c in np.flatnonzero(beyond)],
        "relative": "max |Δ| / max |ours| over the crystals compared (encoded: all 128 values "
        "of every crystal; output: the standardised predictions of the untrained model)",
        "output_range": [float(ours32["output"].min()), float(ours32["output"].max())],
        "float32_box": compare(ours32, kept("dense-infer"), beyond),
        **{name: compare(ours64, values, beyond[:n]) for name, values in dense64.items()},
        "float32_roundoff": compare(ours64, {k: v[:n] for k, v in ours32.items()}, beyond[:n]),
        "tolerance": {
            "float64_cut_stored_precision": CUT_TOLERANCE,
            "float32_box": TRUNCATION_TOLERANCE,
            "rule": "relative, over the crystals whose images within r_cut lie inside the box",
        },
    }
    out["passed"] = bool(
        all(
            out[name][part]["inside_box_relative"] <= tolerance
            for name, tolerance in out["tolerance"].items()
            if name != "rule"
            for part in ("encoded", "output")
        )
    )
    return out


def compare(ours: dict, other: dict, beyond: np.ndarray) -> dict:
    return {part: difference(ours[part], other[part], beyond) for part in ours}


def difference(ours: np.ndarray, other: np.ndarray, beyond: np.ndarray) -> dict:
    """Max abs and relative difference, over all crystals and over those inside the box."""
    ours, other = ours.astype(np.float64), other.astype(np.float64)
    delta = np.abs(ours - other).reshape(len(ours), -1)
    scale = float(np.abs(ours).max()) or 1.0
    per_crystal = delta.max(axis=1)
    inside = per_crystal[~beyond] if (~beyond).any() else np.zeros(1)
    return {
        "max_abs": float(per_crystal.max()),
        "relative": float(per_crystal.max()) / scale,
        "inside_box_max_abs": float(inside.max()),
        "inside_box_relative": float(inside.max()) / scale,
        "worst_crystal_beyond_box": bool(beyond[int(per_crystal.argmax())]),
    }


# --- profile -------------------------------------------------------------------------------------


FORWARD_STAGES = ("image_log_weights", "segment_softmax", "_gathered_dot", "_scatter_product")


def profile_ours(workdir: Path, options: dict) -> dict:
    """One forward + backward of ours on the first batch (training mode), looked at twice.

    First with every tensor autograd saves for backward tallied by shape (each storage once);
    this step also warms up. Then under torch.profiler, with the model module's α, β and
    softmax functions wrapped in record_function (in this process only) for stage totals.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from crystalformer.model import crystalformer as module

    table = pq.read_table(workdir / "table.parquet").slice(0, options["batch"])
    batch = batch_from_table(table)
    model, _ = load_model(workdir, "cpu")
    model.train()
    saved: dict[tuple, list] = {}
    storages: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages:
            storages.add(storage.data_ptr())
            entry = saved.setdefault(tuple(tensor.shape), [0, 0])
            entry[0] += 1
            entry[1] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch).abs().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss

    for name in FORWARD_STAGES:
        if hasattr(module, name):
            setattr(module, name, labelled(getattr(module, name), name, record_function))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function("forward"):
            loss = model(batch).abs().mean()
        with record_function("backward"):
            loss.backward()
    events = profiler.key_averages()
    ms = 1e-3  # profiler times are in µs
    stages = {
        e.key: {"cpu_ms": round(e.cpu_time_total * ms, 1), "calls": e.count}
        for e in events
        if e.key in ("forward", *FORWARD_STAGES, "backward")
    }
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    largest = sorted(saved.items(), key=lambda item: item[1][1], reverse=True)[:SAVED_TOP]
    return {
        "saved_for_backward_mib": round(sum(v[1] for v in saved.values()) / 2**20, 1),
        "saved_largest": [
            {"shape": list(shape), "tensors": count, "mib": round(size / 2**20, 1)}
            for shape, (count, size) in largest
        ],
        "stages": stages,
        "top_self_cpu": [
            {
                "op": e.key,
                "self_cpu_ms": round(e.self_cpu_time_total * ms, 1),
                "cpu_total_ms": round(e.cpu_time_total * ms, 1),
                "calls": e.count,
            }
            for e in top
        ],
    }


def labelled(function: Callable, name: str, record_function) -> Callable:
    def wrapped(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return wrapped


# --- reporting ----------------------------------------------------------------------------------


def figures(cases: list[Case], runs: dict, models: dict) -> list[dict]:
    rows = []
    for case in cases:
        run = runs[case.name]
        rate = run["n"] / run["seconds"]
        row = {
            "case": case.name,
            "parameters": models[case.encoder or "ours"]["num_parameters"],
            "label": case.label,
            "formulation": case.formulation,
            "mode": case.mode,
            "crystals": case.crystals,
            "n": run["n"],
            "batches": run["batches"],
            "seconds": round(run["seconds"], 4),
            "all_seconds": [round(x, 4) for x in run["all_seconds"]],
            "warmup_seconds": round(run["warmup_seconds"], 3),
            "warmup_crystals": run["warmup_crystals"],
            "cpu_ms_per_crystal": round(1e3 * run["cpu_seconds"] / run["n"], 3),
            "crystals_per_s": round(rate, 2),
            "ms_per_crystal": round(1e3 / rate, 3),
            "peak_rss_mib": round(run["peak_rss_mib"], 1),
            "rss_before_mib": round(run["rss_before_mib"], 1),
            "rss_start_mib": round(run["rss_start_mib"], 1),
            "working_mib": round(run["peak_rss_mib"] - run["rss_start_mib"], 1),
        }
        if "cuda_peak_allocated_mib" in run:
            row["gpu_peak_mib"] = round(run["cuda_peak_allocated_mib"], 1)
        if case.reference:
            ref = runs[case.reference]
            row["vs"] = case.reference
            row["speedup"] = round(rate / (ref["n"] / ref["seconds"]), 2)
            row["peak_memory_ratio"] = round(ref["peak_rss_mib"] / run["peak_rss_mib"], 2)
            row["working_memory_ratio"] = round(
                (ref["peak_rss_mib"] - ref["rss_start_mib"])
                / max(run["peak_rss_mib"] - run["rss_start_mib"], 1.0),
                2,
            )
            if "cuda_peak_allocated_mib" in run:
                row["gpu_memory_ratio"] = round(
                    ref["cuda_peak_allocated_mib"] / max(run["cuda_peak_allocated_mib"], 1.0), 2
                )
        rows.append(row)
    return rows


def print_table(rows: list[dict], batch: int) -> None:
    header = (
        f"{'case':<44}{'crystals/s':>11}{'ms/crystal':>11}{'cpu ms':>9}{'peak MiB':>10}"
        f"{'(start)':>8}{'working':>9}  times faster, smaller peak, smaller working"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = ""
        if "speedup" in row:
            ratio = (
                f"{row['speedup']:>5.1f}x {row['peak_memory_ratio']:>5.1f}x "
                f"{row['working_memory_ratio']:>5.1f}x  vs {row['vs']}"
            )
        gpu = ""
        if "gpu_peak_mib" in row:  # torch.cuda.max_memory_allocated, and its ratio
            gpu = f"  GPU peak {row['gpu_peak_mib']:.0f} MiB"
            gpu += f" ({row['gpu_memory_ratio']:.1f}x)" if "gpu_memory_ratio" in row else ""
        print(
            f"{row['label'].replace('batch B', f'batch {batch}'):<44}"
            f"{row['crystals_per_s']:>11.1f}{row['ms_per_crystal']:>11.2f}"
            f"{row['cpu_ms_per_crystal']:>9.2f}{row['peak_rss_mib']:>10.0f}"
            f"{row['rss_start_mib']:>8.0f}{row['working_mib']:>9.0f}  {ratio}{gpu}"
        )
    print(
        "best timed pass by wall clock; cpu ms: process CPU time of that pass (all threads);\n"
        "peak MiB: peak RSS of the case's process (VmHWM); (start): RSS before the timed "
        "passes (model, batches,\nlibraries paged in by a one-crystal warm-up); working: peak "
        "minus (start); ratios against the case named"
    )


def print_sizes(sizes: dict) -> None:
    print(
        f"\n{'crystals':<22}{'atoms mean':>11}{'max':>6}{'ours: images':>14}"
        f"{'dense: pairs':>14}{'x 125 images':>14}  with images within r_cut beyond the box"
    )
    for name, part in sizes.items():
        print(
            f"{name + ' (' + str(part['crystals']) + ')':<22}{part['atoms_mean']:>11.2f}"
            f"{part['atoms_max']:>6}{part['images_ours']:>14,}{part['pairs_dense']:>14,}"
            f"{part['pair_images_dense']:>14,}  {part['crystals_with_images_beyond_box']}"
        )


def print_check(check: dict) -> None:
    beyond = len(check["crystals_with_images_beyond_box"])
    print(
        f"\ncorrectness, eval mode, first {check['crystals']} crystals ({beyond} with images "
        f"within r_cut = {check['r_cut']:.4f} A beyond the [-2,2]^3 box):\n"
        "  max |difference| (relative to max |ours|): all crystals; crystals inside the box"
    )
    n = check["float64_crystals"]
    labels = {
        "float32_box": f"dense box, float32, all {check['crystals']}",
        "float64_box": f"dense box, float64, first {n}",
        "float64_cut_at_r_cut": "dense box cut at r_cut, float64",
        "float64_cut_stored_precision": "  and |r| rounded to float32",
        "float32_roundoff": "ours float32 vs float64",
    }
    for name, label in labels.items():
        text = "   ".join(
            f"{part} {f['max_abs']:.1e} ({f['relative']:.1e}); {f['inside_box_max_abs']:.1e} "
            f"({f['inside_box_relative']:.1e})"
            for part, f in check[name].items()
        )
        print(f"  {label:<36}{text}")
    tolerance = check["tolerance"]
    print(
        f"  tolerance (relative, inside the box): cut with |r| rounded "
        f"{tolerance['float64_cut_stored_precision']:.0e}, float32 box e^-6.1 = "
        f"{tolerance['float32_box']:.1e} -> {'passed' if check['passed'] else 'FAILED'}"
    )


def print_profile(profile: dict) -> None:
    print(
        f"\nprofile of ours, one forward+backward on the first batch\n  saved for backward: "
        f"{profile['saved_for_backward_mib']} MiB; largest by shape (tensors, MiB):"
    )
    for entry in profile["saved_largest"]:
        print(f"    {str(tuple(entry['shape'])):<20}{entry['tensors']:>5}{entry['mib']:>9.1f}")
    print("  profiled stages (cpu ms, calls):")
    for name, stage in profile["stages"].items():
        print(f"    {name:<26}{stage['cpu_ms']:>9.1f}{stage['calls']:>6}")
    print(f"  top {PROFILE_TOP} operators by self CPU time (ms):")
    for e in profile["top_self_cpu"]:
        print(
            f"    {e['self_cpu_ms']:>8.1f} self {e['cpu_total_ms']:>8.1f} total "
            f"{e['calls']:>5} calls  {e['op']}"
        )


def machine_info(device: str, threads: int) -> dict:
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
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":
    main()
