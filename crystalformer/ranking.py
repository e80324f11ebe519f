"""Filters, ranking and the Pareto front over a screening run's results, in memory that does
not grow with the number of candidates.

`write_ranked` reads the result shards a batch at a time and never holds every row:

1. Each group of about RUN_ROWS rows gets `passes_filter` and `score` (the `--filter` and
   `--rank-by` expressions of crystalformer/expressions.py, evaluated with numpy on the
   group's columns: element-wise, so a group gives what the whole table would), is sorted
   and goes to scratch disk as a run (an Arrow IPC file).
2. The Pareto front is kept on the way: the front of all rows read so far is the front of
   the previous front and the new group, so only the front is held (with two objectives it
   is a few rows; at worst, every row that passes the filter).
3. The runs are merged, at most MERGE_FAN_IN at once (more are merged in rounds), into one
   stream in rank order: the rows that pass the filter by score (higher first, missing
   last), the tie-break column (lower first, missing last), id and reading order; then the
   others by id and reading order. `rank` is counted on the way, and the stream is written
   to ranked.parquet ROW_GROUP_ROWS rows at a time.

The order, the columns and their types are those of sorting the whole table with pandas:
each written row group goes through pandas as the whole table used to. `rank` (a DataFrame
in, a DataFrame out) takes the same path.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crystalformer import expressions
from crystalformer.datasets import chunked
from crystalformer.shards import write_atomic

RUN_ROWS = 100_000  # rows sorted in memory at a time (~25 MB of result columns)
MERGE_FAN_IN = 32  # runs merged at once
READ_ROWS = 2_048  # rows each run hands the merge at a time
ROW_GROUP_ROWS = 16_384  # rows per row group of ranked.parquet
SAMPLE_ROWS = 100_000  # rows the report's histograms and property map are drawn from
ORDER = "__order"  # reading order of a row: ties of everything else keep it
SCRATCH = ".ranking-"  # prefix of the scratch folder in the run folder (a killed run's goes)
_SCRATCH_DIR = re.compile(rf"{re.escape(SCRATCH)}[a-z0-9_]{{8}}")
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")


def expression_columns(schema: pa.Schema) -> list[str]:
    """The result columns an expression may read: the numeric and true/false ones."""
    readable = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    return [f.name for f in schema if any(is_type(f.type) for is_type in readable)]


def pareto_front(values: np.ndarray) -> np.ndarray:
    """Rows of (n, 2) `values` (both to maximise) that no other row dominates; of equal
    rows, the first."""
    order = np.lexsort((-values[:, 1], -values[:, 0]))  # first objective, then second, desc
    front = np.zeros(len(values), bool)
    best = -math.inf
    for row in order:
        if values[row, 1] > best:
            front[row] = True
            best = values[row, 1]
    return front


def parse_objectives(spec: str) -> list[tuple[str, float]]:
    """ "band_gap:max,e_above_hull:min" -> [(column, +1 or -1)], exactly two objectives."""
    objectives = []
    for part in spec.split(","):
        column, _, sense = part.strip().partition(":")
        if sense not in ("max", "min"):
            raise ValueError(f"pareto objective {part!r}: write COLUMN:max or COLUMN:min")
        objectives.append((column, 1.0 if sense == "max" else -1.0))
    if len(objectives) != 2:
        raise ValueError(f"pareto {spec!r}: needs exactly two objectives")
    return objectives


@dataclass(frozen=True)
class Ranker:
    """A run's filter, score, tie-break and Pareto objectives, checked against its columns."""

    filter: expressions.Expression | None
    score: expressions.Expression | None
    tie_break: str | None
    objectives: list[tuple[str, float]]

    @classmethod
    def checked(
        cls,
        schema: pa.Schema,
        filter_expr: str | None,
        rank_by: str | None,
        tie_break: str | None,
        pareto: str | None,
    ) -> Ranker:
        columns = expression_columns(schema)
        chosen = expressions.parse(filter_expr, "filter", columns) if filter_expr else None
        score = expressions.parse(rank_by, "rank-by", columns) if rank_by else None
        if tie_break and tie_break not in schema.names:
            raise ValueError(f"tie-break column {tie_break!r} is not a result column")
        objectives = parse_objectives(pareto) if pareto else []
        for column, _ in objectives:
            if column not in schema.names:
                raise ValueError(f"pareto column {column!r} is not a result column")
        return cls(chosen, score, tie_break, objectives)

    def scored(self, table: pa.Table, first: int) -> pa.Table:
        """`table` with `passes_filter`, `score` and its rows' reading order from `first`."""
        read = set().union(*(e.columns for e in (self.filter, self.score) if e is not None))
        columns = {name: table[name].to_numpy() for name in read}
        rows = table.num_rows
        passes = self.filter.mask(columns) if self.filter else np.ones(rows, bool)
        score = self.score.scores(columns) if self.score else np.full(rows, np.nan)
        table = _put(table, "passes_filter", pa.array(passes, pa.bool_()))
        table = _put(table, "score", pa.array(score, pa.float64()))
        return table.append_column(ORDER, pa.array(np.arange(first, first + rows)))

    def keys(self, table: pa.Table | pa.RecordBatch) -> list[tuple]:
        """Sort keys of scored rows. Python tuples, so that sorting a run and merging runs
        compare alike (-0.0 equals 0.0 there, as in pandas)."""
        passes, ids, order = (table[c].to_pylist() for c in ("passes_filter", "id", ORDER))
        scores = table["score"].to_pylist()
        ties = table[self.tie_break].to_pylist() if self.tie_break else [None] * len(ids)
        return [
            (0, *_missing_last(-s if s is not None else s), *_missing_last(t), i, k)
            if p
            else (1, i, k)
            for p, s, t, i, k in zip(passes, scores, ties, ids, order, strict=True)
        ]

    def sorted(self, table: pa.Table) -> pa.Table:
        keys = self.keys(table)
        return table.take(sorted(range(len(keys)), key=keys.__getitem__))


