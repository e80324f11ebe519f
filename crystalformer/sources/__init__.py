"""Every input adapter, and `resolve`, which turns what a user names into inputs.

Local: files, folders and tables (`files`), the bundled snapshots of conf/datasets.yaml
(`snapshots`), records folders written by a fetch (`refresh`), generated candidates
(`candidates`). Remote: one module per source implementing `base.RemoteSource` and
registering itself (`materials_project`, `jarvis`), imported below so the registry is whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from crystalformer.records import RawInput, Reject
from crystalformer.sources import jarvis, materials_project  # noqa: F401  (they register)
from crystalformer.sources.files import count_path, iter_path
from crystalformer.sources.refresh import RECORDS, count_records, records_inputs
from crystalformer.sources.snapshots import count_snapshot, registered_dataset, snapshot_inputs

Units = dict[str, str | None]


def resolve(spec: str) -> tuple[Iterator[RawInput | Reject], Units]:
    """Inputs and target units of a file, a folder, a fetched records folder, or a dataset name."""
    path = Path(spec)
    if (path / RECORDS).exists():
        return records_inputs(path, source=path.name), {}
    if path.exists():
        return iter_path(path), {}
    dataset = registered_dataset(spec)
    if dataset is None:
        raise FileNotFoundError(
            f"{spec!r} is neither a file, a folder, nor a dataset in conf/datasets.yaml"
        )
    return snapshot_inputs(dataset), dataset.units()


def resolve_all(specs: Iterable[str]) -> tuple[Iterator[RawInput | Reject], Units]:
    """The inputs of every spec, one after another, and their target units; a spec that
    names nothing is refused before any input is read."""
    streams, units = [], {}
    for spec in specs:
        stream, spec_units = resolve(spec)
        streams.append(stream)
        units.update(spec_units)
    return itertools.chain(*streams), units


def count_all(specs: Iterable[str]) -> int | None:
    """How many inputs resolve_all(specs) yields, for a progress bar's total, when that is
    cheap to know (files.count_path); None when it is not, or a spec names nothing."""
    counts = [_count(spec) for spec in specs]
    return None if None in counts else sum(counts)


def _count(spec: str) -> int | None:
    path = Path(spec)
    if (path / RECORDS).exists():
        return count_records(path)
    if path.exists():
        return count_path(path)
    dataset = registered_dataset(spec)
    return None if dataset is None else count_snapshot(dataset)
