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

The dense formulation (bench/dense.py) evaluates our model's weights the way the reference
implementation does without its CUDA kernels: every crystal's N² (i, j) pairs times a fixed
box of 125 images n ∈ [−2, 2]³ per pair, with the (pair, image) distances, logits and radial
basis materialised. The attention over j, the FFN and the pooling are our own code, so the
comparison isolates the image sums.

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
and operators (bench/model_checks.py). Processes, timing, memory and the report come from
bench/harness.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from dense import BOX, dense_batch_from_table  # bench/dense.py
from harness import (  # bench/harness.py
    RESULTS,
    Column,
    Session,
    load_inputs,
    machine_info,
    memory_gib,
    print_table,
    rss_mib,
    run_case_process,
    time_repeats,
)
from model_checks import (  # bench/model_checks.py
    correctness,
    load_model,
    print_check,
    print_profile,
    profile_ours,
)
from torch import nn

from crystalformer.model import Crystalformer, Runtime, build_model

SEED = 0


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
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "model.json", help="JSON results file"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.workdir)))
        return

    session = Session("model.py")
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
    print_figures(rows, args.batch)
    print(
        "parameters: " + ", ".join(f"{k} {m['num_parameters']:,}" for k, m in data["model"].items())
    )
    print_sizes(data["sizes"])
    if check:
        print_check(check)
    if profile:
        print_profile(profile)

    report = {
        **session.header(machine(args.device, args.threads)),
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
    }
    session.write(args.out, report)


def prepare_data(args: argparse.Namespace, workdir: Path) -> dict:
    """Featurise the crystals into workdir/table.parquet and freeze σ into workdir/model.pt."""
    from crystalformer.conf import default_settings
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


def new_variant(encoder: str, compiled_kernels: bool, device: str = "cpu") -> nn.Module:
    """The encoder of conf/model/<encoder>.yaml, seeded like ours."""
    from crystalformer.conf import model_config

    torch.manual_seed(SEED)
    model = build_model(model_config(name=encoder))
    return Runtime(device=device, compiled=compiled_kernels).prepare(model)


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


def spawn(name: str, workdir: Path, threads: int) -> dict:
    """Run one case in a fresh interpreter with `threads` threads; its JSON result."""
    return run_case_process("model.py", name, ["--workdir", str(workdir)], threads)


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


def time_case(case: Case, workdir: Path, options: dict) -> dict:
    device = torch.device(options["device"])
    cuda = device.type == "cuda"
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
    compiled_kernels = options["compiled_kernels"]
    model, dense = load_model(workdir, options["device"], compiled_kernels=compiled_kernels)
    if case.encoder:
        model = new_variant(case.encoder, compiled_kernels, options["device"])
        model.load_state_dict(torch.load(workdir / f"model-{case.encoder}.pt", weights_only=True))
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
    # the previous pass's kept outputs must not add to the peak
    timings = time_repeats(lambda: one_pass(batches), repeat, before=kept.clear)
    for name, tensor in kept.items():
        np.save(workdir / f"{case.name}-{name}.npy", tensor.detach().cpu().double().numpy())
    best = timings.best
    result = {
        "seconds": timings.wall[best],
        "cpu_seconds": timings.cpu[best],
        "all_seconds": timings.wall,
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


def print_figures(rows: list[dict], batch: int) -> None:
    columns = (
        Column("case", "<44", lambda row: row["label"].replace("batch B", f"batch {batch}")),
        Column("crystals/s", ">11.1f", "crystals_per_s"),
        Column("ms/crystal", ">11.2f", "ms_per_crystal"),
        Column("cpu ms", ">9.2f", "cpu_ms_per_crystal"),
        Column("peak MiB", ">10.0f", "peak_rss_mib"),
        Column("(start)", ">8.0f", "rss_start_mib"),
        Column("working", ">9.0f", "working_mib"),
        Column("  times faster, smaller peak, smaller working", "", ratios),
    )
    print_table(columns, rows, rule=True)
    print(
        "best timed pass by wall clock; cpu ms: process CPU time of that pass (all threads);\n"
        "peak MiB: peak RSS of the case's process (VmHWM); (start): RSS before the timed "
        "passes (model, batches,\nlibraries paged in by a one-crystal warm-up); working: peak "
        "minus (start); ratios against the case named"
    )


def ratios(row: dict) -> str:
    """Against the case named: times faster, smaller peak, smaller working memory (and GPU)."""
    text = ""
    if "speedup" in row:
        text = (
            f"{row['speedup']:>5.1f}x {row['peak_memory_ratio']:>5.1f}x "
            f"{row['working_memory_ratio']:>5.1f}x  vs {row['vs']}"
        )
    if "gpu_peak_mib" in row:  # torch.cuda.max_memory_allocated, and its ratio
        text += f"  GPU peak {row['gpu_peak_mib']:.0f} MiB"
        text += f" ({row['gpu_memory_ratio']:.1f}x)" if "gpu_memory_ratio" in row else ""
    return "  " + text


SIZES = (
    Column("crystals", "<22", lambda part: f"{part['name']} ({part['crystals']})"),
    Column("atoms mean", ">11.2f", "atoms_mean"),
    Column("max", ">6", "atoms_max"),
    Column("ours: images", ">14,", "images_ours"),
    Column("dense: pairs", ">14,", "pairs_dense"),
    Column("x 125 images", ">14,", "pair_images_dense"),
    Column(
        "  with images within r_cut beyond the box",
        "",
        lambda part: f"  {part['crystals_with_images_beyond_box']}",
    ),
)


def print_sizes(sizes: dict) -> None:
    print()
    print_table(SIZES, [{"name": name, **part} for name, part in sizes.items()])


def machine(device: str, threads: int) -> dict:
    """The machine, the libraries that do the work, torch's threads and the GPU if one ran."""
    info = machine_info(
        ("numpy", "pyarrow", "torch"),
        memory_gib=memory_gib(),
        torch_threads=threads,
        mkldnn=torch.backends.mkldnn.is_available(),
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":
    main()
