"""The `crystalformer` command line. Each verb is a thin call into the library.

Exit codes: 0 done; 2 a user error (bad option, missing or unwritable path, busy or
mismatched dataset folder, unknown model, bad expression, full disk), told in one line on
stderr, never a traceback; 1 where a verb ran but nothing came out of it (README); 3 the Dask
cluster of --scheduler was lost mid-run (one line too: rerun to resume).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

# Light on purpose: `crystalformer --help` and every verb's --help import only this module,
# typer and screen_run (0.2 s; torch, pymatgen, pandas, pyarrow and MLflow take seconds), so
# each verb imports what it needs in its body (tested: tests/test_cli.py).
from crystalformer.screen_run import REPORT, STABILITY, STD_SUFFIX, ScreenOptions


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix by changing the command or the machine: paths, permissions, disk,
    inputs, options, configs (ConfigError), expressions, model names; KeyError: report's
    missing label column. Looked up once a verb has failed, so start-up imports none of it."""
    from crystalformer.shards import DatasetBusy
    from crystalformer.sources.errors import SourceUnavailable

    return (ValueError, OSError, KeyError, DatasetBusy, SourceUnavailable)


def user_error_line(error: BaseException) -> str:
    """The error as one line: what went wrong and where, without Python's decoration."""
    from crystalformer.conf import ConfigError

    if isinstance(error, OSError) and error.strerror:  # raised by the OS, not with a message
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    kind = "configuration error" if isinstance(error, ConfigError) else "error"
    return f"{kind}: {' '.join(text.split())}"


class Verbs(TyperGroup):
    """Every verb ends a user error the same way: one line on stderr, exit code 2; a lost
    Dask cluster in one line and exit code 3."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # --help, usage errors: typer's own way out
        except Exception as error:
            from crystalformer.datasets import ClusterLost

            if isinstance(error, ClusterLost):
                typer.echo(f"cluster failure: {error}", err=True)
                raise typer.Exit(3) from None
            if not isinstance(error, user_errors()):
                raise
            typer.echo(user_error_line(error), err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=Verbs,
    help="High-throughput screening of inorganic crystals with Crystalformer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: typer's rich tables print every flag as taking a value (`--quiet <bool>`).
    rich_markup_mode=None,
)


@app.command()
def featurize(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
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
    from crystalformer.datasets import featurize_sources

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
    typer.echo(summary.line())
    if summary.rejected:
        typer.echo(f"reasons for the rejects: {out / 'rejects.parquet'}")
    if summary.nothing_read:
        typer.echo("error: no input could be read", err=True)
        raise typer.Exit(1)


@app.command()
def fetch(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="The remote source: materials_project or jarvis (those registered in "
            "crystalformer/sources/).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Records folder (default: DATA_ROOT/raw/<source>)."),
    ] = None,
) -> None:
    """Fetch Materials Project (needs MP_API_KEY) or JARVIS-DFT into a records folder.

    Materials Project fetches are incremental: only new or changed ids are downloaded. The
    query and the JARVIS dataset come from conf/sources.yaml. Featurise the folder next.
    """
    from crystalformer.conf import data_root
    from crystalformer.sources.base import REGISTRY
    from crystalformer.sources.refresh import refresh, sources_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    remote = REGISTRY.get(source)
    if remote is None:
        raise typer.BadParameter(f"{source!r} is not one of {', '.join(REGISTRY)}")
    settings = sources_config().remote()[remote.name] or remote.settings.defaults()
    secret = remote.credential.from_env() if remote.credential is not None else None
    if remote.credential is not None and not secret:
        raise typer.BadParameter(f"set {remote.credential.env} (and configure {remote.name})")
    if settings is None:
        raise typer.BadParameter(f"configure {remote.name} in conf/sources.yaml")
    folder = out or data_root() / "raw" / remote.name
    typer.echo(refresh(remote, settings, folder, secret).line())


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def train(
    data: Annotated[
        str,
        typer.Option(help="A featurised dataset folder, or a dataset name (conf/datasets.yaml)."),
    ],
    target: Annotated[str, typer.Option(help="The target column to learn.")],
    epochs: Annotated[int | None, typer.Option(help="Epochs (preset: 500 for MP).")] = None,
    swa_epochs: Annotated[
        int | None,
        typer.Option(
            help="Last epochs averaged by SWA, lr frozen (preset: 50; with --epochs alone, "
            "at most a tenth of them)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Crystals per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when there is one.")] = Device.auto,
    max_crystals: Annotated[
        int | None, typer.Option(help="Train on a seeded subset of this many labelled crystals.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation and batch-order seed.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="MLflow run id of an interrupted run: continue it (same options)."),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--config",
            help="A preset of conf/train/ (jarvis, jarvis_mbj, mp, mp-cpu) or a YAML file.",
        ),
    ] = "mp",
    model_config: Annotated[
        str,
        typer.Option(
            help="The encoder: a config of conf/model/ (crystalformer, crystalframer, sitenet) "
            "or a YAML file."
        ),
    ] = "crystalformer",
    promote: Annotated[
        bool,
        typer.Option(
            "--promote",
            help="Make the new version the champion even when it was scored on other "
            "validation crystals or trained on a subsample.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train one property: L1 on standardised targets, AdamW, inverse-sqrt decay, SWA.

    Tracked in MLflow ($MLFLOW_TRACKING_URI, default SQLite under the data root): params,
    train_loss and val_mae per epoch, val_mae_swa and test_mae(_swa) at the end, the model,
    plots and the split. The model is registered as crystalformer-<target>; its alias
    `champion` moves only to a better validation MAE measured on the same validation
    crystals (same dataset version and split), never to a --max-crystals run unless
    --promote. A checkpoint is written after
    every epoch, so `--resume RUN` continues an interrupted run on the same curve.
    """
    from crystalformer.tracking import train_property

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = {
        "epochs": epochs, "swa_epochs": swa_epochs, "batch_size": batch_size, "lr": lr,
        "max_crystals": max_crystals, "seed": seed,
    }  # fmt: skip
    overrides = {key: value for key, value in chosen.items() if value is not None}
    outcome = train_property(
        data, target, preset=preset, model=model_config, overrides=overrides,
        device=device.value, resume=resume, promote=promote, progress=not quiet,
    )  # fmt: skip
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in outcome.final.items())
    typer.echo(f"{outcome.target}: {metrics}; MLflow run {outcome.run_id}")


