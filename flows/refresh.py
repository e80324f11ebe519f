"""Flow `refresh-data`: fetch every configured source and featurise it into its dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from crystalformer import config
from crystalformer.pipeline import dask_client, featurize_sources
from crystalformer.sources.errors import SourceUnavailable
from crystalformer.sources.materials_project import api_key_from_env
from crystalformer.sources.refresh import FetchSummary, refresh_jarvis, refresh_materials_project

SECRET_BLOCK = "mp-api-key"


@task(retries=2, retry_delay_seconds=30)
def fetch_materials_project(source: config.MaterialsProjectSource, raw: Path) -> Path | None:
    key = api_key_from_env() or _secret(SECRET_BLOCK)
    if not key:
        get_run_logger().info(
            "skipping materials_project: no MP_API_KEY in the environment and no Prefect "
            f"Secret block {SECRET_BLOCK!r}"
        )
        return None
    return _fetched("materials_project", lambda: refresh_materials_project(source, key, raw))


@task
def fetch_jarvis(source: config.JarvisSource, raw: Path) -> Path | None:
    return _fetched("jarvis", lambda: refresh_jarvis(source, raw))


def _fetched(name: str, fetch: Callable[[], FetchSummary]) -> Path | None:
    """Run a fetch; a source without network is skipped with a warning, not a failed flow."""
    logger = get_run_logger()
    try:
        summary = fetch()
    except SourceUnavailable as error:
        logger.warning(f"skipping {name}: no network or the download failed ({error})")
        return None
    logger.info(f"{name}: {summary.line()}")
    return summary.folder


@task
def featurize_dataset(name: str, out: Path, records: Path | None, scheduler: str | None) -> dict:
    """Featurise one dataset: a bundled snapshot by name, or a fetched records folder."""
    source = name if records is None else str(records)
    summary = featurize_sources([source], out, scheduler=scheduler, progress=False)
    get_run_logger().info(f"{name}: {summary.line()}")
    return {"dataset": name, **{k: v for k, v in summary.__dict__.items() if k != "out"}}


@flow(name="refresh-data", log_prints=True)
def refresh_data(
    sources: list[str] | None = None,
    datasets: list[str] | None = None,
    data_root: str | None = None,
    workers: int = 1,
) -> list[dict]:
    """Fetch and featurise each source of conf/sources.yaml into DATA_ROOT/datasets/<name>.

    `sources` picks among snapshots, materials_project and jarvis (default: all enabled);
    `datasets` overrides the snapshot list. A source with no credentials or no network is
    skipped with a log line. Re-running with nothing changed featurises nothing.
    """
    conf = config.sources_config()
    root = Path(data_root) if data_root else config.data_root()
    enabled = {
        "snapshots": conf.snapshots.enabled,
        "materials_project": conf.materials_project is not None and conf.materials_project.enabled,
        "jarvis": conf.jarvis is not None and conf.jarvis.enabled,
    }
    chosen = sources or [name for name, on in enabled.items() if on]
    unknown = set(chosen) - set(enabled)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; choose from {sorted(enabled)}")
    jobs: list[tuple[str, Path | None]] = []
    if "snapshots" in chosen:
        jobs += [(name, None) for name in datasets or conf.snapshots.datasets]
    if "materials_project" in chosen and conf.materials_project is not None:
        mp = conf.materials_project
        fetched = fetch_materials_project(mp, root / "raw" / mp.dataset)
        if fetched is not None:
            jobs.append((mp.dataset, fetched))
    if "jarvis" in chosen and conf.jarvis is not None:
        fetched = fetch_jarvis(conf.jarvis, root / "raw" / conf.jarvis.dataset)
        if fetched is not None:
            jobs.append((conf.jarvis.dataset, fetched))
    with dask_client(workers) as cluster:  # one cluster serves every dataset
        scheduler = cluster.scheduler.address if cluster is not None else None
        results = [
            featurize_dataset(name, root / "datasets" / name, records, scheduler)
            for name, records in jobs
        ]
    create_table_artifact(
        key="refresh-data-summary",
        table=results,
        description="Crystals featurised, skipped as unchanged, and rejected per dataset.",
    )
    return results


def _secret(name: str) -> str | None:
    """The value of a Prefect Secret block, or None when there is none."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError:
        return None


if __name__ == "__main__":
    refresh_data()
