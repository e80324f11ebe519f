"""The driver's per-crystal bookkeeping, on disk, so its memory does not grow with the
number of crystals a run reads.

A SQLite database in a temporary file inside the dataset folder holds which shard holds
each id and its record key, and which ids this run has read. It is rebuilt from the shards
at the start of every run, so it never disagrees with the manifest; a killed run leaves it
as debris (a `.tmp` file) that the next run removes.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path

# SQLite's smallest limit on parameters per statement (before 3.32) is 999.
_IDS_PER_QUERY = 900


class IdIndex:
    """Ids of a dataset folder: shard and record key of each stored crystal, and the ids
    read so far in this run with where each was read from."""

    def __init__(self, folder: Path):
        handle, name = tempfile.mkstemp(dir=folder, prefix=".ids-", suffix=".tmp")
        os.close(handle)
        self.path = Path(name)
        self._db = sqlite3.connect(name)
        # A scratch file rebuilt every run: no journal, no fsync.
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE stored (id TEXT PRIMARY KEY, shard TEXT, key TEXT)")
        self._db.execute("CREATE INDEX stored_shard ON stored (shard)")
        self._db.execute("CREATE TABLE read (id TEXT PRIMARY KEY, origin TEXT)")

    def add(self, shard: str, keys: Iterable[tuple[str, str]]) -> None:
        """Crystals (id, record key) now held by `shard`."""
        rows = ((crystal_id, shard, key) for crystal_id, key in keys)
        self._db.executemany("INSERT OR REPLACE INTO stored VALUES (?, ?, ?)", rows)
        self._db.commit()

    def keys(self, ids: Iterable[str]) -> dict[str, str]:
        """Record keys of those of `ids` that are stored."""
        return dict(self._select("SELECT id, key FROM stored WHERE id IN ({})", ids))

    def remove(self, ids: Iterable[str]) -> dict[str, set[str]]:
        """Forget stored crystals; returns the shards that held them, with their ids."""
        by_shard: dict[str, set[str]] = {}
        found = self._select("SELECT id, shard FROM stored WHERE id IN ({})", ids)
        for crystal_id, shard in found:
            by_shard.setdefault(shard, set()).add(crystal_id)
        self._db.executemany("DELETE FROM stored WHERE id = ?", ((i,) for i, _ in found))
        self._db.commit()
        return by_shard

    def move(self, shard: str, new_shard: str) -> None:
        """Every crystal of `shard` is now in `new_shard` (a rewritten copy)."""
        self._db.execute("UPDATE stored SET shard = ? WHERE shard = ?", (new_shard, shard))
        self._db.commit()

    def first_read(self, crystal_id: str, origin: str) -> str | None:
        """Where `crystal_id` was read before in this run, or None (and it is now read)."""
        row = self._db.execute("SELECT origin FROM read WHERE id = ?", (crystal_id,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO read VALUES (?, ?)", (crystal_id, origin))
            return None
        return row[0]

    def close(self) -> None:
        self._db.close()
        self.path.unlink(missing_ok=True)

    def _select(self, query: str, ids: Iterable[str]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        iterator = iter(ids)
        while batch := list(itertools.islice(iterator, _IDS_PER_QUERY)):
            marks = ", ".join("?" * len(batch))
            found += self._db.execute(query.format(marks), batch).fetchall()
        return found
