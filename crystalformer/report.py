"""What a person reads after a screening run: an HTML page, and metrics against DFT labels.

`write_report` puts report.html in the run folder: a summary of the run (models, inputs,
filter, ranking, counts, times), the top-K table (the first K by id, and not called a top,
when nothing ranks the run) with numbers rounded to what their unit is worth and units in the
headers, a histogram of each predicted property and a 2-D property map with the filter's
survivors and the Pareto front (images inlined, so the page travels as one file).
`label_metrics` scores predictions against labels the way a screening user reads them: MAE
per property, and for stability precision, recall, F1 and the discovery acceleration factor,
overall and in the top K.
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
from crystalformer.ranking import report_sample, rows_with_ids
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
UNSEEN = "unseen_"  # prefixes the label metrics of the candidates no model was trained on


def predicted_properties(frame: pd.DataFrame) -> list[str]:
    return [c.removesuffix(N_MODELS_SUFFIX) for c in frame.columns if c.endswith(N_MODELS_SUFFIX)]


# --- numbers as a person reads them ----------------------------------------------------------

# The decimals a value is worth in its unit: DFT energies are good to about a meV/atom, band
# gaps to about 10 meV, log10 moduli to about 1 %, moduli to 0.1 GPa. Other units: 4 digits.
DECIMALS = {"eV/atom": 3, "eV": 2, "log10 GPa": 3, "GPa": 1}


def column_units(metadata: dict) -> dict[str, str]:
    """The unit of each result column a run's models predict (the property, its ensemble
    spread) and of the score when it is one property's value; runs whose screen.json
    predates units give none."""
    units = {
        name: unit
        for model in metadata.get("models", [])
        for name, unit in (model.get("units") or {}).items()
        if unit
    }
    units |= {f"{name}{STD_SUFFIX}": unit for name, unit in units.items()}
    score_of = (Ranking.of_run(metadata).rank_by or "").strip().lstrip("+-").strip()
    if score_of in units:
        units["score"] = units[score_of]
    return units


def format_value(value: object, unit: str | None) -> str:
    """A number rounded to what its unit is worth; missing as a dash, others as they are."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if not isinstance(value, int | float | np.number):
        return "–" if value is None or value is pd.NA else str(value)
    if not np.isfinite(value):
        return "–"
    if isinstance(value, int | np.integer):
        return str(value)
    if unit in DECIMALS:
        return f"{round(float(value), DECIMALS[unit]) + 0.0:.{DECIMALS[unit]}f}"  # no "-0.000"
    return f"{value:.4g}"


def with_units(name: str, units: dict[str, str]) -> str:
    """A column header: `e_above_hull (eV/atom)`."""
    return f"{name} ({units[name]})" if name in units else name


def readable_table(table: pd.DataFrame, units: dict[str, str]) -> pd.DataFrame:
    """`table` as text a person reads: rounded by unit, units in the headers."""
    return pd.DataFrame(
        {
            with_units(name, units): [format_value(v, units.get(name)) for v in table[name]]
            for name in table.columns
        }
    )


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


def histograms(ranked: pd.DataFrame, units: dict[str, str]) -> str | None:
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
        axis.set(xlabel=f"predicted {with_units(name, units)}", ylabel="candidates")
        axis.legend()
    figure.tight_layout()
    return _png(figure)


def property_map(
    ranked: pd.DataFrame, axes_columns: list[str], top: int, units: dict[str, str]
) -> str | None:
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
    axis.set(xlabel=with_units(x, units), ylabel=with_units(y, units))
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def map_axes(ranked: pd.DataFrame, pareto: str | None) -> list[str]:
    if pareto:
        return [part.split(":")[0].strip() for part in pareto.split(",")]
    return predicted_properties(ranked)[:2]


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def run_summary(metadata: dict) -> list[tuple[str, str]]:
    """The run in (heading, text) rows: models, inputs, filter, ranking, counts, times."""
    units = column_units(metadata)
    models = [
        f"{model['uri']}: {', '.join(with_units(t, units) for t in model['targets'])}; "
        f"trained on {model.get('training_crystals', '?')} crystals; weights "
        f"{model.get('weights_sha256', '?')[:12]}"
        for model in metadata.get("models", [])
    ]
    seconds = float(metadata.get("seconds", 0.0))
    screened = int(metadata.get("screened", 0))
    counts = f"{screened} screened"
    if "passed_filter" in metadata:
        counts += f", {metadata['passed_filter']} pass the filter"
    counts += f", {metadata.get('rejected', 0)} rejected (see each feature folder's rejects)"
    shards = (
        f"{metadata.get('shards_done', 0)} written, "
        f"{metadata.get('shards_skipped', 0)} reused from an earlier run"
    )
    rate = f"{screened / seconds:.0f} crystals/s" if seconds else "–"
    return [
        ("Models", "\n".join(models) or "–"),
        ("Candidates", "\n".join(metadata.get("candidates", [])) or "–"),
        ("Filter", metadata.get("filter") or "none: every candidate passes"),
        ("Ranking", Ranking.of_run(metadata).describe()),
        ("Pareto front", metadata.get("pareto") or "none"),
        ("Counts", counts),
        ("Result shards", shards),
        ("Time", f"{duration(seconds)} ({rate}), finished {metadata.get('finished', '?')}"),
        ("Version", f"crystalformer {metadata.get('library_version', '?')}"),
    ]


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v).replace(chr(10), '<br>')}</td></tr>"
        for k, v in rows
    )
    return f"<table class='summary'>{cells}</table>"


