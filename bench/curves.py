"""The learning curves of bench/train.py runs in one plot, and a table of their figures.

    .venv/bin/python bench/curves.py [RESULT.json ...] [--out bench/results/learning_curves.png]

Without arguments: every bench/results/train*.json (one per encoder, same budget).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import RESULTS, Column, print_table  # bench/harness.py

TABLE = (
    Column("encoder", "<15", "encoder"),
    Column("parameters", ">11,", "parameters"),
    Column("crystals/s", ">12.1f", "crystals_per_s"),
    Column("minutes", ">9.1f", "minutes"),
    Column("epochs", ">8.2f", "epochs"),
    Column("val MAE", ">9.4f", "val_mae"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "learning_curves.png")
    args = parser.parse_args()
    runs = [
        json.loads(path.read_text()) for path in args.results or sorted(RESULTS.glob("train*.json"))
    ]
    if not runs:
        raise SystemExit("no bench/train.py results to plot")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    rows = []
    for run in runs:
        curve = run["curve"]
        encoder = run.get("encoder", "crystalformer")
        minutes = [p["train_seconds"] / 60 for p in curve]
        axis.plot(minutes, [p["val_mae"] for p in curve], "o-", ms=3, label=encoder)
        rows.append(
            {
                "encoder": encoder,
                "parameters": run.get("parameters", 0),
                "crystals_per_s": run["train_crystals_per_s"],
                "minutes": minutes[-1],
                "epochs": curve[-1]["epochs"],
                "val_mae": curve[-1]["val_mae"],
            }
        )
    print_table(TABLE, rows)
    unit = runs[0]["dataset"]["unit"]
    threads = runs[0]["machine"]["threads"]
    axis.set(
        xlabel=f"training wall time, min ({threads} CPU thread(s), batch 128)",
        ylabel=f"val MAE ({unit})",
        yscale="log",
        title=f"mp2018 {runs[0]['dataset']['target']}, same CPU budget",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