def _missing_last(value) -> tuple:
    return (True, 0) if value is None or value != value else (False, value)


def _put(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """`table` with the column `name` set to `values`: in its place when it has one."""
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, values)
    return table.set_column(index, name, values)


class ParetoFront:
    """The Pareto front of the rows that pass the filter, kept while they are read: their
    reading order and objective values (NaN or infinite values are never on it)."""

    def __init__(self, objectives: list[tuple[str, float]]):
        self.objectives = objectives
        self.values = np.zeros((0, 2))
        self.order = np.zeros(0, np.int64)

    def add(self, table: pa.Table) -> None:
        if not self.objectives:
            return
        values = np.stack(
            [np.asarray(table[c].to_numpy(), np.float64) * s for c, s in self.objectives],
            axis=1,
        )
        passes = table["passes_filter"].to_numpy()
        eligible = passes & np.isfinite(values).all(axis=1)
        # earlier rows first: of equal rows, the one read first stays on the front
        values = np.concatenate([self.values, values[eligible]])
        order = np.concatenate([self.order, table[ORDER].to_numpy()[eligible]])
        front = pareto_front(values)
        self.values, self.order = values[front], order[front]

    def flags(self, order: np.ndarray) -> np.ndarray:
        return np.isin(order, self.order)


def ranked_frames(
    tables: Iterable[pa.Table],
    schema: pa.Schema,
    scratch: Path,
    *,
    filter_expr: str | None = None,
    rank_by: str | None = None,
    tie_break: str | None = None,
    pareto: str | None = None,
) -> Iterator[pd.DataFrame]:
    """The rows of `tables` (all of `schema`) in rank order with `passes_filter`, `score`
    (higher ranks first), `rank` (1 = best among those that pass; empty for the others)
    and, with `pareto`, `pareto_front`, ROW_GROUP_ROWS rows at a time (one empty frame when
    there are none). Sorted runs go to `scratch`.

    Equal scores go by `tie_break` (a column, lower first), then by id; without `rank_by`
    the score is empty and `rank` is the order by id (see screen_run.Ranking)."""
    ranker = Ranker.checked(schema, filter_expr, rank_by, tie_break, pareto)
    front = ParetoFront(ranker.objectives)
    runs: list[Path] = []
    read = 0
    for group in _groups(tables, RUN_ROWS):
        scored = ranker.scored(group, read)
        read += group.num_rows
        front.add(scored)
        runs.append(_write_run([ranker.sorted(scored)], scored.schema, scratch))
    while len(runs) > MERGE_FAN_IN:
        runs = [
            _write_run(_merge(group, ranker, READ_ROWS), _schema_of(group[0]), scratch)
            for group in chunked(runs, MERGE_FAN_IN)
        ]
    ranked = 0
    stream = (
        _merge(runs, ranker, ROW_GROUP_ROWS) if runs else [ranker.scored(schema.empty_table(), 0)]
    )
    for table in stream:
        frame = table.drop_columns([ORDER]).to_pandas()
        passing = int(frame["passes_filter"].sum())  # rows that pass come first
        rank = pd.array([pd.NA] * len(frame), dtype="Int64")
        rank[:passing] = np.arange(ranked + 1, ranked + passing + 1)
        ranked += passing
        frame["rank"] = rank
        if ranker.objectives:
            frame["pareto_front"] = front.flags(table[ORDER].to_numpy())
        yield frame


