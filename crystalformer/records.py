"""The records every stage passes on: raw inputs, parsed crystals and rejects.

A `RawInput` is what a source read (text or a dict, not yet parsed); a `Crystal` is the
validated structure; a `Reject` says why an input went no further. Every input id ends up as
exactly one accepted row or one reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

MAX_Z = 98  # the heaviest element accepted (Cf): validation's bound and the model's embedding size
InputFormat = Literal["cif", "poscar", "structure", "arrays"]
Stage = Literal["read", "duplicate", "parse", "validate", "reduce", "featurize"]


@dataclass(frozen=True)
class RawInput:
    """One unparsed input crystal.

    `payload` is CIF or POSCAR text, a pymatgen `Structure.as_dict()` (or its JSON text) for
    format "structure", or a dict with `lattice`, `frac_coords` and `numbers` for "arrays".
    `origin` tells a person where the input came from (file and row).
    """

    id: str
    source: str
    format: InputFormat
    payload: Any
    targets: dict[str, float | None] = field(default_factory=dict)
    split: str | None = None
    origin: str = ""


@dataclass(frozen=True)
class SiteOccupancy:
    """Species of the sites that are not fully occupied by one element (COO triples)."""

    site: np.ndarray  # (M,) int: index of the site in the crystal
    z: np.ndarray  # (M,) int: atomic number
    occupancy: np.ndarray  # (M,) float: fraction of that element on that site


@dataclass(frozen=True)
class Crystal:
    """A periodic crystal: lattice rows are the lattice vectors in Å.

    `numbers[i]` is the element with the largest occupancy on site i; `disorder` lists the
    full composition of every site that is not one element at occupancy 1 (None if ordered).
    """

    id: str
    source: str
    lattice: np.ndarray  # (3, 3) float64
    frac_coords: np.ndarray  # (N, 3) float64
    numbers: np.ndarray  # (N,) int16
    disorder: SiteOccupancy | None = None
    targets: dict[str, float | None] = field(default_factory=dict)
    split: str | None = None

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def cart_coords(self) -> np.ndarray:
        return self.frac_coords @ self.lattice


@dataclass(frozen=True)
class Reject:
    """An input that was not accepted, with the stage and a reason a person understands."""

    id: str
    source: str
    stage: str
    reason: str
    origin: str = ""


class InputRejected(ValueError):
    """Raised by parsing, validation and featurisation; carries the stage that failed."""

    def __init__(self, stage: Stage, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason

    def to_reject(self, raw: RawInput) -> Reject:
        return Reject(raw.id, raw.source, self.stage, self.reason, raw.origin)
