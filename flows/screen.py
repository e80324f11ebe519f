"""Flow `screen`: the flow form of `crystalformer screen`, with Prefect artifacts.

The screening itself (featurise, predict on a Dask LocalCluster or an existing scheduler,
rank, report) is one library call; the flow publishes the top-K as a table artifact (numbers
rounded by unit, units in the headers, as in the report) and the run summary as a markdown
artifact whose models link to their MLflow pages and which links the report. With no
`rank_by`, the run ranks by lowest predicted e_above_hull when a model predicts it
(screen_run.default_ranking), else it is unranked and the table is titled as the first K by
id, not a top.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from crystalformer import conf
from crystalformer.ranking import passing_head
from crystalformer.report import column_units, readable_table, top_table
from crystalformer.screen import screen
from crystalformer.screen_run import RANKED, REPORT, RUN_FILE, ScreenOptions
from crystalformer.tracking import model_link


@flow(name="screen", log_prints=True)
def screen_flow(
    candidates: list[str],
    models: list[str],
    out: str,
    filter_expr: str | None = None,
    rank_by: str | None = None,
    pareto: str | None = None,
    top: int = ScreenOptions.top,
    workers: int = ScreenOptions.workers,
    scheduler: str | None = None,
    data_root: str | None = None,
) -> dict:
    """Screen `candidates` with `models` into `out` (resumable: a re-run skips what is done).

    `data_root` locates the default MLflow store that `models:/` and `runs:/` URIs refer to.
    The parameters are those of the `screen` deployment; the rest keep ScreenOptions' defaults.
    `rank_by` None: the default ranking (lowest predicted e_above_hull first, when a model
    predicts it).
    """
    options = ScreenOptions(
        candidates, models, Path(out), filter_expr=filter_expr, rank_by=rank_by,
        pareto=pareto, top=top, workers=workers, scheduler=scheduler, progress=False,
        root=Path(data_root) if data_root else None,
    )  # fmt: skip
    log = get_run_logger()
    summary = screen(options, report=log.info)
    log.info(summary.line())
    metadata = json.loads((options.out / RUN_FILE).read_text())
    best = top_table(passing_head(options.out / RANKED, top), top)
    best = readable_table(best, column_units(metadata))  # rounded, units in the headers
    create_table_artifact(
        key="screen-top",
        table=best.to_dict("records"),
        description=summary.ranking.table_title(top),
    )
    root = Path(data_root) if data_root else conf.data_root()
    models_md = ", ".join(model_link(uri, root) for uri in models)
    report = (options.out / REPORT).resolve()
    create_markdown_artifact(
        key="screen-summary",
        markdown=(
            f"**screen** {len(candidates)} candidate sources with {len(models)} models: "
            f"{models_md}\n\n{summary.line()}\n\nfilter: `{filter_expr}`, ranking: "
            f"{summary.ranking.describe()}, Pareto: `{pareto}`\n\n"
            f"report: [{report}]({report.as_uri()})"
        ),
        description="Result of the last screening run",
    )
    return {k: v for k, v in asdict(summary).items() if k != "out"}
