"""Featurised datasets on disk: Parquet shards, a manifest, and a rejects table.

Layout of a dataset folder (a public contract, see README "Shard format"):

    manifest.json        schema version, r_cut, cell, targets, shards with rows and sha256
    shard-VVVV-XXXX.parquet   one row per crystal (columns in `base_schema`)
    rejects.parquet/     id, source, stage, reason, origin: a Parquet dataset folder of
                         part-VVVV-XXXX.parquet files, one per commit that had new rejects
                         (pandas and pyarrow read it as one table; so does `read_rejects`)

Every file is written to a temporary name and renamed, and the manifest is written last, so
a killed run leaves the previous state intact. Rejects are appended: a commit writes its new
ones as a part and rewrites only a part one of whose rejects it replaces (an id now
accepted, or rejected otherwise). Debris is a file of one of our own name patterns (a shard,
a rejects part, a temporary) that the manifest does not list; nothing else in the folder is
ever removed, and a non-empty folder without a manifest is refused, not written into.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crystalformer.featurize import FeaturizedCrystal, FeaturizeSettings, record_key
from crystalformer.idindex import IdIndex
from crystalformer.lattice import ImageList
from crystalformer.records import Crystal, Reject, SiteOccupancy
from crystalformer.version import __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
LOCK = ".lock"
REJECT_COLUMNS = ("id", "source", "stage", "reason", "origin")
REJECT_SCHEMA = pa.schema([(name, pa.string()) for name in REJECT_COLUMNS])
DUPLICATE = "duplicate"  # reject stage of an id read twice in one run; the first copy stays
# The columns that hold a crystal's structure (shards._crystal reads them back).
CRYSTAL_COLUMNS = (
    "id", "source", "n_atoms", "atomic_numbers", "disorder_site", "disorder_z",
    "disorder_occupancy", "positions", "lattice", "split",
)  # fmt: skip
ROWS_PER_ROW_GROUP = 2048
IMAGES_PER_ROW_GROUP = 1_000_000  # ~15 MB of image columns in memory
SHARD_STEM = r"shard-\d{4,}-[0-9a-f]{12}"  # new_shard_name: dataset version, 12 hex digits
# What a run writes and a killed run may leave: shards, write_atomic's `.NAME.PID.tmp`, and
# the scratch id index `.ids-*.tmp` (crystalformer/idindex.py).
_WRITTEN_HERE = re.compile(
    rf"{SHARD_STEM}\.parquet"
    rf"|\.({SHARD_STEM}\.parquet|{re.escape(MANIFEST)}|{re.escape(REJECTS)})\.\d+\.tmp"
    r"|\.ids-\w+\.tmp"
)
_REJECT_PART = r"part-\d{4,}-[0-9a-f]{12}\.parquet"  # DatasetFolder._new_reject_part
_WRITTEN_IN_REJECTS = re.compile(rf"{_REJECT_PART}|\.{_REJECT_PART}\.\d+\.tmp")


def base_schema() -> pa.Schema:
    """Columns every shard has; one nullable float64 column per target follows them."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("formula", pa.string()),
            ("n_atoms", pa.int32()),
            ("atomic_numbers", pa.list_(pa.int16())),
            ("disorder_site", pa.list_(pa.int32())),
            ("disorder_z", pa.list_(pa.int16())),
            ("disorder_occupancy", pa.list_(pa.float64())),
            ("positions", pa.list_(pa.float64())),
            ("lattice", pa.list_(pa.float64())),
            ("image_pair", pa.list_(pa.int32())),
            ("image_shift", pa.list_(pa.int8())),
            ("image_dist", pa.list_(pa.float32())),
            ("equivalent_atom", pa.list_(pa.int32())),
            ("split", pa.string()),
            ("structure_hash", pa.string()),
        ]
    )


def shard_schema(targets: list[str], settings: FeaturizeSettings) -> pa.Schema:
    schema = base_schema()
    for name in targets:
        schema = schema.append(pa.field(name, pa.float64()))
    metadata = {
        "schema_version": str(SCHEMA_VERSION),
        "r_cut": repr(settings.r_cut),
        "cell": settings.cell,
        "symprec": repr(settings.symprec),
        "library_version": __version__,
        "targets": json.dumps(targets),
    }
    return schema.with_metadata(metadata)


