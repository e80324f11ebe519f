"""Accuracy of the shipped models on data they were not tuned on.

    .venv/bin/python bench/accuracy.py [--out bench/results/accuracy.json]

For every model in models/: the MAE of its weights, recomputed here, on the validation and
test crystals of its own split (`split.parquet`; the card's figures were measured during
training and must agree), beside the MAE of predicting the training median and the paper's
figure where it reports one. Then the MPTS-52 time split (its validation part, the bundled
`mpts52` dataset): MAE of formation energy and e_above_hull against DFT, and the discovery
metrics of ranking by predicted e_above_hull (stable: ≤ 0 and ≤ 0.1 eV/atom; precision, recall, F1,
discovery acceleration factor overall and among the top 100) on the crystals outside the
stability model's train and val splits, with how many MPTS-52 crystals each model saw in
training (structures shared with a training split inflate its figures).
Datasets are featurised under DATA_ROOT/datasets on first use (untimed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from harness import RESULTS, Column, Session, machine_info, print_table

from crystalformer import conf, load_model, pretrained
from crystalformer.datasets import dataset_folder
from crystalformer.predict import LoadedModel, predict_table
from crystalformer.report import label_metrics
from crystalformer.shards import read_dataset

# Crystalformer (ICLR 2024), test MAE on the splits its paper uses (not ours: for scale).
PAPER_TEST_MAE = {
    "formation_energy_per_atom": 0.0186,
    "band_gap": 0.198,
    "log10_bulk_modulus_vrh": 0.0377,
    "log10_shear_modulus_vrh": 0.0689,
}
STABLE = (0.0, 0.1)  # eV/atom above the hull: on it, and near enough to be made


def predictions(model: LoadedModel, folder: Path, ids: list[str] | None = None) -> pd.DataFrame:
    """id, label and prediction of a single-target model on a featurised dataset's crystals
    (those of `ids` only, when given)."""
    (name,) = model.targets
    table = read_dataset(folder)
    if ids is not None:
        table = table.filter(pc.is_in(table["id"], pa.array(ids, pa.string())))
    predicted = predict_table(model.model, table)[:, 0]
    return pd.DataFrame(
        {"id": table["id"].to_pylist(), "label": table[name].to_numpy(zero_copy_only=False),
         "predicted": predicted}
    )  # fmt: skip


def mae(frame: pd.DataFrame) -> float:
    known = frame.dropna(subset=["label"])
    return float((known["predicted"] - known["label"]).abs().mean())


def own_splits(name: str, root: Path) -> dict:
    """The model's MAE on its validation and test crystals, and the training median's."""
    model = load_model(name)
    card = model.card
    split = pd.read_parquet(pretrained.MODELS_DIR / name / "split.parquet")
    folder, _ = dataset_folder(card["dataset"], root)
    labels = read_dataset(folder, ["id", name]).to_pandas().merge(split, on="id")
    median = float(labels.loc[labels["split"] == "train", name].median())
    held_out = split.loc[split["split"].isin(["val", "test"]), "id"].tolist()
    frame = predictions(model, folder, held_out).merge(split[["id", "split"]], on="id")
    row = {"model": name, "dataset": card["dataset"], "unit": card["unit"]}
    for part in ("val", "test"):
        chosen = frame[frame["split"] == part]
        row[f"{part}_crystals"] = int(chosen["label"].notna().sum())
        row[f"{part}_mae"] = mae(chosen) if len(chosen) else None
        row[f"{part}_mae_median"] = (
            float((chosen["label"] - median).abs().mean()) if len(chosen) else None
        )
        row[f"card_{part}_mae"] = card.get(f"{part}_mae")
    row["paper_test_mae"] = PAPER_TEST_MAE.get(name)
    return row


def mpts52(names: list[str], root: Path) -> dict:
    """MPTS-52 (validation part) against DFT, ranked by predicted e_above_hull."""
    folder, _ = dataset_folder("mpts52", root)
    ids = read_dataset(folder, ["id"])["id"].to_pylist()
    ranked = pd.DataFrame({"id": ids})
    labels = read_dataset(folder, ["id", "e_above_hull", "formation_energy_per_atom"])
    per_model = {}
    for name in names:
        frame = predictions(load_model(name), folder)
        ranked[name] = frame["predicted"].to_numpy()
        split = pd.read_parquet(pretrained.MODELS_DIR / name / "split.parquet")
        seen = np.isin(ids, split.loc[split["split"] == "train", "id"])
        per_model[name] = {
            "in_training_split": int(seen.sum()),
            "mae": mae(frame),
            "mae_not_in_training": mae(frame[~seen]),
        }
    if "e_above_hull" not in names:
        return {"crystals": len(ids), "models": per_model}
    # Discovery is scored on the crystals the stability model was neither trained nor
    # selected on (outside its train and val splits: all of MPTS-52 for a model trained on
    # other data, its own test part for one trained on mpts52).
    split = pd.read_parquet(pretrained.MODELS_DIR / "e_above_hull" / "split.parquet")
    tuned = split.loc[split["split"].isin(["train", "val"]), "id"]
    held_out = ranked[~ranked["id"].isin(tuned)].copy()
    held_out["rank"] = held_out["e_above_hull"].rank(method="first")
    stability = {
        f"stable_at_{threshold}": label_metrics(
            held_out, labels.to_pandas(), stability="e_above_hull", threshold=threshold, top=100
        )
        for threshold in STABLE
    }
    return {"crystals": len(ids), "models": per_model, "discovery_crystals": len(held_out),
            **stability}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    args = parser.parse_args()
    session = Session("accuracy.py")
    root = conf.data_root()
    names = pretrained.pretrained_names()
    rows = [own_splits(name, root) for name in names]
    print_table(
        [
            Column("model", "<28", "model"),
            Column("dataset", "<16", "dataset"),
            Column("val", ">5", "val_crystals"),
            Column("val MAE", ">9.4f", "val_mae"),
            Column("median", ">8.4f", "val_mae_median"),
            Column("test", ">6", lambda r: r["test_crystals"] or "-"),
            Column("test MAE", ">10", lambda r: f"{r['test_mae']:.4f}" if r["test_mae"] else "-"),
            Column("paper", ">8", lambda r: r["paper_test_mae"] or "-"),
        ],
        rows,
        rule=True,
    )
    time_split = mpts52(
        [n for n in ("formation_energy_per_atom", "e_above_hull") if n in names], root
    )
    print("\nMPTS-52 (validation part):")
    for key, value in time_split.items():
        if isinstance(value, dict) and key.startswith("stable_at_"):
            value = {k: round(float(v), 4) for k, v in value.items()}
        print(f"  {key}: {round(value, 4) if isinstance(value, float) else value}")
    report = session.header(machine_info(["torch"]))
    session.write(args.out, {**report, "models": rows, "mpts52": time_split})


if __name__ == "__main__":
    main()
