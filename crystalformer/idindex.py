"""The driver's per-crystal bookkeeping, on disk, so its memory does not grow with the
number of crystals a run reads.

A SQLite database in a temporary file inside the dataset folder holds which shard holds
each id and its record key, which rejects part holds each reject, and which ids this run
has read. It is rebuilt from the shards and the rejects at the start of every run, so it
never disagrees with the manifest; a killed run leaves it as debris (a `.tmp` file) that the
next run removes.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path

from crystalformer.records import Reject

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
        self._db.execute(
            "CREATE TABLE rejects (id TEXT, origin TEXT, source TEXT, stage TEXT, reason TEXT, "
            "part TEXT, PRIMARY KEY (id, origin))"
        )
        self._db.execute("CREATE INDEX rejects_part ON rejects (part)")

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

    def add_rejects(self, part: str, rejects: Iterable[Reject]) -> None:
        """Rejects now held by the rejects file `part`."""
        rows = ((r.id, r.origin, r.source, r.stage, r.reason, part) for r in rejects)
        self._db.executemany("INSERT OR REPLACE INTO rejects VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._db.commit()

    def stored_rejects(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Reject]:
        """The stored rejects of those (id, origin) keys that have one."""
        query = "SELECT id, source, stage, reason, origin FROM rejects WHERE id = ? AND origin = ?"
        found = (self._db.execute(query, key).fetchone() for key in keys)
        return {(row[0], row[4]): Reject(*row) for row in found if row is not None}

    def rejects_of(self, ids: Iterable[str], but_stage: str) -> list[tuple[str, str]]:
        """(id, origin) of the stored rejects of `ids`, but those of stage `but_stage`."""
        found = self._select("SELECT id, origin, stage FROM rejects WHERE id IN ({})", ids)
        return [(crystal_id, origin) for crystal_id, origin, stage in found if stage != but_stage]

    def remove_rejects(self, keys: Iterable[tuple[str, str]]) -> dict[str, set[tuple[str, str]]]:
        """Forget rejects; returns the parts that held them, with their keys."""
        by_part: dict[str, set[tuple[str, str]]] = {}
        query = "SELECT part FROM rejects WHERE id = ? AND origin = ?"
        for key in keys:
            row = self._db.execute(query, key).fetchone()
            if row is not None:
                by_part.setdefault(row[0], set()).add(key)
                self._db.execute("DELETE FROM rejects WHERE id = ? AND origin = ?", key)
        self._db.commit()
        return by_part

    def move_rejects(self, part: str, new_part: str) -> None:
        """Every reject of `part` is now in `new_part` (a rewritten copy)."""
        self._db.execute("UPDATE rejects SET part = ? WHERE part = ?", (new_part, part))
        self._db.commit()

    def count_rejects(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM rejects").fetchone()[0]

    def close(self) -> None:
        self._db.close()
        self.path.unlink(missing_ok=True)

    def _select(self, query: str, ids: Iterable[str]) -> list[tuple]:
        found: list[tuple] = []
        iterator = iter(ids)
        while batch := list(itertools.islice(iterator, _IDS_PER_QUERY)):
            marks = ", ".join("?" * len(batch))
            found += self._db.execute(query.format(marks), batch).fetchall()
        return found