def _list_array(parts: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """One list<value_type> array from per-row numpy arrays, without a Python loop per value."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(part) for part in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.LargeListArray.from_arrays(offsets, pa.array(values, type=value_type)).cast(
        pa.list_(value_type)
    )


def rows_to_table(
    rows: list[FeaturizedCrystal], targets: list[str], settings: FeaturizeSettings
) -> pa.Table:
    """Columnar shard table of featurised crystals."""
    crystals = [row.crystal for row in rows]
    empty_int = np.zeros(0, np.int64)
    disorder = [c.disorder for c in crystals]
    columns = {
        "id": pa.array([c.id for c in crystals], pa.string()),
        "source": pa.array([c.source for c in crystals], pa.string()),
        "formula": pa.array([row.formula for row in rows], pa.string()),
        "n_atoms": pa.array([c.n_atoms for c in crystals], pa.int32()),
        "atomic_numbers": _list_array([c.numbers for c in crystals], pa.int16()),
        "disorder_site": _list_array([d.site if d else empty_int for d in disorder], pa.int32()),
        "disorder_z": _list_array([d.z if d else empty_int for d in disorder], pa.int16()),
        "disorder_occupancy": _list_array(
            [d.occupancy if d else np.zeros(0) for d in disorder], pa.float64()
        ),
        "positions": _list_array([c.cart_coords.ravel() for c in crystals], pa.float64()),
        "lattice": _list_array([c.lattice.ravel() for c in crystals], pa.float64()),
        "image_pair": _list_array([row.images.pair for row in rows], pa.int32()),
        "image_shift": _list_array([row.images.shift.ravel() for row in rows], pa.int8()),
        "image_dist": _list_array([row.images.dist for row in rows], pa.float32()),
        "equivalent_atom": _list_array([row.equivalent_atom for row in rows], pa.int32()),
        "split": pa.array([c.split for c in crystals], pa.string()),
        "structure_hash": pa.array([row.structure_hash for row in rows], pa.string()),
    }
    for name in targets:
        columns[name] = pa.array([c.targets.get(name) for c in crystals], pa.float64())
    return pa.table(columns, schema=shard_schema(targets, settings))


def table_to_rows(table: pa.Table) -> Iterator[FeaturizedCrystal]:
    """Featurised crystals back from a shard table (the inverse of rows_to_table)."""
    metadata = table.schema.metadata or {}
    targets = json.loads(metadata.get(b"targets", b"[]"))
    for record in table.to_pylist():
        n_atoms = record["n_atoms"]
        crystal = _crystal(record, targets)
        images = ImageList(
            np.array(record["image_pair"], np.int32),
            np.array(record["image_shift"], np.int8).reshape(-1, 3),
            np.array(record["image_dist"], np.float64),
        )
        # shards written before the column existed: every atom on its own
        equivalent = np.array(record.get("equivalent_atom") or range(n_atoms), np.int64)
        yield FeaturizedCrystal(
            crystal, images, record["structure_hash"], record["formula"], equivalent
        )


def _crystal(record: dict, targets: list[str]) -> Crystal:
    """The crystal of one shard row (a dict of the CRYSTAL_COLUMNS and the targets)."""
    lattice = np.array(record["lattice"]).reshape(3, 3)
    positions = np.array(record["positions"]).reshape(record["n_atoms"], 3)
    disorder = None
    if record["disorder_site"]:
        disorder = SiteOccupancy(
            np.array(record["disorder_site"]),
            np.array(record["disorder_z"], np.int16),
            np.array(record["disorder_occupancy"]),
        )
    return Crystal(
        id=record["id"],
        source=record["source"],
        lattice=lattice,
        frac_coords=positions @ np.linalg.inv(lattice),
        numbers=np.array(record["atomic_numbers"], np.int16),
        disorder=disorder,
        targets={name: record.get(name) for name in targets},
        split=record["split"],
    )


def rejects_path(out: Path) -> Path:
    """Where a table written to `out` (predictions, candidates) has its rejects beside it."""
    return out.with_name(f"{out.stem}.rejects.csv")


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename onto path: readers never see a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_parquet(table: pa.Table, path: Path) -> None:
    """zstd; dictionary encoding only for text columns (it slows list columns, saves nothing).

    Row groups hold at most IMAGES_PER_ROW_GROUP images, so a reader that takes one row group
    at a time (screening) needs the same memory for a shard of big crystals as of small ones.
    """
    text = [f.name for f in table.schema if pa.types.is_string(f.type)]
    images = pc.list_value_length(table["image_dist"]).to_numpy(zero_copy_only=False)
    with pq.ParquetWriter(path, table.schema, compression="zstd", use_dictionary=text) as writer:
        for start, stop in cut_by_total(images, IMAGES_PER_ROW_GROUP, ROWS_PER_ROW_GROUP):
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)


def cut_by_total(
    counts: np.ndarray, max_total: int, max_rows: int | None = None
) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges whose `counts` sum to at most `max_total`, of at most
    `max_rows` rows (a row counting more than `max_total` is a range of its own)."""
    groups, start, total = [], 0, 0
    for row, count in enumerate(counts.tolist()):
        if row > start and (total + count > max_total or row - start == max_rows):
            groups.append((start, row))
            start, total = row, 0
        total += count
    if start < len(counts):
        groups.append((start, len(counts)))
    return groups


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    sha256: str
    version: int


def write_shard(
    folder: Path,
    name: str,
    rows: list[FeaturizedCrystal],
    targets: list[str],
    settings: FeaturizeSettings,
    version: int,
) -> ShardInfo:
    """Write one shard atomically; safe to call from a worker process on a shared filesystem."""
    table = rows_to_table(rows, targets, settings)
    path = Path(folder) / name
    write_atomic(
        path,
        lambda tmp: _write_parquet(table, tmp),
    )
    return ShardInfo(name, table.num_rows, sha256_of(path), version)


@dataclass
class Manifest:
    """The dataset's table of contents; the single source of truth for which files count."""

    r_cut: float
    cell: str
    symprec: float
    min_distance: float
    schema_version: int = SCHEMA_VERSION
    library_version: str = __version__
    version: int = 0
    targets: dict[str, str | None] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    rejects: int = 0
    reject_parts: list[str] = field(default_factory=list)  # files in rejects.parquet/
    updated: str = ""

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        path = Path(folder) / MANIFEST
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
        return cls(**data)

    def save(self, folder: Path) -> None:
        self.updated = datetime.now(UTC).isoformat(timespec="seconds")
        text = json.dumps(asdict(self), indent=1)
        write_atomic(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text))

    def settings(self) -> FeaturizeSettings:
        return FeaturizeSettings(
            self.r_cut, self.cell == "primitive", self.symprec, self.min_distance
        )


