"""Flow `pipeline`: the main job end to end on the embedded defaults (bundled snapshots).

Every dataset of conf/datasets.yaml featurised into DATA_ROOT/datasets/, then train-all on a
small budget (a few epochs on a subset), so a fresh clone ends with trained, registered
models in MLflow within minutes. Screening is added here when it lands.
"""

from __future__ import annotations

import os

from prefect import flow

from flows.refresh import refresh_data
from flows.train import train_all


@flow(name="pipeline", log_prints=True)
def pipeline(
    data_root: str | None = None,
    workers: int = 2,
    train_epochs: int = 2,
    train_max_crystals: int = 600,
) -> dict:
    """Featurise the bundled snapshots (incremental), then train every property briefly."""
    datasets = refresh_data(sources=["snapshots"], data_root=data_root, workers=workers)
    models = train_all(epochs=train_epochs, max_crystals=train_max_crystals, data_root=data_root)
    return {"datasets": datasets, "models": models}


if __name__ == "__main__":
    pipeline(workers=min(2, os.cpu_count() or 1))