def _groups(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """`tables` concatenated into tables of about `rows` rows."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        if count >= rows:
            yield pa.concat_tables(held)
            held, count = [], 0
    if held:
        yield pa.concat_tables(held)


def _write_run(tables: Iterable[pa.Table], schema: pa.Schema, scratch: Path) -> Path:
    """Sorted rows into a new run file in `scratch`."""
    path = scratch / f"{uuid.uuid4().hex}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema, options=_IPC) as out:
        for table in tables:
            out.write_table(table, max_chunksize=READ_ROWS)
    return path


def _schema_of(run: Path) -> pa.Schema:
    with pa.OSFile(str(run)) as source:
        return pa.ipc.open_file(source).schema


def _run_rows(run: Path, ranker: Ranker) -> Iterator[tuple[tuple, int, pa.RecordBatch]]:
    """(key, row, batch) of each row of a run, in its order, READ_ROWS rows held at a time."""
    with pa.OSFile(str(run)) as source:
        reader = pa.ipc.open_file(source)
        for k in range(reader.num_record_batches):
            batch = reader.get_batch(k)
            yield from zip(ranker.keys(batch), itertools.count(), itertools.repeat(batch))
    run.unlink()  # merged: its rows are in the stream


def _merge(runs: Sequence[Path], ranker: Ranker, rows: int) -> Iterator[pa.Table]:
    """The rows of sorted runs as one sorted stream, `rows` rows at a time."""
    # keys end in the reading order, so no two are equal and the batches are never compared
    merged = heapq.merge(*(_run_rows(run, ranker) for run in runs))
    for chunk in chunked(merged, rows):
        batches: list[pa.RecordBatch] = []
        start: dict[int, int] = {}  # id(batch) -> its first row in the concatenation
        taken, held = [], 0
        for _, row, batch in chunk:
            if id(batch) not in start:
                start[id(batch)] = held
                held += batch.num_rows
                batches.append(batch)
            taken.append(start[id(batch)] + row)
        yield pa.Table.from_batches(batches).take(taken)


def rank(
    frame: pd.DataFrame,
    *,
    filter_expr: str | None = None,
    rank_by: str | None = None,
    tie_break: str | None = None,
    pareto: str | None = None,
) -> pd.DataFrame:
    """`frame` with `passes_filter`, `score`, `rank` and, with `pareto`, `pareto_front`,
    sorted by rank: ranked_frames on a table in memory (scratch in a temporary folder)."""
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata()
    with tempfile.TemporaryDirectory(prefix=SCRATCH) as scratch:
        frames = ranked_frames(
            [table], table.schema, Path(scratch), filter_expr=filter_expr, rank_by=rank_by,
            tie_break=tie_break, pareto=pareto,
        )  # fmt: skip
        return pd.concat(list(frames), ignore_index=True)


@dataclass(frozen=True)
class RankedRun:
    """What ranking a run gives besides ranked.parquet."""

    rows: int
    passed: int  # rows that pass the filter
    sample: pd.DataFrame  # the report's rows, in rank order (see write_ranked)


def write_ranked(
    files: Sequence[Path],
    path: Path,
    *,
    filter_expr: str | None = None,
    rank_by: str | None = None,
    tie_break: str | None = None,
    pareto: str | None = None,
    top: int = 50,
) -> RankedRun:
    """ranked.parquet at `path` (atomically) from result shards, in memory that does not
    grow with their rows (see the module's docstring); scratch runs go to a folder beside
    `path`, removed at the end (a killed run's, by the next).

    The sample for the report holds, in rank order, the first `top` rows that pass the
    filter, the Pareto front and every n-th row of the ranked stream (at most SAMPLE_ROWS
    of those): the report's histograms and property map are of this sample, a systematic
    one along the ranking."""
    for stale in path.parent.glob(f"{SCRATCH}*"):
        if stale.is_dir() and _SCRATCH_DIR.fullmatch(stale.name):  # ours: tempfile's names
            shutil.rmtree(stale, ignore_errors=True)
    files = sorted(files)
    schema = _result_schema(files)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    every = max(1, math.ceil(rows / SAMPLE_ROWS))
    sample: list[pd.DataFrame] = []
    passed = 0

    def write(tmp: Path) -> None:
        nonlocal passed
        with tempfile.TemporaryDirectory(prefix=SCRATCH, dir=path.parent) as scratch:
            frames = ranked_frames(
                _read_results(files), schema, Path(scratch), filter_expr=filter_expr,
                rank_by=rank_by, tie_break=tie_break, pareto=pareto,
            )  # fmt: skip
            first = next(frames)  # there is always one
            written = pa.Table.from_pandas(first, preserve_index=False).schema
            at = 0
            with pq.ParquetWriter(tmp, written, compression="zstd") as writer:
                for frame in itertools.chain([first], frames):
                    writer.write_table(
                        pa.Table.from_pandas(frame, schema=written, preserve_index=False)
                    )
                    sample.append(frame[_in_sample(frame, at, every, top)])
                    passed += int(frame["passes_filter"].sum())
                    at += len(frame)

    write_atomic(path, write)
    return RankedRun(rows, passed, pd.concat(sample, ignore_index=True))


def _in_sample(frame: pd.DataFrame, at: int, every: int, top: int) -> np.ndarray:
    """Which rows of `frame` (rows `at`... of the ranking) the report's sample keeps."""
    keep = np.arange(at, at + len(frame)) % every == 0
    keep |= (frame["rank"] <= top).fillna(False).to_numpy(bool)
    if "pareto_front" in frame:
        keep |= frame["pareto_front"].to_numpy()
    return keep


def report_sample(path: Path, top: int) -> pd.DataFrame:
    """The sample write_ranked gave the report, read back from ranked.parquet one row group
    at a time (`crystalformer report` redraws the page of a finished run)."""
    file = pq.ParquetFile(path)
    every = max(1, math.ceil(file.metadata.num_rows / SAMPLE_ROWS))
    sample, at = [], 0
    for index in range(file.num_row_groups):
        frame = file.read_row_group(index).to_pandas()
        sample.append(frame[_in_sample(frame, at, every, top)])
        at += len(frame)
    if not sample:
        return file.schema_arrow.empty_table().to_pandas()
    return pd.concat(sample, ignore_index=True)


def rows_with_ids(path: Path, ids: Iterable[str]) -> pd.DataFrame:
    """The rows of ranked.parquet whose id is one of `ids`, in rank order, read one row group
    at a time: a labelled subset of millions of candidates without holding them all."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    file = pq.ParquetFile(path)
    parts = [file.schema_arrow.empty_table()]
    for index in range(file.num_row_groups):
        group = file.read_row_group(index)
        parts.append(group.filter(pc.is_in(group["id"], value_set=wanted)))
    return pa.concat_tables(parts).to_pandas()


def passing_head(path: Path, top: int) -> pd.DataFrame:
    """The first `top` rows of ranked.parquet that pass the filter: they lead the file, so
    only its first row groups are read, whatever the number of candidates."""
    file = pq.ParquetFile(path)
    frames, found = [], 0
    for index in range(file.num_row_groups):
        if found >= top:
            break
        frames.append(file.read_row_group(index).to_pandas())
        found += int(frames[-1]["passes_filter"].sum())
    if not frames:
        return file.schema_arrow.empty_table().to_pandas()
    head = pd.concat(frames, ignore_index=True)
    return head[head["passes_filter"]].head(top)


def _result_schema(files: Sequence[Path]) -> pa.Schema:
    """The columns every result shard has (no shard: none)."""
    if not files:
        return pa.schema([])
    schema = pq.read_schema(files[0]).remove_metadata()
    for file in files[1:]:
        other = pq.read_schema(file).remove_metadata()
        if not other.equals(schema):
            raise ValueError(
                f"result shard {file} has other columns than {files[0]}: screen feature "
                "folders with the same label columns in one run"
            )
    return schema


def _read_results(files: Sequence[Path]) -> Iterator[pa.Table]:
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=READ_ROWS):
            yield pa.Table.from_batches([batch]).replace_schema_metadata()
