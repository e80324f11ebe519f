"""Local inputs: files, folders and tables read into RawInputs (one per crystal), or Rejects.

Supported: CIF, POSCAR/CONTCAR/.vasp, pymatgen Structure JSON, tables (CSV, CSV.gz, Parquet,
pandas "split" JSON) with an id column and a `cif`, `poscar` or `structure` column, and folders
of such files, where a file's id is its stem. Nothing is parsed here; that is `structures`.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from crystalformer.records import RawInput, Reject
from crystalformer.targets import clean_label, log10_positive

STRUCTURE_COLUMNS = {"cif": "cif", "poscar": "poscar", "structure": "structure", "arrays": "arrays"}
ID_COLUMNS = ("id", "material_id", "jid")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
# Rows read from a table at a time. The reader's batch (Arrow buffers and the pandas copy of
# its strings) is the largest thing a featurising main process holds, and a stretch of large
# crystals makes it so: at 5000 rows its RSS swung by 120 MiB from batch to batch on
# generated mp2018 candidates; at 1000, by 50, at the same speed.
ROWS_PER_READ = 1000


@dataclass(frozen=True)
class TargetColumn:
    """A target read from a table column, optionally transformed (log10 for moduli)."""

    column: str
    unit: str | None = None
    transform: Literal["log10"] | None = None

    def value(self, raw: Any) -> float | None:
        number = clean_label(raw)
        return log10_positive(number) if self.transform == "log10" else number


@dataclass(frozen=True)
class TableSpec:
    """How to read one table: which columns hold id, structure, targets and split.

    With `targets=None` every numeric column that is not the id becomes a target of the
    same name.
    """

    source: str
    id_column: str | None = None
    structure_column: str | None = None
    targets: Mapping[str, TargetColumn] | None = None
    split_column: str | None = None
    split_values: Mapping[str, str | None] = field(default_factory=dict)


def input_format(path: Path) -> str | None:
    """'cif', 'poscar', 'structure', 'table', or None for a file that is no crystal input."""
    name = path.name.lower()
    if name.endswith(".cif"):
        return "cif"
    if name.endswith((".vasp", ".poscar")) or name.startswith(("poscar", "contcar")):
        return "poscar"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    if name.endswith((".json", ".json.gz")):
        return "json"
    return None


def iter_path(path: Path, source: str | None = None) -> Iterator[RawInput | Reject]:
    """Inputs from a file or a folder (searched recursively, hidden entries skipped)."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_folder(path, source or path.name)
    elif path.exists():
        yield from _iter_file(path, source or _stem(path))
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")


def count_path(path: Path) -> int | None:
    """How many inputs iter_path(path) yields, for a progress bar's total: one per structure
    file or unreadable entry, a table's rows, summed over a folder. None when that is not
    cheap to know (a JSON table would be parsed whole) or a table cannot be read."""
    path = Path(path)
    if not path.is_dir():
        return _count_file(path)
    try:
        children = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    except OSError:
        return 1  # one Reject: the folder cannot be listed
    counts = [_count_entry(child) for child in children]
    return None if None in counts else sum(counts)


def _count_entry(entry: Path) -> int | None:
    """As _iter_folder reads an entry: a folder searched, a file read, anything else a Reject."""
    if entry.is_dir() and not entry.is_symlink():
        return count_path(entry)
    if entry.is_file():
        return _count_file(entry)
    return 1  # a dangling link, a link to a folder, a pipe: one Reject


def _count_file(path: Path) -> int | None:
    kind = input_format(path)
    if kind == "table":
        return count_table(path)
    if kind == "json" and path.is_file() and _opens_a_split_table(path):
        return None
    return 1  # a structure, or one Reject


def count_table(path: Path) -> int | None:
    """A table's rows: from a Parquet file's metadata, or one pass over a CSV that keeps its
    first column only (0.4 s for mp2018's 27,424 training rows); None for a JSON table or an
    unreadable file."""
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.ParquetFile(path).metadata.num_rows
        if name.endswith((".csv", ".csv.gz")):
            return sum(len(chunk) for chunk in pd.read_csv(path, usecols=[0], chunksize=50_000))
    except (ValueError, OSError):
        pass
    return None


def _opens_a_split_table(path: Path) -> bool:
    """A pandas "split" JSON table writes its columns first; a Structure JSON does not."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return '"columns"' in handle.read(64)
    except (OSError, UnicodeDecodeError):
        return False


def _iter_folder(folder: Path, source: str) -> Iterator[RawInput | Reject]:
    """Every entry of a folder, in name order, is read or becomes a Reject saying why not.

    Symbolic links to files are followed; links to folders are not (they can loop).
    """
    try:
        children = sorted(folder.iterdir())
    except OSError as error:
        yield Reject(folder.name, source, "read", f"cannot list folder: {error}", str(folder))
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir() and not child.is_symlink():
            yield from _iter_folder(child, source)
        elif child.is_file():
            yield from _iter_file(child, source)
        else:
            yield Reject(_stem(child), source, "read", _not_a_file(child), str(child))


def _not_a_file(path: Path) -> str:
    """Why a folder entry that is neither a file nor a folder cannot be read."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        if error.errno == errno.ENOENT:
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot read: {error.strerror}"
    if path.is_dir():
        return "symbolic link to a folder (not followed: links to folders can loop)"
    return "not a regular file (a pipe, socket or device)"


