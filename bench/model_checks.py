"""What bench/model.py checks besides speed: the same outputs as the dense formulation, and
where one training step of ours spends its time and memory.

The check compares eval-mode outputs of both formulations on the first batch (the float32
outputs the inference cases kept) and, on its first --subset crystals, in float64: the dense
box as is, cut at r_cut, and cut with |r| rounded to float32 as the shards store it. The
profile looks at one forward + backward of ours: what autograd saves, and torch.profiler's
stages and operators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from dense import BOX, DenseCrystalformer, dense_batch_from_table  # bench/dense.py
from torch import nn

from crystalformer.model import Crystalformer, Runtime, batch_from_table

PROFILE_TOP = 15
SAVED_TOP = 6
# Tolerances of the correctness check, relative (max |Δ| / max |ours|) over the first batch:
# the same sums in float64 agree to round-off; the dense box as benchmarked keeps images beyond
# r_cut, each weighing < e^-6.1 of its pair's nearest (docs/model.md §3).
CUT_TOLERANCE = 1e-10
TRUNCATION_TOLERANCE = math.exp(-6.1)


def load_model(
    workdir: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    compiled_kernels: bool = False,
) -> tuple[Crystalformer, DenseCrystalformer]:
    """Our model with the benchmark's frozen state, and the dense formulation sharing it;
    float32 without TF32 on CUDA, as the training recipe runs."""
    model = Runtime(device=device, compiled=compiled_kernels).prepare(Crystalformer())
    model.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    model.to(dtype=dtype)
    return model, DenseCrystalformer(model)


# --- correctness ----------------------------------------------------------------------------------


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


# --- reporting ------------------------------------------------------------------------------------


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
