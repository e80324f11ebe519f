"""The `crystalformer` command line. Each verb is a thin call into the library."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from crystalformer import config

app = typer.Typer(
    help="High-throughput screening of inorganic crystals with Crystalformer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class RemoteSource(StrEnum):
    materials_project = "materials_project"
    jarvis = "jarvis"


@app.command()
def featurize(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files (CIF, POSCAR, pymatgen JSON, CSV/CSV.gz/Parquet tables), folders of "
            "them, fetched records folders, or dataset names from conf/datasets.yaml.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Dataset folder to create or extend.")],
    workers: Annotated[int, typer.Option(help="Dask worker processes (1 = in-process).")] = 1,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running Dask scheduler (tcp://host:port).")
    ] = None,
    shard_size: Annotated[int | None, typer.Option(help="Crystals per shard.")] = None,
    keep_cell: Annotated[
        bool, typer.Option("--keep-cell", help="Keep the input cell (no primitive reduction).")
    ] = False,
    r_cut: Annotated[
        float | None, typer.Option(help="Image cutoff in Å (default: from the model config).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Parse, validate and featurise crystals into Parquet shards with lattice-image lists.

    Every input ends up in a shard or in rejects.parquet with a reason. Re-running skips
    crystals already featurised with the same structure, labels and r_cut.
    """
    from crystalformer.pipeline import featurize_sources

    try:
        summary = featurize_sources(
            sources,
            out,
            workers=workers,
            scheduler=scheduler,
            shard_size=shard_size,
            keep_cell=keep_cell,
            r_cut=r_cut,
            progress=not quiet,
        )
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="SOURCES") from None
    typer.echo(summary.line())
    if summary.rejected:
        typer.echo(f"reasons for the rejects: {out / 'rejects.parquet'}")
    if summary.nothing_read:
        typer.echo("error: no input could be read", err=True)
        raise typer.Exit(1)


@app.command()
def fetch(
    source: Annotated[RemoteSource, typer.Argument(help="Which remote source to fetch.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Records folder (default: DATA_ROOT/raw/<source>)."),
    ] = None,
) -> None:
    """Fetch Materials Project (needs MP_API_KEY) or JARVIS-DFT into a records folder.

    Materials Project fetches are incremental: only new or changed ids are downloaded. The
    query and the JARVIS dataset come from conf/sources.yaml. Featurise the folder next.
    """
    from crystalformer.sources.errors import SourceUnavailable
    from crystalformer.sources.materials_project import api_key_from_env
    from crystalformer.sources.refresh import refresh_jarvis, refresh_materials_project

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = config.sources_config()
    folder = out or config.data_root() / "raw" / source.value
    try:
        if source is RemoteSource.materials_project:
            key = api_key_from_env()
            if not key or sources.materials_project is None:
                raise typer.BadParameter("set MP_API_KEY (and configure materials_project)")
            summary = refresh_materials_project(sources.materials_project, key, folder)
        else:
            summary = refresh_jarvis(sources.jarvis or config.JarvisSource(), folder)
    except SourceUnavailable as error:
        typer.echo(f"error: {source.value} is unavailable: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.line())


def main() -> None:
    """Entry point: configuration errors end with their message, not a traceback."""
    try:
        app()
    except config.ConfigError as error:
        typer.echo(f"configuration error: {error}", err=True)
        raise SystemExit(2) from None