class DatasetMismatch(ValueError):
    """The folder holds a dataset featurised with other settings."""


class DatasetBusy(RuntimeError):
    """Another process is writing to the dataset folder."""


class NotADatasetFolder(ValueError):
    """The folder holds files this project did not write: it is someone's, not ours to fill."""


class DatasetFolder:
    """A featurised dataset being written: the driver's view, committing one shard at a time."""

    def __init__(self, path: Path, settings: FeaturizeSettings, targets: Mapping[str, str | None]):
        self.path = Path(path)
        _refuse_unless_ours(self.path)  # before .lock is made: a refused folder stays untouched
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = _lock_folder(self.path)
        self.ids: IdIndex | None = None
        try:
            self._open(settings, targets)
        except BaseException:  # a refused folder (DatasetMismatch) must not stay locked
            self.close()
            raise

    def _open(self, settings: FeaturizeSettings, targets: Mapping[str, str | None]) -> None:
        self.changed = False
        self.settings = settings
        manifest = Manifest.load(self.path)
        if manifest is None:
            manifest = Manifest(
                settings.r_cut, settings.cell, settings.symprec, settings.min_distance
            )
        elif manifest.settings() != settings:
            raise DatasetMismatch(
                f"{self.path} was featurised with {manifest.settings()}, not {settings}: "
                "write to a new --out folder"
            )
        for name, unit in targets.items():
            manifest.targets.setdefault(name, unit)
        self.manifest = manifest
        self._remove_debris()
        self.ids = IdIndex(self.path)
        for shard in manifest.shards:
            self._index(shard.file)
        self._take_up_single_rejects_file()
        for part in manifest.reject_parts:
            rows = pq.read_table(self.path / REJECTS / part).to_pylist()
            self.ids.add_rejects(part, (Reject(**row) for row in rows))

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest.targets)

    def new_shard_name(self) -> str:
        """A fresh file name; the version says which dataset version first held it."""
        return f"shard-{self.manifest.version + 1:04d}-{uuid.uuid4().hex[:12]}.parquet"

    def commit(self, shard: ShardInfo | None, accepted: list[str], rejects: list[Reject]) -> None:
        """Make a written shard and its chunk's rejects part of the dataset, atomically.

        A reject replaces the stored one of its (id, origin); an accepted id leaves the
        rejects (but its duplicates stay); a reject equal to the stored one changes nothing."""
        replaced = self._drop_rows(accepted)  # earlier rows of ids this shard holds now
        if shard is not None:
            self.manifest.shards.append(shard)
            self._index(shard.file)
        (self.path / REJECTS).mkdir(exist_ok=True)
        latest = {(r.id, r.origin): r for r in rejects}
        stored = self.ids.stored_rejects(latest)
        new = [r for key, r in latest.items() if stored.get(key) != r]
        gone = [key for key in stored if stored[key] != latest[key]]
        gone += self.ids.rejects_of(accepted, but_stage=DUPLICATE)
        for reject in rejects:
            if reject.stage != DUPLICATE:
                self._forget(reject.id)
        rewritten = self._drop_rejects(gone)
        if new:
            part = _reject_part_name(self.manifest.version + 1)
            table = pa.Table.from_pylist([asdict(r) for r in new], schema=REJECT_SCHEMA)
            write_atomic(self.path / REJECTS / part, lambda tmp: pq.write_table(table, tmp))
            self.manifest.reject_parts.append(part)
            self.ids.add_rejects(part, new)
        self.changed |= shard is not None or bool(replaced) or bool(new or gone)
        self.manifest.rejects = self.ids.count_rejects()
        self.manifest.save(self.path)
        for old in replaced:
            (self.path / old).unlink(missing_ok=True)
        for old in rewritten:
            (self.path / REJECTS / old).unlink(missing_ok=True)

    def finish(self) -> None:
        """End the run: a run that changed anything makes a new dataset version."""
        if self.changed:
            self.manifest.version += 1
            self.manifest.save(self.path)

    def close(self) -> None:
        """Let another run write to the folder."""
        if self.ids is not None:
            self.ids.close()
            self.ids = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _index(self, file: str) -> None:
        """Learn which ids a shard holds and the record key of each (a few columns only)."""
        path = self.path / file
        present = set(pq.read_schema(path).names)
        targets = [name for name in self.manifest.targets if name in present]
        table = pq.read_table(path, columns=["id", "structure_hash", "split", *targets])
        keys = []
        for record in table.to_pylist():
            labels = {name: record.get(name) for name in self.manifest.targets}
            key = record_key(record["structure_hash"], labels, record["split"])
            keys.append((record["id"], key))
        self.ids.add(file, keys)

    def _forget(self, crystal_id: str) -> None:
        """A crystal that is now rejected leaves the shards."""
        for old in self._drop_rows([crystal_id]):
            (self.path / old).unlink(missing_ok=True)

    def _drop_rows(self, ids: list[str]) -> list[str]:
        """Rewrite the shards holding `ids` without them; returns the files replaced."""
        by_file = self.ids.remove(ids)
        for file, drop in by_file.items():
            table = pq.read_table(self.path / file)
            keep = pc.invert(pc.is_in(table["id"], pa.array(sorted(drop))))
            table = table.filter(keep)
            position = next(k for k, s in enumerate(self.manifest.shards) if s.file == file)
            new_file = self.new_shard_name()
            if table.num_rows:
                write_atomic(
                    self.path / new_file,
                    lambda tmp, t=table: _write_parquet(t, tmp),
                )
                self.manifest.shards[position] = ShardInfo(
                    new_file,
                    table.num_rows,
                    sha256_of(self.path / new_file),
                    self.manifest.version + 1,
                )
                self.ids.move(file, new_file)
            else:
                del self.manifest.shards[position]
        return list(by_file)

    def _drop_rejects(self, keys: list[tuple[str, str]]) -> list[str]:
        """Rewrite the rejects parts holding `keys` (id, origin) without them; returns the
        parts replaced."""
        by_part = self.ids.remove_rejects(keys)
        for part, drop in by_part.items():
            table = pq.read_table(self.path / REJECTS / part)
            pairs = zip(table["id"].to_pylist(), table["origin"].to_pylist(), strict=True)
            table = table.filter(pa.array([pair not in drop for pair in pairs], pa.bool_()))
            position = self.manifest.reject_parts.index(part)
            if table.num_rows:
                new_part = _reject_part_name(self.manifest.version + 1)
                write_atomic(
                    self.path / REJECTS / new_part, lambda tmp, t=table: pq.write_table(t, tmp)
                )
                self.manifest.reject_parts[position] = new_part
                self.ids.move_rejects(part, new_part)
            else:
                del self.manifest.reject_parts[position]
        return list(by_part)

    def _take_up_single_rejects_file(self) -> None:
        """A folder written before rejects were appended has them in one file: it becomes
        the first part. (A run killed before the manifest lists it loses them: their inputs
        are rejected again when they are read again.)"""
        single = self.path / REJECTS
        if not single.is_file():
            return
        staging = self.path / f".{REJECTS}.{os.getpid()}.tmp"
        staging.mkdir()
        part = _reject_part_name(self.manifest.version)
        os.replace(single, staging / part)
        os.replace(staging, single)
        self.manifest.reject_parts = [part]
        self.manifest.save(self.path)

    def _remove_debris(self) -> None:
        """What a killed run left: our own shards and rejects parts the manifest does not
        list, our temporaries."""
        listed = {shard.file for shard in self.manifest.shards}
        for path in self.path.iterdir():
            if not _WRITTEN_HERE.fullmatch(path.name) or path.name in listed:
                continue
            if path.is_dir():  # a killed run's staging of the rejects (below)
                shutil.rmtree(path)
            else:
                path.unlink()
        parts = self.path / REJECTS
        if parts.is_dir():
            for path in parts.iterdir():
                listed = path.name in self.manifest.reject_parts
                if _WRITTEN_IN_REJECTS.fullmatch(path.name) and not listed:
                    path.unlink()