@app.command()
def predict(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE",
            help="Files or folders of crystals (as for featurize).",
            show_default=False,
        ),
    ],
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            "--models",
            metavar="URI",
            help="models:/crystalformer-<target>@champion, runs:/RUN_ID, or a model folder; "
            "repeat for several models (one column each).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output table: .csv or .parquet.")],
    keep_cell: Annotated[
        bool, typer.Option("--keep-cell", help="Keep the input cell (no primitive reduction).")
    ] = False,
) -> None:
    """Predict with trained models: `id` and one column per model target, in target units
    (each column's unit in OUT's sibling `<stem>.units.json`).

    Inputs that cannot be read or fail validation go to OUT's sibling `<stem>.rejects.csv`
    with the reason, as do second copies of an id (stage `duplicate`: the first copy is
    predicted); every input id is in one of the two files.
    """
    from crystalformer.predict import (
        check_output,
        column_units,
        predict_inputs,
        units_path,
        write_predictions,
    )
    from crystalformer.sources import resolve_all
    from crystalformer.tracking import load_model

    check_output(out)
    loaded = [load_model(uri) for uri in model]
    inputs, _ = resolve_all(files)
    predictions, rejects = predict_inputs(inputs, loaded, primitive=not keep_cell)
    rejects_path = write_predictions(predictions, rejects, out, column_units(loaded))
    typer.echo(
        f"{len(predictions)} predicted -> {out} (units: {units_path(out)}); "
        f"{len(rejects)} rejected -> {rejects_path}"
    )
    if predictions.empty:
        typer.echo("error: no input could be predicted", err=True)
        raise typer.Exit(1)


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Candidates table to write (.parquet).")],
    parents: Annotated[
        list[str] | None,
        typer.Option(
            "--from",
            metavar="DATASET_OR_FILES",
            help="Substitute into these crystals instead of the AFLOW prototypes: a dataset "
            "name (conf/datasets.yaml), a featurised dataset folder, CIF/POSCAR/JSON files, "
            "tables or folders of them; repeat it.",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Least substitution probability (conf: 1e-3).")
    ] = None,
    elements: Annotated[
        str | None, typer.Option(help="Comma-separated elements candidates may contain.")
    ] = None,
    max_candidates: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Generate screening candidates: known crystals × likely ionic substitutions.

    The parents are pymatgen's 288 AFLOW prototypes, or the crystals named by --from.
    Substitution probabilities come from pymatgen's ICSD-derived table; settings from
    conf/generate.yaml, overridden by the options. Deterministic; exact duplicates and
    candidates equal to a parent removed; ids name the parent and the substitution
    (mp-1234:Cl→Br,Na→K). Parents that are unreadable, too large or have no oxidation states
    the table knows are skipped, counted and listed with the reason in OUT's sibling
    `<stem>.rejects.csv`. --threshold and --max-candidates bound the
    count: from mp2018, --threshold 1e-4 gives over 1,000,000. The table (id, parent,
    substitution, probability, structure) is a valid SOURCE for featurize, predict and screen.
    """
    from crystalformer.datasets import Progress
    from crystalformer.shards import rejects_path
    from crystalformer.sources.candidates import (
        InputParents,
        aflow_prototypes,
        generate_config,
        write_generation,
    )

    chosen = {"threshold": threshold, "max_candidates": max_candidates}
    if elements is not None:
        chosen["elements"] = [symbol.strip() for symbol in elements.split(",") if symbol.strip()]
    overrides = {key: value for key, value in chosen.items() if value is not None}
    settings = generate_config().model_validate({**generate_config().model_dump(), **overrides})
    sources = InputParents(tuple(parents)) if parents else aflow_prototypes()
    total = sources.count() if parents else len(sources)
    bar = Progress("generating", "parent", total, not quiet, None)
    try:
        written, counts = write_generation(settings, sources, out, bar.update)
    finally:
        bar.close()
    typer.echo(f"{written} candidates -> {out}")
    typer.echo(counts.line())
    typer.echo(f"{counts.skipped()} parents skipped, each with its reason -> {rejects_path(out)}")


@app.command()
def screen(
    candidates: Annotated[
        list[str],
        typer.Argument(
            metavar="CANDIDATE",
            help="Files or folders of crystals, dataset names, or featurised dataset folders.",
            show_default=False,
        ),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--models",
            "--model",
            metavar="URI",
            help="Model URIs (models:/crystalformer-<target>@champion, runs:/ID, a folder); "
            "repeat it. Several models of one property form an ensemble (mean and spread).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run folder: features, results, ranking, report.")],
    shard_size: Annotated[int | None, typer.Option(help="Crystals per shard.")] = None,
    workers: Annotated[
        int, typer.Option(help="Dask worker processes (1 = in-process).")
    ] = ScreenOptions.workers,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running Dask scheduler (tcp://host:port).")
    ] = None,
    filter_expr: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="Keep rows where this holds, e.g. 'e_above_hull < 0.05 and band_gap > 1.5'.",
        ),
    ] = None,
    rank_by: Annotated[
        str | None,
        typer.Option(
            help="Score to rank by, higher first, e.g. 'band_gap - 2 * band_gap_std'. "
            f"Default: the lowest predicted {STABILITY} first (ties: the smaller "
            f"{STABILITY}{STD_SUFFIX}) when a model predicts it, else unranked (by id)."
        ),
    ] = None,
    pareto: Annotated[
        str | None,
        typer.Option(
            help="Two objectives for a Pareto front, e.g. 'band_gap:max,e_above_hull:min'."
        ),
    ] = None,
    top: Annotated[int, typer.Option(help="Rows in the report's top table.")] = ScreenOptions.top,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: auto).")] = None,
    compile_kernels: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model's per-pair and per-image work: about 2.6x faster "
            "on CPU after a compilation of seconds per process (needs a C++ compiler).",
        ),
    ] = ScreenOptions.compiled,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Screen candidates with every model: predictions, ensemble spread, filter, rank, report.

    Streams shard by shard with flat memory; a killed run started again with the same
    arguments skips finished shards. Writes OUT/ranked.parquet (every screened crystal, with
    passes_filter, score, rank, in_training), OUT/report.html and OUT/screen.json; rejected
    candidates are in OUT/features/rejects.parquet.
    """
    from crystalformer.screen import screen as run_screen

    summary = run_screen(ScreenOptions(
        candidates, models, out, filter_expr=filter_expr, rank_by=rank_by, pareto=pareto,
        top=top, workers=workers, scheduler=scheduler, shard_size=shard_size,
        device=device, compiled=compile_kernels, progress=not quiet,
    ))  # fmt: skip
    typer.echo(summary.line())
    typer.echo(f"report: {out / REPORT}")
    if summary.screened == 0:
        typer.echo("error: no candidate could be screened", err=True)
        raise typer.Exit(1)


@app.command()
def report(
    results: Annotated[
        Path, typer.Option(help="A screening run folder (crystalformer screen --out).")
    ],
    labels: Annotated[
        Path,
        typer.Option(
            help="Table (CSV, CSV.gz, Parquet) with `id` and DFT label columns, or a "
            "featurised dataset folder (its targets)."
        ),
    ],
    stability: Annotated[
        str, typer.Option(help="The property that decides stability.")
    ] = "e_above_hull",
    threshold: Annotated[
        float, typer.Option(help="Stable when the stability property is at most this.")
    ] = 0.1,
    top: Annotated[int, typer.Option(help="K of the top-K metrics.")] = 100,
    id_column: Annotated[str, typer.Option(help="The labels' id column.")] = "id",
) -> None:
    """Score a screening run against DFT labels: MAE per property; precision, recall, F1
    and discovery acceleration factor for stability, overall and in the top K.

    Label columns must be named like the predicted properties (rename them first). The
    metrics go to OUT/label_metrics.json, the report page, and MLflow (experiment
    `screening`).
    """
    from crystalformer.report import evaluate_run

    metrics = evaluate_run(
        results, labels, stability=stability, threshold=threshold, top=top,
        id_column=id_column,
    )  # fmt: skip
    for name, value in metrics.items():
        typer.echo(f"{name:>20} {value:.4g}")


def main() -> None:
    """Entry point of the `crystalformer` script (user errors: see Verbs)."""
    app()
