"""The protocol of a remote source, and the registry `crystalformer fetch` and `refresh-data` read.

A remote source is one module: the settings it reads (its section of conf/sources.yaml), the
credential it needs, and a fetch that turns what the remote holds into records and rejects.
The module ends with `register(...)` and `crystalformer/sources/__init__.py` imports it; the
command line, the refresh flow and the validation of conf/sources.yaml then know the source
with no other file changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crystalformer.conf import Strict
from crystalformer.records import RawInput, Reject


class RemoteSettings(Strict):
    """The keys every remote source's section of conf/sources.yaml has."""

    enabled: bool = True
    # The dataset the refresh flow featurises it into: DATA_ROOT/datasets/<dataset>.
    dataset: str

    @classmethod
    def defaults(cls) -> RemoteSettings | None:
        """The settings of a source that conf/sources.yaml does not configure: every key at
        its default, or None when some key has none (a query only the user can write)."""
        if any(info.is_required() for info in cls.model_fields.values()):
            return None
        return cls()


@dataclass(frozen=True)
class Credential:
    """A secret a source needs, read from the environment variable `env`; the refresh flow
    also looks for it in a secret store under `secret_block`. Never logged or stored."""

    env: str
    secret_block: str

    def from_env(self) -> str | None:
        return os.environ.get(self.env) or None


@dataclass
class Fetched:
    """One fetch: records and rejects for what is new or changed, how many ids were skipped
    as unchanged, and the state to pass back as `known` next time (None: the source cannot
    tell what changed, so every fetch is whole)."""

    records: list[RawInput] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    unchanged: int = 0
    state: dict[str, str] | None = None


class RemoteSource(Protocol):
    """A database the project fetches into a records folder (see `sources.refresh`)."""

    name: str  # its section in conf/sources.yaml and its word in `crystalformer fetch`
    settings: type[RemoteSettings]
    credential: Credential | None  # None: it needs none

    def fetch(
        self, settings: Any, folder: Path, known: Mapping[str, str], secret: str | None
    ) -> Fetched:
        """Fetch into records; `folder` may cache downloads, `known` is the previous state."""
        ...


REGISTRY: dict[str, RemoteSource] = {}


def register(source: RemoteSource) -> None:
    """Make `source` known to the command line, the refresh flow and conf/sources.yaml."""
    if source.name in REGISTRY or source.name == "snapshots":
        raise ValueError(f"a source named {source.name!r} is already registered")
    REGISTRY[source.name] = source
