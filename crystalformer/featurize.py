"""From a raw input to a shard row: parse, validate, reduce the cell, enumerate images.

`featurize_chunk` is the unit of work everywhere (serial, Dask worker, Prefect task): it never
raises for a bad input, it returns the input as a Reject instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
from pymatgen.core import Element

from crystalformer.lattice import (
    ImageList,
    enumerate_images,
    equivalent_atoms,
    expected_image_count,
    reduce_cell,
)
from crystalformer.records import MAX_Z, Crystal, InputRejected, RawInput, Reject, SiteOccupancy
from crystalformer.structures import (
    check_separation,
    load,
    site_types,
    structure_hash,
)

ELEMENT_SYMBOLS = tuple(Element.from_Z(z).symbol for z in range(1, MAX_Z + 1))
# Images one crystal may list: 64× the largest bundled crystal (mp-707571, 31,056 images),
# ~20,000 atoms at MP's median density; bounds a crystal's memory (~150 B an image while
# they are enumerated, 15 B stored).
MAX_IMAGES = 2_000_000


@dataclass(frozen=True)
class FeaturizeSettings:
    """What a dataset's image lists depend on; stored in every shard's metadata.

    `max_images` only refuses crystals; it is not part of a dataset's identity.
    """

    r_cut: float
    primitive: bool = True
    symprec: float = 0.01
    min_distance: float = 0.5
    max_images: int = field(default=MAX_IMAGES, compare=False)

    @property
    def cell(self) -> str:
        return "primitive" if self.primitive else "input"


@dataclass(frozen=True)
class FeaturizedCrystal:
    """A crystal in its stored (reduced) cell with its lattice-image list and, per atom, the
    first atom equivalent to it (`lattice.equivalent_atoms`)."""

    crystal: Crystal
    images: ImageList
    structure_hash: str
    formula: str
    equivalent_atom: np.ndarray


@dataclass
class ChunkResult:
    """What one chunk of inputs became; ids in `skipped` are already in the dataset."""

    rows: list[FeaturizedCrystal] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def featurize(
    crystal: Crystal, settings: FeaturizeSettings, hashed: str | None = None
) -> FeaturizedCrystal:
    """Reduce a validated crystal's cell and list every image within settings.r_cut.

    Raises InputRejected when two atoms are closer than settings.min_distance, or when the
    list would hold more than settings.max_images: estimated on the input cell before
    anything is allocated (reduction only shrinks it), then counted.
    """
    estimate = expected_image_count(crystal.lattice, crystal.n_atoms, settings.r_cut)
    _check_image_count(estimate, crystal.n_atoms, settings, estimated=True)
    reduced = reduce_cell(
        crystal.lattice,
        crystal.frac_coords,
        site_types(crystal),
        primitive=settings.primitive,
        symprec=settings.symprec,
    )
    shortest = float(np.linalg.norm(reduced.lattice, axis=1).min())  # Niggli: shortest vector
    if shortest < settings.min_distance:
        raise InputRejected(
            "validate",
            f"each atom is {shortest:.3g} Å from its own periodic image (shortest lattice "
            f"vector); the minimum is {settings.min_distance} Å",
        )
    stored = Crystal(
        id=crystal.id,
        source=crystal.source,
        lattice=reduced.lattice,
        frac_coords=reduced.frac_coords,
        numbers=crystal.numbers[reduced.site_of],
        disorder=_remap_disorder(crystal.disorder, reduced.site_of),
        targets=crystal.targets,
        split=crystal.split,
    )
    images = enumerate_images(stored.lattice, stored.cart_coords, settings.r_cut)
    check_separation(images, stored, settings.min_distance)
    _check_image_count(len(images.dist), stored.n_atoms, settings)
    hashed = hashed or structure_hash(crystal)
    # the kinds the model embeds: occupancies compared exactly
    equivalent = equivalent_atoms(images, stored.n_atoms, site_types(stored, decimals=None))
    return FeaturizedCrystal(stored, images, hashed, reduced_formula(stored), equivalent)


def _check_image_count(
    count: float, n_atoms: int, settings: FeaturizeSettings, estimated: bool = False
) -> None:
    if count > settings.max_images:
        shown = f"about {count:,.0f}" if estimated else f"{count:,}"
        raise InputRejected(
            "featurize",
            f"{shown} lattice images within r_cut = {settings.r_cut} Å for {n_atoms} atoms, "
            f"above the cap of {settings.max_images:,} per crystal (max_images in "
            "conf/featurize.yaml)",
        )


def featurize_chunk(
    raws: Iterable[RawInput],
    settings: FeaturizeSettings,
    known: Mapping[str, str] | None = None,
) -> ChunkResult:
    """Featurise inputs; an input whose `record_key` is in `known` under its id is skipped."""
    known = known or {}
    result = ChunkResult()
    for raw in raws:
        try:
            crystal = load(raw)
            hashed = structure_hash(crystal)
            if known.get(raw.id) == record_key(hashed, crystal.targets, crystal.split):
                result.skipped.append(raw.id)
                continue
            result.rows.append(featurize(crystal, settings, hashed))
        except InputRejected as rejected:
            result.rejects.append(rejected.to_reject(raw))
        except Exception as error:  # a bug or an input no rule foresaw: keep the run going
            reason = f"unexpected {type(error).__name__}: {str(error)[:200]}"
            result.rejects.append(Reject(raw.id, raw.source, "featurize", reason, raw.origin))
    return result


def record_key(structure_hash: str, targets: Mapping[str, float | None], split: str | None) -> str:
    """What must match for an existing row to stand for a new input: structure and labels.

    A missing label and a null one are the same, so adding target columns to a dataset does
    not make its existing rows look changed.
    """
    labels = ",".join(
        f"{name}={float(value)!r}"
        for name, value in sorted(targets.items())
        if value is not None and not math.isnan(value)
    )
    return f"{structure_hash}|{split}|{labels}"


def _remap_disorder(disorder: SiteOccupancy | None, site_of: np.ndarray) -> SiteOccupancy | None:
    if disorder is None:
        return None
    sites, z, occupancy = [], [], []
    for new_site, old_site in enumerate(site_of.tolist()):
        mask = disorder.site == old_site
        sites.append(np.full(int(mask.sum()), new_site))
        z.append(disorder.z[mask])
        occupancy.append(disorder.occupancy[mask])
    return SiteOccupancy(np.concatenate(sites), np.concatenate(z), np.concatenate(occupancy))


def reduced_formula(crystal: Crystal) -> str:
    """Hill-ordered reduced formula, occupancy-weighted for disordered sites."""
    amounts = dict.fromkeys(crystal.numbers.tolist(), 0.0)
    ordered = np.ones(crystal.n_atoms, bool)
    if crystal.disorder is not None:
        ordered[crystal.disorder.site] = False
        for z, occupancy in zip(
            crystal.disorder.z.tolist(), crystal.disorder.occupancy.tolist(), strict=True
        ):
            amounts[z] = amounts.get(z, 0.0) + occupancy
    for z in crystal.numbers[ordered].tolist():
        amounts[z] += 1.0
    amounts = {z: a for z, a in amounts.items() if a > 0}
    if all(float(a).is_integer() for a in amounts.values()):
        divisor = reduce(math.gcd, (int(a) for a in amounts.values()))
        amounts = {z: a / divisor for z, a in amounts.items()}
    symbols = {z: ELEMENT_SYMBOLS[z - 1] for z in amounts}
    order = sorted(amounts, key=lambda z: symbols[z])
    if 6 in amounts:  # Hill order: C, then H, then the rest alphabetically
        order = [6] + ([1] if 1 in amounts else []) + [z for z in order if z not in (1, 6)]
    return "".join(symbols[z] + _amount_text(amounts[z]) for z in order)


def _amount_text(amount: float) -> str:
    if amount == 1:
        return ""
    return str(int(amount)) if float(amount).is_integer() else f"{amount:.4g}"
