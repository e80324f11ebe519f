"""MLflow around training: one run per (dataset, target), metrics per epoch, plots, registry.

Tracking URI from MLFLOW_TRACKING_URI, else SQLite under the data root; one experiment per
dataset. A finished run registers its model as `crystalformer-<target>` and moves the alias
`champion` only when the new validation MAE beats the champion's. Models are logged as our
own checkpoint folders (safetensors + JSON), never as pickled modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crystalformer import config
from crystalformer.pipeline import dataset_folder
from crystalformer.train import (
    SPLIT_FILE,
    CheckpointDir,
    FitResult,
    Trainer,
    TrainingData,
    prepare_data,
    save_model,
)
from crystalformer.train_config import TrainConfig

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after the headless backend is chosen)

log = logging.getLogger(__name__)
CHAMPION = "champion"
MODEL_ARTIFACT = "model"


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
    """The dataset's experiment; with the default SQLite store, artifacts go under the root."""
    found = client.get_experiment_by_name(dataset)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(root) == default_uri(root):
        location = (root / "mlartifacts" / dataset).as_uri()
    return client.create_experiment(dataset, artifact_location=location)


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
    root: Path | None = None,
    progress: bool = False,
) -> TrainOutcome:
    """`crystalformer train` and the train-all task: resolve, prepare, train, track, register.

    `data` is a featurised dataset folder or a registered dataset name (featurised under
    ROOT/datasets/ on first use); `model` names a conf/model/ encoder config (crystalformer,
    crystalframer, sitenet) or is a YAML file; `overrides` replace keys of the preset's
    TrainConfig. Fewer
    epochs without a SWA length keep the paper's proportion: SWA over at most a tenth.
    """
    root = root or config.data_root()
    if resume is not None:  # before featurising or preparing anything
        try:
            use_tracking(root).get_run(resume)
        except MlflowException as error:
            raise FileNotFoundError(f"--resume {resume!r}: {_not_found(error)}") from None
    folder, dataset = dataset_folder(data, root, progress=progress)
    preset_config = config.train_config(preset)
    overrides = dict(overrides or {})
    if "epochs" in overrides and "swa_epochs" not in overrides:
        overrides["swa_epochs"] = min(preset_config.swa_epochs, overrides["epochs"] // 10)
    train_config = dataclasses.replace(preset_config, **overrides)
    model_config = config.model_config(name=model)
    if device is not None:
        model_config.device = device
    prepared = prepare_data(folder, target, train_config)
    return train_tracked(
        prepared, dataset, model_config, train_config, root, resume=resume, progress=progress
    )


def train_tracked(
    data: TrainingData,
    dataset: str,
    model_config,  # any encoder's config
    train_config: TrainConfig,
    root: Path,
    *,
    resume: str | None = None,
    progress: bool = False,
) -> TrainOutcome:
    """Train one property inside an MLflow run (a new one, or `resume`d) and register it."""
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
    with mlflow.start_run(run_id=resume, experiment_id=None if resume else experiment) as run:
        run_id = run.info.run_id
        try:
            mlflow.log_params(params)
        except MlflowException as error:
            raise ValueError(
                f"run {run_id} was started with other settings; resume it with the same "
                f"options ({error.message.splitlines()[0]})"
            ) from None
        checkpoints = root / "checkpoints" / run_id
        card = {"dataset": dataset, "mlflow_run_id": run_id}
        trainer = Trainer(data, model_config, train_config, checkpoints, card)
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
        version, champion, message = register(client, data.target, run_id, dataset, result)
    log.info(message)
    return TrainOutcome(
        dataset, data.target, run_id, experiment, result.final, version, champion, message
    )


def run_link(outcome: TrainOutcome, root: Path) -> str:
    """Where a person finds the run: a UI link for a tracking server, else how to open one."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{outcome.experiment_id}/runs/{outcome.run_id}"
    return f"run {outcome.run_id} (mlflow ui --backend-store-uri {uri})"


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
        parity_plot(result, data).savefig(folder / "parity.png", dpi=120)
        learning_curve(result, data).savefig(folder / "learning_curve.png", dpi=120)
        plt.close("all")
        mlflow.log_artifact(str(folder / "parity.png"))
        mlflow.log_artifact(str(folder / "learning_curve.png"))


def weights_kind(result: FitResult) -> str:
    return "swa" if result.swa_model is not None else "last"


def parity_plot(result: FitResult, data: TrainingData):
    figure, axis = plt.subplots(figsize=(5, 5))
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
    figure.tight_layout()
    return figure


def learning_curve(result: FitResult, data: TrainingData):
    epochs = [m["epoch"] for m in result.history]
    figure, (loss, mae) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss.plot(epochs, [m["train_loss"] for m in result.history])
    loss.set(xlabel="epoch", ylabel="train L1 (standardised)", yscale="log")
    mae.plot(epochs, [m["val_mae"] for m in result.history], label="val MAE")
    if "val_mae_swa" in result.final:
        mae.axhline(result.final["val_mae_swa"], color="C1", linestyle="--", label="val MAE, SWA")
    mae.set(xlabel="epoch", ylabel=f"{data.target} MAE ({data.unit or 'target units'})")
    mae.legend()
    figure.tight_layout()
    return figure


def register(
    client: MlflowClient, target: str, run_id: str, dataset: str, result: FitResult
) -> tuple[str, bool, str]:
    """A new version of crystalformer-<target>; `champion` moves only to a better val MAE."""
    name = registered_name(target)
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(name)
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=run_id).version
    mae = reported_mae(result.final)
    for key, value in {"val_mae": mae, "dataset": dataset, "weights": weights_kind(result)}.items():
        client.set_model_version_tag(name, version, key, str(value))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return version, True, f"{name} v{version} is the first {CHAMPION} (val MAE {mae:.4g})"
    best = float(current.tags.get("val_mae", "inf"))
    if mae < best:
        client.set_registered_model_alias(name, CHAMPION, version)
        return (
            version,
            True,
            (
                f"{name} v{version} is the new {CHAMPION}: val MAE {mae:.4g} beats "
                f"v{current.version}'s {best:.4g}"
            ),
        )
    return (
        version,
        False,
        (
            f"{name} v{version} stays a challenger: val MAE {mae:.4g} does not beat "
            f"{CHAMPION} v{current.version}'s {best:.4g}"
        ),
    )


def download_model(uri: str, root: Path | None = None) -> Path:
    """A local model folder for `models:/name@alias`, `runs:/ID[/path]` or a local path.

    A local path is a model folder, or a run's checkpoint folder (its newest epoch).
    """
    if uri.startswith(("models:/", "runs:/")):
        use_tracking(root or config.data_root())
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