def _reject_part_name(version: int) -> str:
    """A fresh rejects part; the version says which dataset version first held it."""
    return f"part-{version:04d}-{uuid.uuid4().hex[:12]}.parquet"


def _refuse_unless_ours(path: Path) -> None:
    """A folder to write a dataset into: new, empty, a dataset (it has a manifest), or one
    that holds nothing but our own files (a first run killed before its first commit).
    Anything else holds a user's files, which are left exactly as they are."""
    if not path.exists():
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: choose an empty or new --out folder")
    if (path / MANIFEST).exists():
        return
    foreign = sorted(
        p.name for p in path.iterdir() if p.name != LOCK and not _WRITTEN_HERE.fullmatch(p.name)
    )
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise NotADatasetFolder(
            f"{path} is not empty and is not a dataset folder (no {MANIFEST}; it holds "
            f"{listed}): choose an empty or new --out"
        )


def _lock_folder(path: Path) -> int:
    """One writer per dataset folder; the OS drops the lock when the process dies."""
    fd = os.open(path / LOCK, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatasetBusy(f"another run is writing to {path}; wait for it to finish") from None
    return fd


def read_dataset(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a dataset as one table (the manifest decides which files count)."""
    manifest = Manifest.load(Path(folder))
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a featurised dataset")
    tables = [_read_columns(Path(folder) / s.file, columns) for s in manifest.shards]
    if not tables:
        return shard_schema(list(manifest.targets), manifest.settings()).empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    # Shards written before a target was added lack its column (read as null), and the first
    # shard's metadata would name only its own targets: the manifest lists them all.
    targets = json.dumps(list(manifest.targets)).encode()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"targets": targets})


def iter_crystals(folder: Path) -> Iterator[Crystal]:
    """The crystals of a dataset folder, shard by shard in manifest order, a batch of rows in
    memory at a time; only the structure columns are read (no images, no targets)."""
    manifest = Manifest.load(Path(folder))
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a featurised dataset")
    for shard in manifest.shards:
        reader = pq.ParquetFile(Path(folder) / shard.file)
        for batch in reader.iter_batches(columns=list(CRYSTAL_COLUMNS)):
            for record in batch.to_pylist():
                yield _crystal(record, [])


def _read_columns(path: Path, columns: list[str] | None) -> pa.Table:
    """The shard's columns among `columns` (a shard written before a column existed lacks
    it; concatenated with newer shards, it reads as null)."""
    if columns is not None:
        present = set(pq.read_schema(path).names)
        columns = [name for name in columns if name in present]
    return pq.read_table(path, columns=columns)


def read_rejects(folder: Path) -> pa.Table:
    """The rejects of a dataset folder (id, source, stage, reason, origin): the parts its
    manifest lists, or the one file of a folder written before rejects were appended."""
    path = Path(folder) / REJECTS
    if path.is_file():
        return pq.read_table(path)
    manifest = Manifest.load(Path(folder))
    parts = [pq.read_table(path / part) for part in (manifest.reject_parts if manifest else [])]
    return pa.concat_tables([REJECT_SCHEMA.empty_table(), *parts])
