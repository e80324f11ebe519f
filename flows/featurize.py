"""Flow `featurize`: featurise files, folders or registered datasets into one dataset folder."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from crystalformer.datasets import featurize_sources


@flow(name="featurize", log_prints=True)
def featurize(sources: list[str], out: str, workers: int = 1, scheduler: str | None = None) -> dict:
    """The flow form of `crystalformer featurize SOURCE... --out DIR`."""
    log = get_run_logger()
    summary = featurize_sources(
        sources, Path(out), workers=workers, scheduler=scheduler, progress=False, report=log.info
    )
    log.info(summary.line())
    create_markdown_artifact(
        key="featurize-summary",
        markdown=f"**featurize** `{' '.join(sources)}`\n\n{summary.line()}",
        description="Result of the last featurize run",
    )
    return {k: v for k, v in summary.__dict__.items() if k != "out"}
