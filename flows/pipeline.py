"""Flow `pipeline`: the main job end to end on the embedded defaults (bundled snapshots).

Today that is refresh-data over the bundled snapshots: every dataset of conf/datasets.yaml
featurised into DATA_ROOT/datasets/. Training and screening are added here as they land.
"""

from __future__ import annotations

import os

from prefect import flow

from flows.refresh import refresh_data


@flow(name="pipeline", log_prints=True)
def pipeline(data_root: str | None = None, workers: int = 2) -> list[dict]:
    """Featurise every bundled snapshot dataset (incremental: a re-run skips what is done)."""
    return refresh_data(sources=["snapshots"], data_root=data_root, workers=workers)


if __name__ == "__main__":
    pipeline(workers=min(2, os.cpu_count() or 1))
