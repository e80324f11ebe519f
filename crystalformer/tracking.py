"""MLflow around training: one run per (dataset, target), metrics per epoch, plots, registry.

Tracking URI from MLFLOW_TRACKING_URI, else SQLite under the data root; one experiment per
dataset. A finished run registers its model as `crystalformer-<target>` and moves the alias
`champion` only when the new validation MAE beats the champion's. Models are logged as our
own checkpoint folders (safetensors + JSON), never as pickled modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import matplotlib
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crystalformer import conf, pretrained
from crystalformer.datasets import dataset_folder
from crystalformer.model import Runtime
from crystalformer.predict import LoadedModel
from crystalformer.recipe import TrainConfig
from crystalformer.shards import Manifest, sha256_of
from crystalformer.train import (
    MODEL_WEIGHTS,
    SPLIT_FILE,
    STATE_INFO,
    CheckpointDir,
    FitResult,
    Trainer,
    TrainingData,
    prepare_data,
    save_model,
)
from crystalformer.train import load_model as load_folder

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after the headless backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)
CHAMPION = "champion"
COMMIT_TAG = "crystalformer.commit"
MODEL_ARTIFACT = "model"
# MLflow 3's experiment types (its UI's ExperimentKind; mlflow exports no Python constant):
# "custom_model_development" opens an experiment on its runs, as a training experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PLOT_DPI = 120


def default_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a value this process set is ours, not
# the user's, and must not outlive a change of data root.
_exported_defaults: set[str] = set()


def tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI when the user set it, else a SQLite file under the data root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _exported_defaults:
        return uri
    root.mkdir(parents=True, exist_ok=True)
    return default_uri(root)


def use_tracking(root: Path) -> MlflowClient:
    uri = tracking_uri(root)
    if uri == default_uri(root):
        _exported_defaults.add(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


def experiment_id(client: MlflowClient, dataset: str, root: Path) -> str:
    """The dataset's experiment; with the default SQLite store, artifacts go under the root.

    It is tagged a model-training experiment (EXPERIMENT_KIND), also when an older version
    of this project created it untagged: MLflow 3's UI opens an untagged experiment in its
    GenAI view (an empty Traces page) instead of its runs."""
    found = client.get_experiment_by_name(dataset)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if tracking_uri(root) == default_uri(root):
        location = (root / "mlartifacts" / dataset).as_uri()
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    return client.create_experiment(dataset, artifact_location=location, tags=tags)


def code_commit() -> str:
    """The commit of the code that trains ("+dirty" with uncommitted changes to it)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=conf.PROJECT_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "crystalformer", "conf") else "")


def registered_name(target: str) -> str:
    return f"crystalformer-{target}"


@dataclass
class TrainOutcome:
    dataset: str
    target: str
    run_id: str
    experiment_id: str
    final: dict[str, float]
    model_version: str
    champion: bool
    message: str


