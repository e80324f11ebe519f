"""Training throughput and a learning curve under a fixed wall-clock budget.

    .venv/bin/python bench/train.py [--budget-min 30] [--eval-every-min 2.5] [--threads 2]
                                    [--batch 128] [--target formation_energy_per_atom]
                                    [--device cpu|cuda] [--model-config crystalformer]
                                    [--out FILE]

The bundled `mp2018` dataset (featurised under DATA_ROOT/datasets/mp2018 first if it is not
yet; untimed), its MEGNet train split (27,188 labelled crystals) and its whole val split
(2,284), the paper's model (or another encoder of conf/model/, --model-config) and recipe
(conf/train/mp.yaml) except that SWA is off: the run stops when the budget is spent, long
before the 450th epoch where SWA would start. Output is flushed line by line. Every
--eval-every-min of training time the val MAE is measured (the evaluation's time is not
charged to the budget). Reported: training crystals/s (all training steps, and per complete
epoch), peak RSS (VmHWM), and val MAE against training wall time, also as a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import platform
import time
from pathlib import Path

import torch
from harness import RESULTS, code_state, command_line, rss_mib, utc_now, write_json

from crystalformer import conf
from crystalformer.datasets import dataset_folder
from crystalformer.train import Trainer, prepare_data


class BudgetSpent(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--eval-every-min", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--target", default="formation_energy_per_atom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", default="crystalformer", help="conf/model/ name or YAML")
    parser.add_argument("--out", type=Path, help="JSON results (default results/train.json, "
                        "or results/train-<encoder>.json for another encoder)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder, _ = dataset_folder("mp2018", conf.data_root(), progress=True)
    train_config = conf.train_config("mp")
    train_config.batch_size, train_config.swa_epochs = args.batch, 0
    model_config = conf.model_config(name=args.model_config)
    runtime = conf.runtime_config().with_options(device=args.device)
    encoder = model_config.encoder
    if args.out is None:
        suffix = "" if encoder == "crystalformer" else f"-{encoder}"
        args.out = RESULTS / f"train{suffix}.json"
    data = prepare_data(folder, args.target, train_config)
    checkpoints = conf.data_root() / "bench-train-checkpoints"
    trainer = Trainer(data, model_config, train_config, checkpoints, runtime=runtime)
    steps_per_epoch = len(trainer.batches(0))
    budget, every = args.budget_min * 60, args.eval_every_min * 60
    clock = {"train": 0.0, "since": time.perf_counter(), "next_eval": every, "crystals": 0}
    curve: list[dict] = []
    epochs: list[float] = []

    def evaluate() -> None:
        mae, _ = trainer.evaluate(trainer.model, "val")
        trainer.model.train()
        point = {
            "train_seconds": round(clock["train"], 1),
            "step": trainer.step,
            "epochs": round(trainer.step / steps_per_epoch, 3),
            "val_mae": mae,
        }
        curve.append(point)
        seconds, epoch = point["train_seconds"], point["epochs"]
        print(f"  {seconds:>7.0f} s  epoch {epoch:6.2f}  val MAE {mae:.4f}", flush=True)

    def after_step() -> None:
        now = time.perf_counter()
        clock["train"] += now - clock["since"]
        batch = (trainer.step - 1) % steps_per_epoch
        clock["crystals"] += len(trainer.batches(trainer.epoch)[batch])
        if trainer.step % steps_per_epoch == 0:
            epochs.append(clock["train"])
        if clock["train"] >= clock["next_eval"] or clock["train"] >= budget:
            evaluate()
            clock["next_eval"] += every
        if clock["train"] >= budget:
            raise BudgetSpent
        clock["since"] = time.perf_counter()

    trainer.after_step = after_step
    print(
        f"{encoder} ({trainer.model.num_parameters():,} parameters) on "
        f"mp2018 {args.target}: {data.splits['train'].num_rows} train, "
        f"{data.splits['val'].num_rows} val crystals; batch {args.batch}, {args.threads} threads, "
        f"{args.device}; budget {args.budget_min:g} min of training"
    )
    with contextlib.suppress(BudgetSpent):
        trainer.fit()
    rate = clock["crystals"] / clock["train"]
    ends = [0.0, *epochs]  # training seconds at each complete epoch's end
    epoch_rates = [data.splits["train"].num_rows / (b - a) for a, b in itertools.pairwise(ends)]
    result = {
        "benchmark": "bench/train.py",
        "command": command_line("train.py", [
            f"--budget-min {args.budget_min:g}", f"--threads {args.threads}",
            f"--batch {args.batch}", f"--device {args.device}",
            f"--model-config {args.model_config}"]),
        "encoder": encoder,
        "parameters": trainer.model.num_parameters(),
        "model_config": dataclasses.asdict(model_config),
        "runtime": dataclasses.asdict(runtime),
        "date": utc_now(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": args.threads, "device": args.device},
        "code": code_state(),
        "dataset": {"name": "mp2018", "target": args.target, "unit": data.unit,
                    **{f"n_{k}": t.num_rows for k, t in data.splits.items()}},
        "train_crystals_per_s": round(rate, 1),
        "epoch_crystals_per_s": [round(r, 1) for r in epoch_rates],
        "peak_rss_mib": round(rss_mib(), 1),
        "curve": curve,
        "paper_test_mae": 0.0186,
    }  # fmt: skip
    write_json(args.out, result)
    plot(curve, args, data.unit, encoder, args.out.with_suffix(".png"))
    print(
        f"\ntraining {rate:.1f} crystals/s ({args.threads} threads, batch {args.batch}); "
        f"complete epochs: {', '.join(f'{r:.1f}' for r in epoch_rates) or 'none'} crystals/s; "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB\n"
        f"val MAE after {clock['train'] / 60:.1f} min ({curve[-1]['epochs']:.2f} epochs): "
        f"{curve[-1]['val_mae']:.4f} {data.unit} (paper, 500 epochs + SWA, test: 0.0186)\n"
        f"wrote {args.out} and {args.out.with_suffix('.png')}"
    )


def plot(
    curve: list[dict], args: argparse.Namespace, unit: str | None, encoder: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p["train_seconds"] / 60 for p in curve], [p["val_mae"] for p in curve], "o-")
    axis.set(
        xlabel=f"training wall time, min ({args.threads} CPU threads, batch {args.batch})",
        ylabel=f"val MAE ({unit})",
        yscale="log",
        title=f"{encoder} on mp2018 {args.target}",
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
