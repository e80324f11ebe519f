"""What a person reads after a screening run: an HTML page, and metrics against DFT labels.

`write_report` puts report.html in the run folder: run metadata, the top-K table (the first K
by id, and not called a top, when nothing ranks the run), a histogram of each predicted
property and a 2-D property map with the filter's survivors and the Pareto front (images
inlined, so the page travels as one file). `label_metrics` scores predictions
against labels the way a screening user reads them: MAE per property, and for stability
precision, recall, F1 and the discovery acceleration factor, overall and in the top K.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pandas as pd

from crystalformer import conf
from crystalformer.screen_run import (
    LABEL_METRICS,
    RANKED,
    REPORT,
    RUN_FILE,
    STD_SUFFIX,
    Ranking,
)

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after the headless backend is chosen)

N_MODELS_SUFFIX = "_n_models"


def predicted_properties(frame: pd.DataFrame) -> list[str]:
    return [c.removesuffix(N_MODELS_SUFFIX) for c in frame.columns if c.endswith(N_MODELS_SUFFIX)]


def top_table(ranked: pd.DataFrame, top: int) -> pd.DataFrame:
    """The first `top` rows that pass the filter (the best when the run is ranked), with the
    columns a person compares; Ranking.table_title names it."""
    properties = predicted_properties(ranked)
    spreads = [f"{p}{STD_SUFFIX}" for p in properties]
    spreads = [column for column in spreads if ranked[column].notna().any()]
    columns = ["rank", "id", "formula", "n_atoms", *properties, *spreads, "score", "in_training"]
    if "pareto_front" in ranked:
        columns.append("pareto_front")
    best = ranked[ranked["passes_filter"]].head(top)
    return best[[c for c in columns if c in best]]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def histograms(ranked: pd.DataFrame) -> str | None:
    properties = predicted_properties(ranked)
    if ranked.empty or not properties:
        return None
    figure, axes = plt.subplots(1, len(properties), figsize=(4 * len(properties), 3.2))
    for axis, name in zip(np.atleast_1d(axes), properties, strict=True):
        values = ranked[name].to_numpy(np.float64)
        values = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(values, bins=50) if len(values) else 50
        passing = ranked.loc[ranked["passes_filter"], name].to_numpy(np.float64)
        axis.hist(passing[np.isfinite(passing)], bins=bins, color="C1", label="passes the filter")
        axis.hist(values, bins=bins, histtype="step", color="C0", label="all")
        axis.set(xlabel=name, ylabel="candidates")
        axis.legend()
    figure.tight_layout()
    return _png(figure)


def property_map(ranked: pd.DataFrame, axes_columns: list[str], top: int) -> str | None:
    """Two properties against each other: all candidates, the filter's survivors, the top K
    (when `top` > 0: only a ranked run has one) and the Pareto front."""
    if ranked.empty or len(axes_columns) < 2:
        return None
    x, y = axes_columns[:2]
    figure, axis = plt.subplots(figsize=(6, 5))
    axis.scatter(ranked[x], ranked[y], s=4, color="0.75", label="all")
    passing = ranked[ranked["passes_filter"]]
    axis.scatter(passing[x], passing[y], s=6, color="C0", label="passes the filter")
    if top:
        best = passing.head(top)
        axis.scatter(best[x], best[y], s=16, color="C3", label=f"top {len(best)}")
    if "pareto_front" in ranked:
        front = ranked[ranked["pareto_front"]].sort_values(x)
        axis.plot(front[x], front[y], "k.-", linewidth=1, label="Pareto front")
    axis.set(xlabel=x, ylabel=y)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def map_axes(ranked: pd.DataFrame, pareto: str | None) -> list[str]:
    if pareto:
        return [part.split(":")[0].strip() for part in pareto.split(",")]
    return predicted_properties(ranked)[:2]


def write_report(
    ranked: pd.DataFrame, metadata: dict, out: Path, top: int = 50, metrics: dict | None = None
) -> None:
    """report.html in `out`: metadata, label metrics if any, top-K, histograms, property map."""
    ranking = Ranking.of_run(metadata)
    highlighted = top if ranking.ranked else 0
    images = {
        "Predicted properties": histograms(ranked),
        "Property map": property_map(ranked, map_axes(ranked, metadata.get("pareto")), highlighted),
    }
    parts = [
        "<!doctype html><meta charset='utf-8'><title>crystalformer screening report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style>",
        "<h1>Screening report</h1>",
        "<h2>Run</h2><pre>" + html.escape(json.dumps(metadata, indent=1)) + "</pre>",
    ]
    if metrics:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in metrics.items()
        )
        parts.append(f"<h2>Against DFT labels</h2><table>{rows}</table>")
    parts += [
        f"<h2>{html.escape(ranking.table_title(top))}</h2>",
        top_table(ranked, top).to_html(index=False, float_format=lambda v: f"{v:.4g}"),
    ]
    for title, image in images.items():
        if image is not None:
            parts.append(f"<h2>{title}</h2><img src='data:image/png;base64,{image}'>")
    (out / REPORT).write_text("\n".join(parts))


def label_metrics(
    ranked: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    stability: str = "e_above_hull",
    threshold: float = 0.1,
    top: int = 100,
) -> dict[str, float]:
    """Predictions against DFT labels (columns named like the properties, joined on `id`).

    `mae_<property>` for every property with labels; when `stability` is predicted and
    labelled, a crystal is stable when its value is <= `threshold`: precision, recall and
    F1 of the predicted-stable set, the stable fraction, the discovery acceleration factor
    (precision / stable fraction), and the same precision and DAF among the top K ranked
    (left out when `top` is 0: a run nothing ranks has no top K).
    """
    joined = ranked.merge(labels, on="id", suffixes=("", "_label"))
    metrics: dict[str, float] = {"labelled": float(len(joined))}
    for name in predicted_properties(ranked):
        if f"{name}_label" in joined:
            error = (joined[name] - joined[f"{name}_label"]).abs()
            metrics[f"mae_{name}"] = float(error.mean())
    if f"{stability}_label" not in joined or joined.empty:
        return metrics
    known = joined[joined[f"{stability}_label"].notna()]
    truly = known[f"{stability}_label"].to_numpy() <= threshold
    predicted = known[stability].to_numpy() <= threshold
    hits = float((truly & predicted).sum())
    precision = hits / predicted.sum() if predicted.any() else float("nan")
    recall = hits / truly.sum() if truly.any() else float("nan")
    stable_fraction = float(truly.mean())
    metrics.update(
        stable_fraction=stable_fraction,
        precision=precision,
        recall=recall,
        f1=2 * precision * recall / (precision + recall) if hits else 0.0,
        daf=precision / stable_fraction if stable_fraction else float("nan"),
    )
    if top:
        ranked_known = known[known["rank"].notna()].sort_values("rank").head(top)
        top_precision = float((ranked_known[f"{stability}_label"] <= threshold).mean())
        metrics.update(
            top_k=float(len(ranked_known)),
            top_k_precision=top_precision,
            top_k_daf=top_precision / stable_fraction if stable_fraction else float("nan"),
        )
    return metrics


def read_labels(path: Path, id_column: str = "id") -> pd.DataFrame:
    """A labels table (CSV, CSV.gz, Parquet), or a featurised dataset folder's targets."""
    from crystalformer.shards import Manifest, read_dataset

    path = Path(path)
    manifest = Manifest.load(path) if path.is_dir() else None
    if manifest is not None:
        return read_dataset(path, ["id", *manifest.targets]).to_pandas()
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if id_column not in frame:
        raise KeyError(f"{path} has no id column {id_column!r} (columns: {list(frame.columns)})")
    return frame.rename(columns={id_column: "id"}).astype({"id": str})


