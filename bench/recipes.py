"""Training recipes compared per CPU-hour: validation MAE against CPU time for finished runs.

    .venv/bin/python bench/recipes.py NAME=RUN_ID [NAME=RUN_ID ...] [--threads 1]
                                      [--out bench/results/recipes.json]

Each RUN_ID is a finished `crystalformer train` run in the MLflow store under the data root,
trained alone on this machine with --threads torch threads. Its per-epoch history (training
seconds, val MAE, learning rate) comes from its checkpoint's state, the reported (SWA) val
MAE from its metrics. CPU time is training wall time × threads (evaluation excluded). Writes
the curves and a table to --out and one plot beside it (.png).
"""

from __future__ import annotations

import argparse
import json
from itertools import accumulate
from pathlib import Path

from harness import RESULTS, Column, Session, machine_info, print_table

from crystalformer import conf
from crystalformer.tracking import download_model, reported_mae, use_tracking
from crystalformer.train import STATE_INFO

TABLE = (
    Column("recipe", "<22", "recipe"),
    Column("schedule", "<13", "schedule"),
    Column("lr", ">8.1e", "lr"),
    Column("batch", ">6", "batch_size"),
    Column("epochs", ">7", "epochs"),
    Column("CPU min", ">8.1f", "cpu_minutes"),
    Column("best val MAE", ">13.4f", "best_val_mae"),
    Column("reported", ">9.4f", "reported_val_mae"),
    Column("test MAE", ">9.4f", "test_mae"),
)


def recipe_run(name: str, run_id: str, threads: int) -> dict:
    """One run's recipe, its curve against CPU minutes and its final figures."""
    root = conf.data_root()
    run = use_tracking(root).get_run(run_id)
    state = json.loads(
        (download_model(f"runs:/{run_id}/checkpoint", root) / STATE_INFO).read_text()
    )
    history = state["history"]
    minutes = list(accumulate(epoch["seconds"] * threads / 60 for epoch in history))
    recipe = state["train_config"]
    metrics = run.data.metrics
    return {
        "recipe": name,
        "run_id": run_id,
        "dataset": run.data.params["dataset"],
        "target": run.data.params["target"],
        "unit": run.data.params["unit"],
        "lr": recipe["lr"],
        "batch_size": recipe["batch_size"],
        "schedule": recipe.get("schedule", "inverse_sqrt"),
        "epochs": len(history),
        "cpu_minutes": minutes[-1],
        "best_val_mae": min(epoch["val_mae"] for epoch in history),
        "reported_val_mae": reported_mae(metrics),
        "test_mae": metrics.get("test_mae_swa", metrics.get("test_mae", float("nan"))),
        "curve": [
            {
                "epoch": epoch["epoch"],
                "cpu_minutes": m,
                "val_mae": epoch["val_mae"],
                "lr": epoch["lr"],
            }
            for epoch, m in zip(history, minutes, strict=True)
        ],  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_ID")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "recipes.json")
    args = parser.parse_args()
    session = Session("recipes.py")
    runs = [recipe_run(*spec.split("=", 1), args.threads) for spec in args.runs]
    print_table(TABLE, runs, rule=True)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for run in runs:
        curve = run["curve"]
        axis.plot([p["cpu_minutes"] for p in curve], [p["val_mae"] for p in curve], "-",
                  label=f"{run['recipe']} (reported {run['reported_val_mae']:.4f})")  # fmt: skip
    first = runs[0]
    axis.set(
        xlabel=f"training CPU minutes ({args.threads} thread(s) × wall time)",
        ylabel=f"val MAE ({first['unit']})",
        yscale="log",
        title=f"{first['dataset']} {first['target']}: recipes per CPU time",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    report = session.header(machine_info(["torch"], threads=args.threads))
    session.write(args.out, {**report, "runs": runs})


if __name__ == "__main__":
    main()
