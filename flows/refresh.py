"""Flow `refresh-data`: fetch every configured source and featurise it into its dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from crystalformer.datasets import dask_client, featurize_sources
from crystalformer.sources.base import REGISTRY, RemoteSettings
from crystalformer.sources.errors import SourceUnavailable
from crystalformer.sources.refresh import refresh, sources_config


@task(retries=2, retry_delay_seconds=30)
def fetch_source(name: str, settings: RemoteSettings, raw: Path) -> Path | None:
    """Refresh one registered source's records folder. A source without its credential or
    without network is skipped with a log line, not a failed flow. Run as `fetch_<name>`."""
    source = REGISTRY[name]
    logger = get_run_logger()
    secret = None
    if source.credential is not None:
        env, block = source.credential.env, source.credential.secret_block
        secret = source.credential.from_env() or _secret(block)
        if not secret:
            logger.info(
                f"skipping {name}: no {env} in the environment and no Prefect Secret block "
                f"{block!r}"
            )
            return None
    try:
        summary = refresh(source, settings, raw, secret)
    except SourceUnavailable as error:
        logger.warning(f"skipping {name}: no network or the download failed ({error})")
        return None
    logger.info(f"{name}: {summary.line()}")
    return summary.folder


@task
def featurize_dataset(name: str, out: Path, records: Path | None, scheduler: str | None) -> dict:
    """Featurise one dataset: a bundled snapshot by name, or a fetched records folder."""
    source = name if records is None else str(records)
    summary = featurize_sources(
        [source], out, scheduler=scheduler, progress=False, report=get_run_logger().info
    )
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

    `sources` picks among snapshots and the registered remote sources (materials_project,
    jarvis; default: all enabled); `datasets` overrides the snapshot list. A source with no
    credentials or no network is skipped with a log line. Re-running with nothing changed
    featurises nothing.
    """
    conf = sources_config()
    root = Path(data_root) if data_root else conf.data_root()
    remote = conf.remote()
    enabled = {
        "snapshots": conf.snapshots.enabled,
        **{name: settings is not None and settings.enabled for name, settings in remote.items()},
    }
    chosen = sources or [name for name, on in enabled.items() if on]
    unknown = set(chosen) - set(enabled)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; choose from {sorted(enabled)}")
    jobs: list[tuple[str, Path | None]] = []
    if "snapshots" in chosen:
        jobs += [(name, None) for name in datasets or conf.snapshots.datasets]
    for name, settings in remote.items():
        if name not in chosen or settings is None:
            continue
        fetch = fetch_source.with_options(name=f"fetch_{name}")
        fetched = fetch(name, settings, root / "raw" / settings.dataset)
        if fetched is not None:
            jobs.append((settings.dataset, fetched))
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