def evaluate_run(
    results: Path,
    labels: Path,
    *,
    stability: str = "e_above_hull",
    threshold: float = 0.1,
    top: int = 100,
    id_column: str = "id",
    root: Path | None = None,
) -> dict[str, float]:
    """`crystalformer report`: label metrics into label_metrics.json, the report and MLflow."""
    from crystalformer.tracking import experiment_id, use_tracking

    results = Path(results)
    if not (results / RANKED).exists():
        raise FileNotFoundError(f"{results}: no {RANKED}; run crystalformer screen first")
    ranked = pd.read_parquet(results / RANKED)
    metadata = json.loads((results / RUN_FILE).read_text())
    label_frame = read_labels(labels, id_column)
    ranked_top = top if Ranking.of_run(metadata).ranked else 0
    metrics = label_metrics(
        ranked, label_frame, stability=stability, threshold=threshold, top=ranked_top
    )
    settings = {"labels": str(labels), "stability": stability, "threshold": threshold, "top": top}
    (results / LABEL_METRICS).write_text(json.dumps({**settings, **metrics}, indent=1))
    write_report(ranked, metadata, results, metadata.get("top", 50), metrics)
    root = root or conf.data_root()
    client = use_tracking(root)
    experiment = experiment_id(client, "screening", root)
    with mlflow.start_run(experiment_id=experiment, run_name=f"labels-{results.resolve().name}"):
        mlflow.log_params({**settings, "results": str(results.resolve())})
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_artifact(str(results / REPORT))
    return metrics
