"""Fetch a remote source into a local records table that `featurize` reads.

A records table (Parquet) has `id`, `source`, one structure column (`structure`: pymatgen
JSON, or `arrays`: lattice/frac_coords/numbers JSON), one column per target and `split`. A
fetch merges into it by id, so the table always holds the latest version of every crystal,
and its fetch rejects sit beside it in `fetch_rejects.parquet`. A source that can tell what
changed keeps its state in `state.json`, written after the records, so a killed refresh
fetches again what it had not saved. conf/sources.yaml is read here, with one section per
registered source.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import create_model

from crystalformer.conf import CONF_DIR, Strict, load_yaml
from crystalformer.records import RawInput, Reject
from crystalformer.shards import REJECT_COLUMNS, write_atomic
from crystalformer.sources.base import REGISTRY, RemoteSettings, RemoteSource
from crystalformer.sources.files import TableSpec, iter_table
from crystalformer.sources.snapshots import SnapshotSettings

RECORDS = "records.parquet"
FETCH_REJECTS = "fetch_rejects.parquet"
STATE = "state.json"


@dataclass(frozen=True)
class FetchSummary:
    folder: Path
    fetched: int
    unchanged: int
    rejected: int
    total: int

    def line(self) -> str:
        return (
            f"{self.fetched} new or changed, {self.unchanged} unchanged, {self.rejected} "
            f"rejected; {self.total} records in {self.folder / RECORDS}"
        )


def save_records(folder: Path, records: list[RawInput], rejects: list[Reject]) -> int:
    """Merge records into the folder's table by id (new replaces old); returns the row count."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORDS
    new = _records_table(records)
    if path.exists():
        old = pq.read_table(path)
        keep = pc.invert(pc.is_in(old["id"], new["id"]))
        new = pa.concat_tables([old.filter(keep), new], promote_options="default")
    write_atomic(path, lambda tmp: pq.write_table(new, tmp, compression="zstd"))
    table = {name: [getattr(r, name) for r in rejects] for name in REJECT_COLUMNS}
    reject_table = pa.table({k: pa.array(v, pa.string()) for k, v in table.items()})
    write_atomic(folder / FETCH_REJECTS, lambda tmp: pq.write_table(reject_table, tmp))
    return new.num_rows


def records_inputs(folder: Path, source: str) -> Iterator[RawInput | Reject]:
    """The folder's records and its fetch rejects, as featurisation inputs."""
    folder = Path(folder)
    path = folder / RECORDS
    if path.exists():
        column = "arrays" if "arrays" in pq.read_schema(path).names else "structure"
        spec = TableSpec(source, id_column="id", structure_column=column, split_column="split")
        yield from iter_table(path, spec)
    rejects = folder / FETCH_REJECTS
    if rejects.exists():
        for row in pq.read_table(rejects).to_pylist():
            yield Reject(**row)


def count_records(folder: Path) -> int:
    """How many inputs records_inputs(folder) yields: its records and fetch rejects."""
    paths = [Path(folder) / name for name in (RECORDS, FETCH_REJECTS)]
    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths if path.exists())


def _records_table(records: list[RawInput]) -> pa.Table:
    targets = sorted({name for record in records for name in record.targets})
    column = "arrays" if any(r.format == "arrays" for r in records) else "structure"
    data = {
        "id": pa.array([r.id for r in records], pa.string()),
        "source": pa.array([r.source for r in records], pa.string()),
        column: pa.array([json.dumps(r.payload) for r in records], pa.string()),
        "split": pa.array([r.split for r in records], pa.string()),
    }
    for name in targets:
        data[name] = pa.array([r.targets.get(name) for r in records], pa.float64())
    return pa.table(data)


def refresh(
    source: RemoteSource, settings: RemoteSettings, folder: Path, secret: str | None = None
) -> FetchSummary:
    """Fetch `source` into the records folder `folder`: what changed since the last refresh
    when the source can tell, else everything."""
    folder = Path(folder)
    state_path = folder / STATE
    known = json.loads(state_path.read_text()) if state_path.exists() else {}
    fetched = source.fetch(settings, folder, known, secret)
    total = save_records(folder, fetched.records, fetched.rejects)
    if fetched.state is not None:
        text = json.dumps(fetched.state, indent=0, sort_keys=True)
        write_atomic(state_path, lambda tmp: tmp.write_text(text))
    return FetchSummary(
        folder, len(fetched.records), fetched.unchanged, len(fetched.rejects), total
    )


class SourcesConfig(Strict):
    """conf/sources.yaml: the bundled snapshots, and a section per registered remote source
    (see `sources_config`)."""

    snapshots: SnapshotSettings = SnapshotSettings()

    def remote(self) -> dict[str, RemoteSettings | None]:
        """Each registered remote source's settings, None where the file has no section."""
        return {name: getattr(self, name) for name in REGISTRY}


def sources_config(conf_dir: Path = CONF_DIR) -> SourcesConfig:
    """conf/sources.yaml, each source's section validated by that source's settings."""
    sections = {name: (source.settings | None, None) for name, source in REGISTRY.items()}
    model = create_model("SourcesConfig", __base__=SourcesConfig, **sections)
    return load_yaml(Path(conf_dir) / "sources.yaml", model)