def train_property(
    data: str,
    target: str,
    *,
    preset: str | Path = "mp",
    model: str | Path = "crystalformer",
    overrides: dict | None = None,
    device: str | None = None,
    resume: str | None = None,
    promote: bool = False,
    root: Path | None = None,
    progress: bool = False,
) -> TrainOutcome:
    """`crystalformer train` and the train-all task: resolve, prepare, train, track, register.

    `data` is a featurised dataset folder or a registered dataset name (featurised under
    ROOT/datasets/ on first use); `model` names a conf/model/ encoder config (crystalformer,
    crystalframer, sitenet) or is a YAML file; `overrides` replace keys of the preset's
    TrainConfig; `device` replaces conf/runtime.yaml's. Fewer
    epochs without a SWA length keep the paper's proportion: SWA over at most a tenth.
    """
    root = root or conf.data_root()
    if resume is not None:  # before featurising or preparing anything
        try:
            use_tracking(root).get_run(resume)
        except MlflowException as error:
            raise FileNotFoundError(f"--resume {resume!r}: {_not_found(error)}") from None
    folder, dataset = dataset_folder(data, root, progress=progress, report=log.info)
    preset_config = conf.train_config(preset)
    overrides = dict(overrides or {})
    if "epochs" in overrides and "swa_epochs" not in overrides:
        overrides["swa_epochs"] = min(preset_config.swa_epochs, overrides["epochs"] // 10)
    train_config = dataclasses.replace(preset_config, **overrides)
    model_config = conf.model_config(name=model)
    runtime = conf.runtime_config().with_options(device=device)
    prepared = prepare_data(folder, target, train_config)
    scoring = scoring_of(prepared, dataset, folder)
    return train_tracked(
        prepared, dataset, model_config, train_config, root, scoring,
        runtime=runtime, resume=resume, promote=promote, progress=progress,
    )  # fmt: skip


def train_tracked(
    data: TrainingData,
    dataset: str,
    model_config,  # any encoder's config
    train_config: TrainConfig,
    root: Path,
    scoring: Scoring,
    *,
    runtime: Runtime | None = None,
    resume: str | None = None,
    promote: bool = False,
    progress: bool = False,
) -> TrainOutcome:
    """Train one property inside an MLflow run (a new one, or `resume`d) and register it;
    `promote` gives it `champion` whatever its score (see champion_verdict).

    Params are what the run is (data, architecture, recipe): a resume must repeat them. The
    `runtime` (default Runtime()) is how this part of it runs, a tag each resume rewrites,
    so a run started on one device continues on another."""
    runtime = runtime or Runtime()
    client = use_tracking(root)
    experiment = experiment_id(client, dataset, root)
    params = {
        "dataset": dataset,
        "target": data.target,
        "unit": data.unit,
        "split_source": data.split_source,
        **{f"n_{split}": table.num_rows for split, table in data.splits.items()},
        **{f"skipped_{reason}": count for reason, count in data.skipped.items()},
        **{f"model.{k}": v for k, v in asdict(model_config).items()},
        **{f"train.{k}": v for k, v in asdict(train_config).items()},
    }
    name = None if resume else run_name(model_config.encoder, data.target, train_config.seed)
    with mlflow.start_run(
        run_id=resume, experiment_id=None if resume else experiment, run_name=name
    ) as run:
        run_id = run.info.run_id
        try:
            mlflow.log_params(params)
        except MlflowException as error:
            raise ValueError(
                f"run {run_id} was started with other settings; resume it with the same "
                f"options ({error.message.splitlines()[0]})"
            ) from None
        mlflow.set_tag(COMMIT_TAG, code_commit())
        mlflow.set_tags({f"runtime.{k}": v for k, v in asdict(runtime).items()})
        checkpoints = root / "checkpoints" / run_id
        card = {"dataset": dataset, "mlflow_run_id": run_id}
        trainer = Trainer(data, model_config, train_config, checkpoints, card, runtime)
        if resume is not None and not trainer.resume():
            raise FileNotFoundError(f"run {run_id} has no checkpoint under {checkpoints}")
        result = trainer.fit(
            on_epoch=lambda m: mlflow.log_metrics(
                {k: m[k] for k in ("train_loss", "val_mae", "lr")}, step=m["epoch"]
            ),
            progress=progress,
        )
        # the last epoch's val_mae is already in its curve
        final = {k: v for k, v in result.final.items() if k != "val_mae"}
        mlflow.log_metrics(final, step=train_config.epochs)
        log_artifacts(result, data, trainer.card, trainer.checkpoints.latest())
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        version, champion, message = register(
            client, data.target, source, reported_mae(result.final), scoring, run_id=run_id,
            tags={"weights": weights_kind(result)}, promote=promote,
        )  # fmt: skip
    log.info(message)
    return TrainOutcome(
        dataset, data.target, run_id, experiment, result.final, version, champion, message
    )


def run_name(encoder: str, target: str, seed: int) -> str:
    """What a training run is, as MLflow lists it: `crystalformer-band_gap-seed123`."""
    return f"{encoder}-{target}-seed{seed}"


# Where `mlflow ui --backend-store-uri sqlite:///<data root>/mlflow.db` serves a local store.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_address(root: Path) -> str:
    """The MLflow UI that shows the data root's store: the tracking server itself (without
    any user:password in its URI), else $CRYSTALFORMER_MLFLOW_UI or `mlflow ui`'s default."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
    return os.environ.get("CRYSTALFORMER_MLFLOW_UI", LOCAL_UI).rstrip("/")


def run_link(outcome: TrainOutcome, root: Path) -> str:
    """The run's page in the MLflow UI."""
    return f"{ui_address(root)}/#/experiments/{outcome.experiment_id}/runs/{outcome.run_id}"


def model_link(uri: str, root: Path) -> str:
    """A model URI as Markdown: a link to its page in the MLflow UI for `models:/` (the
    version the alias names now) and `runs:/`, else the URI as code (folders, pretrained)."""
    ui = ui_address(root)
    try:
        if uri.startswith("models:/"):
            name, _, alias = uri.removeprefix("models:/").partition("@")
            if alias:
                version = use_tracking(root).get_model_version_by_alias(name, alias).version
            else:
                name, _, version = name.partition("/")
            return f"[{uri}]({ui}/#/models/{name}/versions/{version})"
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/")[0]
            experiment = use_tracking(root).get_run(run_id).info.experiment_id
            return f"[{uri}]({ui}/#/experiments/{experiment}/runs/{run_id})"
    except MlflowException:
        pass  # a URI the store no longer resolves: shown as text
    return f"`{uri}`"


def reported_mae(final: dict[str, float]) -> float:
    """The validation MAE of the model that is reported: SWA's when there is one."""
    return final.get("val_mae_swa", final["val_mae"])


def log_artifacts(result: FitResult, data: TrainingData, card: dict, checkpoint: Path) -> None:
    """The reported model, the last checkpoint, the split, a parity plot and learning curves."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reported = result.swa_model if result.swa_model is not None else result.model
        model = folder / MODEL_ARTIFACT
        save_model(reported, model, {**card, "weights": weights_kind(result)})
        # the split travels with the model: screening flags candidates it was trained on
        pq.write_table(data.split_table(), model / SPLIT_FILE)
        mlflow.log_artifacts(str(model), MODEL_ARTIFACT)
        mlflow.log_artifact(str(model / SPLIT_FILE))
        mlflow.log_artifacts(str(checkpoint), "checkpoint")
        save_plot(parity_plot(result, data), folder / "parity.png")
        save_plot(learning_curve(result, data), folder / "learning_curve.png")
        mlflow.log_artifact(str(folder / "parity.png"))
        mlflow.log_artifact(str(folder / "learning_curve.png"))


def weights_kind(result: FitResult) -> str:
    return "swa" if result.swa_model is not None else "last"


def save_plot(figure, path: Path) -> None:
    """A PNG at PLOT_DPI; the figures lay themselves out (constrained), so no label is cut."""
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)


def parity_plot(result: FitResult, data: TrainingData):
    figure, axis = plt.subplots(figsize=(5, 5), dpi=PLOT_DPI, layout="constrained")
    unit = f" ({data.unit})" if data.unit else ""
    for split, predicted in result.predictions.items():
        labels = data.splits[split][data.target].to_numpy()
        mae = np.abs(predicted - labels).mean()
        axis.scatter(labels, predicted, s=6, alpha=0.6, label=f"{split}: MAE {mae:.4g}")
    low, high = axis.get_xlim()
    axis.plot([low, high], [low, high], color="black", linewidth=0.8)
    axis.set(xlabel=f"DFT {data.target}{unit}", ylabel=f"predicted{unit}")
    axis.set_title(f"{data.target}, {weights_kind(result)} weights")
    axis.legend()
    return figure


def learning_curve(result: FitResult, data: TrainingData):
    """Train loss and val MAE per epoch. Every epoch is a marker, so a one-epoch run (a
    single point, which a line alone does not draw) still shows its values."""
    epochs = [m["epoch"] for m in result.history]
    figure, (loss, mae) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=PLOT_DPI, layout="constrained")
    points = {"marker": "o", "markersize": 4}
    loss.plot(epochs, [m["train_loss"] for m in result.history], **points, label="train loss")
    loss.set(xlabel="epoch", ylabel="train L1 (standardised)", yscale="log")
    mae.plot(epochs, [m["val_mae"] for m in result.history], **points, label="val MAE")
    if "val_mae_swa" in result.final:
        mae.axhline(result.final["val_mae_swa"], color="C1", linestyle="--", label="val MAE, SWA")
    mae.set(xlabel="epoch", ylabel=f"{data.target} MAE ({data.unit or 'target units'})")
    for axis in (loss, mae):
        if epochs:  # half an epoch either side, whole epochs as ticks (never 0.98)
            axis.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.legend()
    figure.suptitle(f"{data.target}: {len(epochs)} epoch{'s' if len(epochs) != 1 else ''}")
    return figure


@dataclass(frozen=True)
class Scoring:
    """What a validation MAE was measured on. Two MAEs compare only when both were measured
    on the same crystals: same dataset, same dataset version, same validation ids."""

    dataset: str
    dataset_version: int
    val_split_sha256: str
    subsample: bool  # trained on a --max-crystals subset (a smoke run)

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Scoring | None:
        """None for versions registered before scorings were recorded."""
        try:
            return cls(
                tags["dataset"],
                int(tags["dataset_version"]),
                tags["val_split_sha256"],
                tags["subsample"] == "True",
            )
        except (KeyError, ValueError):
            return None


def val_split_sha256(split: pa.Table) -> str:
    """Which crystals scored a model: a hash of the sorted ids of its validation split."""
    ids = split.filter(pc.equal(split["split"], "val"))["id"].to_pylist()
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def scoring_of(data: TrainingData, dataset: str, folder: Path) -> Scoring:
    return Scoring(
        dataset,
        Manifest.load(folder).version,
        val_split_sha256(data.split_table()),
        "max_crystals" in data.skipped,
    )


def champion_verdict(
    mae: float, scoring: Scoring, current: ModelVersion | None, promote: bool
) -> tuple[bool, str]:
    """Whether a new version takes `champion`, and why (a fair comparison, or none)."""
    if promote:
        return True, "promoted on request (--promote)"
    if current is None:
        return True, f"the first {CHAMPION}"
    held = Scoring.from_tags(current.tags)
    best = float(current.tags.get("val_mae", "inf"))
    against = f"{CHAMPION} v{current.version}'s {best:.4g}"
    if held is not None and held.subsample and not scoring.subsample:
        return True, f"trained on the whole dataset, it replaces {against} from a subsample"
    if scoring.subsample:
        return False, f"trained on a subsample (--max-crystals): {against} stays (--promote)"
    if held != scoring:
        return False, f"scored on other validation crystals than {against}: not comparable"
    if mae < best:
        return True, f"val MAE {mae:.4g} beats {against}"
    return False, f"val MAE {mae:.4g} does not beat {against}"


def register(
    client: MlflowClient,
    target: str,
    source: str,
    mae: float,
    scoring: Scoring,
    *,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    promote: bool = False,
) -> tuple[str, bool, str]:
    """A new version of crystalformer-<target> tagged with its MAE and scoring; `champion`
    moves to it only by `champion_verdict`. Returns (version, moved, the reason)."""
    name = registered_name(target)
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(name)
    version = client.create_model_version(name, source, run_id=run_id).version
    for key, value in {"val_mae": str(mae), **scoring.tags(), **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    moved, why = champion_verdict(mae, scoring, current, promote)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
    outcome = f"is the new {CHAMPION}" if moved else "stays a challenger"
    return version, moved, f"{name} v{version} {outcome}: {why} (val MAE {mae:.4g})"


def register_pretrained(root: Path) -> list[str]:
    """Each model shipped in models/ becomes a version of crystalformer-<target> (once: a
    version with the same weights is not registered again), champion by the same rule."""
    client = use_tracking(root)
    messages = []
    for name in pretrained.pretrained_names():
        folder = pretrained.pretrained_folder(name)
        card = json.loads((folder / pretrained.CARD).read_text())
        weights = sha256_of(folder / MODEL_WEIGHTS)
        registered = registered_name(card["target"])
        versions = client.search_model_versions(f"name = '{registered}'")  # [] when none
        if any(v.tags.get("weights_sha256") == weights for v in versions):
            continue
        split = pq.read_table(folder / SPLIT_FILE, columns=["id", "split"])
        scoring = Scoring(card["dataset"], card["dataset_version"], val_split_sha256(split), False)
        tags = {"weights_sha256": weights, "pretrained": name}
        _, _, message = register(
            client, card["target"], str(folder.resolve()), card["val_mae"], scoring, tags=tags
        )
        messages.append(message)
        log.info(message)
    return messages


def ship_run(
    run_id: str,
    name: str,
    preset: str,
    root: Path,
    commit: str | None = None,
    dest: Path | None = None,
) -> Path:
    """Copy a finished run's reported model to models/<name>/ with a complete card: data,
    recipe, epochs, training time and machine, the commit that trained it, val/test MAE."""
    client = use_tracking(root)
    run = client.get_run(run_id)
    folder = (dest or pretrained.MODELS_DIR) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in download_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", root).iterdir():
        shutil.copyfile(file, folder / file.name)
    checkpoint = download_model(f"runs:/{run_id}/checkpoint", root)
    state = json.loads((checkpoint / STATE_INFO).read_text())
    params, metrics = run.data.params, run.data.metrics
    manifest = Manifest.load(root / "datasets" / params["dataset"])
    shards = " ".join(sorted(shard.sha256 for shard in manifest.shards))
    card = json.loads((folder / pretrained.CARD).read_text())
    card.update(
        {
            "target": params["target"],
            "unit": params["unit"],
            "dataset_version": manifest.version,
            "dataset_shards_sha256": hashlib.sha256(shards.encode()).hexdigest(),
            "preset": preset,
            "recipe": state["train_config"],
            "epochs": state["epoch"],
            "training_seconds": round(sum(m["seconds"] for m in state["history"]), 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "commit": commit or run.data.tags.get(COMMIT_TAG, "unknown"),
            "val_mae": metrics.get("val_mae_swa", metrics.get("val_mae")),
            "test_mae": metrics.get("test_mae_swa", metrics.get("test_mae")),
            "n_train": int(params["n_train"]),
            "n_val": int(params["n_val"]),
        }
    )
    (folder / pretrained.CARD).write_text(json.dumps(card, indent=1))
    return folder


def load_model(
    name_or_uri: str, root: Path | None = None, runtime: Runtime | None = None
) -> LoadedModel:
    """A trained model ready to predict, prepared on `runtime` (conf/runtime.yaml's when
    None): a shipped model's name (`formation_energy_per_atom`, or `pretrained:…`), a model
    folder, or an MLflow URI (`models:/crystalformer-band_gap@champion`, `runs:/ID`)."""
    uri = name_or_uri
    if name_or_uri in pretrained.pretrained_names():
        uri = pretrained.SCHEME + name_or_uri
    model, card = load_folder(download_model(uri, root))
    runtime = runtime or conf.runtime_config()
    return LoadedModel(name_or_uri, runtime.prepare(model).eval(), card)


def download_model(uri: str, root: Path | None = None) -> Path:
    """A local model folder for `models:/name@alias`, `runs:/ID[/path]`,
    `pretrained:<property>` (a model shipped in models/) or a local path.

    A local path is a model folder, or a run's checkpoint folder (its newest epoch).
    """
    if uri.startswith(pretrained.SCHEME):
        return pretrained.pretrained_folder(uri)
    if uri.startswith(("models:/", "runs:/")):
        use_tracking(root or conf.data_root())
        artifact = uri
        if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:
            artifact = f"{uri.rstrip('/')}/{MODEL_ARTIFACT}"
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact))
        except MlflowException as error:
            raise FileNotFoundError(f"model {uri!r}: {_not_found(error)}") from None
    path = Path(uri)
    if not path.exists():
        raise FileNotFoundError(f"model {uri!r}: no such file or folder")
    return CheckpointDir(path).latest() or path


def _not_found(error: MlflowException) -> str:
    """MLflow's one-line reason, and where it looked (never the URI: it may hold a password)."""
    reason = error.message.splitlines()[0].rstrip(".")
    return (
        f"{reason} in the MLflow store ($MLFLOW_TRACKING_URI, else mlflow.db under the data "
        "root): check the name, alias or run id"
    )