def _iter_file(path: Path, source: str) -> Iterator[RawInput | Reject]:
    kind = input_format(path)
    stem = _stem(path)
    if kind is None:
        yield Reject(stem, source, "read", "not a crystal input (unknown file type)", str(path))
        return
    if kind == "table":
        yield from _iter_table_file(path, TableSpec(source=source))
        return
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as error:
        yield Reject(stem, source, "read", f"cannot read file: {error}", str(path))
        return
    if kind != "json":
        yield RawInput(stem, source, kind, text, origin=str(path))
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        yield Reject(stem, source, "read", f"invalid JSON: {error}", str(path))
        return
    if isinstance(data, dict) and {"columns", "data"} <= data.keys():
        yield from _iter_table_file(path, TableSpec(source=source))
    else:
        yield RawInput(stem, source, "structure", data, origin=str(path))


def _iter_table_file(path: Path, spec: TableSpec) -> Iterator[RawInput | Reject]:
    """A table found among the inputs; one that is no crystal table becomes a Reject."""
    try:
        yield from iter_table(path, spec)
    except (ValueError, OSError) as error:  # no id/structure column, corrupt file
        text = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
        yield Reject(_stem(path), spec.source, "read", f"unreadable table: {text}", str(path))


def iter_table(path: Path, spec: TableSpec) -> Iterator[RawInput | Reject]:
    """Rows of a table as RawInputs; a row with no id or no structure becomes a Reject."""
    first = True
    offset = 0
    for frame in _read_frames(Path(path)):
        if first:
            id_column = spec.id_column or _pick(frame, ID_COLUMNS, "id", path)
            structure_column = spec.structure_column or _pick(
                frame, tuple(STRUCTURE_COLUMNS), "structure", path
            )
            targets = spec.targets
            if targets is None:
                targets = _numeric_targets(frame, exclude={id_column, spec.split_column})
            first = False
        yield from _table_rows(frame, offset, path, spec, id_column, structure_column, targets)
        offset += len(frame)


def _table_rows(frame, offset, path, spec, id_column, structure_column, targets):
    fmt = STRUCTURE_COLUMNS.get(structure_column, "cif")
    ids = frame[id_column].tolist()
    payloads = frame[structure_column].tolist()
    labels = {name: frame[t.column].tolist() for name, t in targets.items()}
    splits = frame[spec.split_column].tolist() if spec.split_column else None
    for k, (crystal_id, payload) in enumerate(zip(ids, payloads, strict=True)):
        origin = f"{path}:row {offset + k}"
        if _missing(crystal_id):
            yield Reject(f"{Path(path).name}#{offset + k}", spec.source, "read", "no id", origin)
            continue
        crystal_id = str(crystal_id)
        if _missing(payload):
            reason = f"no structure in column {structure_column!r}"
            yield Reject(crystal_id, spec.source, "read", reason, origin)
            continue
        split = None
        if splits is not None and not _missing(splits[k]):
            split = spec.split_values.get(str(splits[k]), str(splits[k]))
        yield RawInput(
            id=crystal_id,
            source=spec.source,
            format=fmt,
            payload=payload,
            targets={name: targets[name].value(labels[name][k]) for name in targets},
            split=split,
            origin=origin,
        )


def _read_frames(path: Path) -> Iterator[pd.DataFrame]:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_READ):
            yield batch.to_pandas()
    elif name.endswith((".json", ".json.gz")):
        frame = pd.read_json(path, orient="split")
        yield frame.reset_index().rename(columns={"index": "id"}) if "id" not in frame else frame
    else:
        yield from pd.read_csv(path, chunksize=ROWS_PER_READ)


def _pick(frame: pd.DataFrame, candidates: tuple[str, ...], what: str, path: Path) -> str:
    for name in candidates:
        if name in frame.columns:
            return name
    raise ValueError(
        f"{path}: no {what} column; expected one of {', '.join(candidates)} "
        f"(columns are: {', '.join(map(str, frame.columns))})"
    )


def _numeric_targets(frame: pd.DataFrame, exclude: set) -> dict[str, TargetColumn]:
    return {
        str(name): TargetColumn(str(name))
        for name in frame.columns
        if name not in exclude
        and pd.api.types.is_numeric_dtype(frame[name])
        and not pd.api.types.is_bool_dtype(frame[name])
    }


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _stem(path: Path) -> str:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def _read_text(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    return path.read_text(encoding="utf-8")
