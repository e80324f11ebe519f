"""The real data snapshots bundled under data/snapshots/, registered in conf/datasets.yaml."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crystalformer.config import SNAPSHOT_DIR, DatasetConfig, datasets_config
from crystalformer.inputs import iter_table
from crystalformer.records import RawInput, Reject


def registered_dataset(name: str) -> DatasetConfig | None:
    return datasets_config().datasets.get(name)


def snapshot_inputs(
    dataset: DatasetConfig, snapshot_dir: Path = SNAPSHOT_DIR
) -> Iterator[RawInput | Reject]:
    """Every row of a registered snapshot dataset, with its canonical targets and split."""
    spec = dataset.table_spec()
    for file in dataset.files:
        path = Path(snapshot_dir) / file
        if not path.exists():
            raise FileNotFoundError(f"snapshot file missing: {path} (see data/README.md)")
        yield from iter_table(path, spec)
