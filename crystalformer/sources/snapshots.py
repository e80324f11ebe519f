"""The real data snapshots bundled under data/snapshots/, registered in conf/datasets.yaml."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crystalformer.conf import SNAPSHOT_DIR, DatasetConfig, Strict, datasets_config
from crystalformer.records import RawInput, Reject
from crystalformer.sources.files import TableSpec, TargetColumn, count_table, iter_table


class SnapshotSettings(Strict):
    """conf/sources.yaml `snapshots`: the bundled datasets the refresh flow featurises."""

    enabled: bool = True
    datasets: list[str] = []


def registered_dataset(name: str) -> DatasetConfig | None:
    return datasets_config().datasets.get(name)


def table_spec(dataset: DatasetConfig) -> TableSpec:
    """How to read the tables of a registered dataset: its columns and canonical targets."""
    return TableSpec(
        source=dataset.source,
        id_column=dataset.id_column,
        structure_column=dataset.structure_column,
        targets={name: TargetColumn(**t.model_dump()) for name, t in dataset.targets.items()},
        split_column=dataset.split_column,
        split_values=dataset.split_values,
    )


def snapshot_inputs(
    dataset: DatasetConfig, snapshot_dir: Path = SNAPSHOT_DIR
) -> Iterator[RawInput | Reject]:
    """Every row of a registered snapshot dataset, with its canonical targets and split."""
    spec = table_spec(dataset)
    for file in dataset.files:
        path = Path(snapshot_dir) / file
        if not path.exists():
            raise FileNotFoundError(f"snapshot file missing: {path} (see data/README.md)")
        yield from iter_table(path, spec)


def count_snapshot(dataset: DatasetConfig, snapshot_dir: Path = SNAPSHOT_DIR) -> int | None:
    """How many inputs snapshot_inputs(dataset) yields: its tables' rows (None if unknown)."""
    counts = [count_table(Path(snapshot_dir) / file) for file in dataset.files]
    return None if None in counts else sum(counts)