def write_report(
    ranked: pd.DataFrame, metadata: dict, out: Path, top: int = 50, metrics: dict | None = None
) -> None:
    """report.html in `out`: the run summary, label metrics if any, top-K, histograms and
    the property map; the raw screen.json folded away at the end."""
    ranking = Ranking.of_run(metadata)
    units = column_units(metadata)
    highlighted = top if ranking.ranked else 0
    images = {
        "Predicted properties": histograms(ranked, units),
        "Property map": property_map(
            ranked, map_axes(ranked, metadata.get("pareto")), highlighted, units
        ),
    }
    parts = [
        "<!doctype html><meta charset='utf-8'><title>crystalformer screening report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}"
        ".summary th,.summary td{text-align:left;vertical-align:top}img{max-width:100%}</style>",
        "<h1>Screening report</h1>",
        "<h2>Run</h2>" + _table(run_summary(metadata)),
    ]
    if metrics:
        parts.append("<h2>Against DFT labels</h2>" + _table(metric_rows(metrics, units)))
    parts += [
        f"<h2>{html.escape(ranking.table_title(top))}</h2>",
        readable_table(top_table(ranked, top), units).to_html(index=False),
    ]
    for title, image in images.items():
        if image is not None:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{image}'>")
    parts.append(
        "<details><summary>screen.json</summary><pre>"
        + html.escape(json.dumps(metadata, indent=1))
        + "</pre></details>"
    )
    (out / REPORT).write_text("\n".join(parts))


def metric_rows(metrics: dict[str, float], units: dict[str, str]) -> list[tuple[str, str]]:
    """Label metrics as rows: MAEs in their property's unit, counts whole, fractions to 3."""
    rows = []
    for key, value in metrics.items():
        name = key.removeprefix(UNSEEN)
        where = ", not in training" if key.startswith(UNSEEN) else ""
        prop = name.removeprefix("mae_")
        if name.startswith("mae_"):
            heading, text = f"MAE {with_units(prop, units)}", format_value(value, units.get(prop))
        elif name in ("labelled", "top_k"):
            heading, text = name.replace("_", " "), format_value(int(value), None)
        else:
            heading, text = name.replace("_", " "), f"{value:.3f}" if np.isfinite(value) else "–"
        rows.append((heading + where, text))
    return rows


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
    (left out when `top` is 0: a run nothing ranks has no top K). When some labelled
    candidates were in a model's training split (`in_training`), the same metrics of the
    others follow, prefixed `unseen_`: the figures to judge the models by. `ranked` needs
    only the labelled rows (rows_with_ids).
    """
    metrics = _label_metrics(ranked, labels, stability, threshold, top)
    if "in_training" in ranked and ranked["in_training"].any():
        unseen = ranked[~ranked["in_training"].astype(bool)]
        metrics |= {
            f"{UNSEEN}{k}": v
            for k, v in _label_metrics(unseen, labels, stability, threshold, top).items()
        }
    return metrics


def _label_metrics(
    ranked: pd.DataFrame, labels: pd.DataFrame, stability: str, threshold: float, top: int
) -> dict[str, float]:
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
    metadata = json.loads((results / RUN_FILE).read_text())
    label_frame = read_labels(labels, id_column)
    labelled = rows_with_ids(results / RANKED, label_frame["id"])
    ranked_top = top if Ranking.of_run(metadata).ranked else 0
    metrics = label_metrics(
        labelled, label_frame, stability=stability, threshold=threshold, top=ranked_top
    )
    settings = {"labels": str(labels), "stability": stability, "threshold": threshold, "top": top}
    (results / LABEL_METRICS).write_text(json.dumps({**settings, **metrics}, indent=1))
    report_top = metadata.get("top", 50)
    sample = report_sample(results / RANKED, report_top)
    write_report(sample, metadata, results, report_top, metrics)
    root = root or conf.data_root()
    client = use_tracking(root)
    experiment = experiment_id(client, "screening", root)
    with mlflow.start_run(experiment_id=experiment, run_name=f"labels-{results.resolve().name}"):
        mlflow.log_params({**settings, "results": str(results.resolve())})
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_artifact(str(results / REPORT))
    return metrics
