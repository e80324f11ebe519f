"""Flow `train-all`: one training task per configured property, each on a GPU when there is one.

Tasks fan out on a thread pool as wide as the GPU count (1 on a CPU-only machine, where
training in parallel would only split the same cores). Each task claims a free GPU from
a pool for its whole run and passes it as its device; the tag `gpu` carries a Prefect
concurrency limit equal to the GPU count, so flows sharing a machine queue for GPUs too.
"""

from __future__ import annotations

import queue
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from crystalformer import conf
from crystalformer.datasets import dataset_folder
from crystalformer.tracking import (
    TrainOutcome,
    model_link,
    registered_name,
    run_link,
    train_property,
    ui_address,
)

GPUS = torch.cuda.device_count()
GPU_TAG = "gpu"
_free_gpus: queue.Queue[int] = queue.Queue()
for _index in range(GPUS):
    _free_gpus.put(_index)


@contextmanager
def claimed_device():
    """A free GPU for the duration of one task ("cuda:N"), or "cpu" when there is none."""
    if not GPUS:
        yield "cpu"
        return
    index = _free_gpus.get()
    try:
        yield f"cuda:{index}"
    finally:
        _free_gpus.put(index)


@task
def featurised(dataset: str, root: str) -> str:
    """The dataset's folder, featurised from its snapshot first when missing (minutes for
    mp2018), saying so, with progress lines, in the flow's log."""
    folder, _ = dataset_folder(dataset, Path(root), progress=False, report=get_run_logger().info)
    return str(folder)


@task(tags=[GPU_TAG] if GPUS else [])
def train_one(
    target: str, dataset: str, preset: str, model: str, overrides: dict, root: str
) -> TrainOutcome:
    with claimed_device() as device:
        get_run_logger().info(f"training {model} for {target} on {dataset} ({device})")
        outcome = train_property(
            dataset, target, preset=preset, model=model, overrides=overrides, device=device,
            root=Path(root),
        )  # fmt: skip
    get_run_logger().info(outcome.message)
    return outcome


@flow(name="train-all", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=max(1, GPUS)))
def train_all(
    properties: list[str] | None = None,
    epochs: int | None = None,
    max_crystals: int | None = None,
    data_root: str | None = None,
    encoder: str = "crystalformer",
) -> list[dict]:
    """Train every property of conf/train-all.yaml (or `properties`), one model each.

    `epochs` and `max_crystals` override the presets for quick runs; `encoder` names a
    conf/model/ config (crystalformer, crystalframer, sitenet) or a YAML file. Datasets not yet
    featurised under DATA_ROOT/datasets/ are featurised from their snapshots first.
    """
    plan = conf.train_all_config().properties
    chosen = properties or list(plan)
    unknown = sorted(set(chosen) - set(plan))
    if unknown:
        raise ValueError(f"unknown properties {unknown}; conf/train-all.yaml has {sorted(plan)}")
    root = str(Path(data_root).resolve() if data_root else conf.data_root())
    if GPUS:
        _limit_gpu_tag()
    overrides = {k: v for k, v in {"epochs": epochs, "max_crystals": max_crystals}.items() if v}
    for dataset in dict.fromkeys(plan[name].dataset for name in chosen):
        featurised(dataset, root)  # once each, before the trainings that read it
    futures = [
        train_one.submit(name, plan[name].dataset, plan[name].preset, encoder, overrides, root)
        for name in chosen
    ]
    outcomes = [future.result() for future in futures]
    rows = [
        {
            "property": o.target,
            "dataset": o.dataset,
            **{k: round(v, 5) for k, v in o.final.items()},
            "champion": o.champion,
            "model version": o.model_version,
            "MLflow run": run_link(o, Path(root)),
        }
        for o in outcomes
    ]
    create_table_artifact(
        key="train-all-summary",
        table=rows,
        description="Validation and test MAE per property (target units), with the MLflow runs.",
    )
    create_markdown_artifact(key="train-all-runs", markdown=runs_markdown(outcomes, Path(root)))
    return rows


def runs_markdown(outcomes: list[TrainOutcome], root: Path) -> str:
    """Each property's MLflow run and registered version as links, and whether it is champion."""
    lines = ["| property | MLflow run | model version | champion |", "|---|---|---|---|"]
    for o in outcomes:
        name = registered_name(o.target)
        version = model_link(f"models:/{name}/{o.model_version}", root)
        lines.append(
            f"| {o.target} | [{o.run_id}]({run_link(o, root)}) | {version} | "
            f"{'yes' if o.champion else 'no'}: {o.message} |"
        )
    return "\n".join(lines) + f"\n\nThe links open in the MLflow UI at {ui_address(root)}."


def _limit_gpu_tag() -> None:
    """A concurrency limit on the `gpu` tag equal to this machine's GPU count."""
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=GPUS)


if __name__ == "__main__":
    train_all()
