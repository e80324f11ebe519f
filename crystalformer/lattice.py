"""Cell reduction and exact lattice-image enumeration: the precompute behind the attention.

The model sums over every periodic image of atom j within `r_cut` of atom i (docs/model.md §3).
`enumerate_images` lists those (i, j, n) once per crystal, vectorised and exact, so the model
never scans a fixed box of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import gcd

import numpy as np
import spglib

# Candidate (pair, shift) rows generated at once; bounds memory for cells of thousands of atoms.
_CHUNK_CANDIDATES = 4_000_000
# Above this many atoms spglib alone decides primitivity (the pre-test holds T·N² distances).
_PRETEST_MAX_ATOMS = 64
_EPS = 1e-9
_TINY_SQ = 1e-4  # Å²


@dataclass(frozen=True)
class ImageList:
    """All (i, j, n) with |p_j + nL - p_i| <= r_cut, grouped by pair p = i·N + j in order."""

    pair: np.ndarray  # (M,) int32
    shift: np.ndarray  # (M, 3) int8
    dist: np.ndarray  # (M,) float64


@dataclass(frozen=True)
class ReducedCell:
    """A cell of the same crystal; `site_of[k]` is the input site that new site k copies."""

    lattice: np.ndarray  # (3, 3)
    frac_coords: np.ndarray  # (N', 3) in [0, 1)
    site_of: np.ndarray  # (N',) int


def reciprocal_lengths(lattice: np.ndarray) -> np.ndarray:
    """|b_k| of the reciprocal rows (no 2π): the fractional extent of a unit Cartesian length."""
    return np.linalg.norm(np.linalg.inv(lattice), axis=0)


def expected_image_count(lattice: np.ndarray, n_atoms: int, r_cut: float) -> float:
    """N²·(4/3)π·r_cut³/V: how many (i, j, n) `enumerate_images` finds, from the number
    density alone (0.6 % under the exact count for the largest bundled MP crystal); costs
    nothing, so a crystal can be refused before its list is built."""
    volume = abs(float(np.linalg.det(lattice)))
    return n_atoms * n_atoms * (4 / 3) * np.pi * r_cut**3 / volume


@lru_cache(maxsize=256)
def _box(n0: int, n1: int, n2: int) -> np.ndarray:
    """All integer offsets of an n0 × n1 × n2 box, (n0·n1·n2, 3), read-only."""
    box = np.stack(np.meshgrid(np.arange(n0), np.arange(n1), np.arange(n2), indexing="ij"), -1)
    box = box.reshape(-1, 3)
    box.flags.writeable = False
    return box


def enumerate_images(lattice: np.ndarray, positions: np.ndarray, r_cut: float) -> ImageList:
    """Every periodic image within `r_cut` of every atom, in float64.

    For a pair with fractional offset f = f_j - f_i, the image n lies within r_cut only if
    |n_k + f_k| <= r_cut·|b_k| for each axis k, so each pair needs a box of at most
    floor(2·r_cut·|b_k|) + 1 shifts per axis starting at ceil(-r_cut·|b_k| - f_k). All pairs
    share that box size; candidates are generated in chunks of pairs and filtered by distance.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    n_atoms = len(positions)
    frac = positions @ np.linalg.inv(lattice)
    reach = r_cut * reciprocal_lengths(lattice) + _EPS
    box = _box(*(int(np.floor(2 * r)) + 1 for r in reach))
    box_cart = box @ lattice
    box_sq = np.einsum("ij,ij->i", box_cart, box_cart)
    rows_per_chunk = max(1, _CHUNK_CANDIDATES // (len(box) * max(n_atoms, 1)))
    r_cut_sq = r_cut * r_cut
    found_pair, found_shift, found_dist = [], [], []
    for start in range(0, n_atoms, rows_per_chunk):
        i = np.arange(start, min(start + rows_per_chunk, n_atoms))
        f = frac[None, :, :] - frac[i, None, :]  # (rows, N, 3)
        low = np.ceil(-reach - f)  # the first shift on each axis that can come within r_cut
        corner = (f + low) @ lattice  # (rows, N, 3): displacement to the box's first image
        # |corner + box|² expanded so the (rows, N, box, 3) displacements never materialise
        dist_sq = corner @ (2 * box_cart.T)  # (rows, N, box)
        dist_sq += np.einsum("abc,abc->ab", corner, corner)[:, :, None]
        dist_sq += box_sq
        a, j, b = np.nonzero(dist_sq <= r_cut_sq)
        shift = low[a, j].astype(np.int64) + box[b]
        dist_sq = dist_sq[a, j, b]
        # The expansion cancels to ~1e-13 Å²: harmless except near 0 (an atom and itself),
        # where it would read as ~1e-7 Å; measure those displacements directly.
        tiny = np.flatnonzero(dist_sq < _TINY_SQ)
        displacement = (f[a[tiny], j[tiny]] + shift[tiny]) @ lattice
        dist_sq[tiny] = np.einsum("ij,ij->i", displacement, displacement)
        found_pair.append((i[a] * n_atoms + j).astype(np.int32))
        found_shift.append(shift)
        found_dist.append(np.sqrt(np.maximum(dist_sq, 0.0)))
    shift = np.concatenate(found_shift) if found_shift else np.zeros((0, 3), np.int64)
    if shift.size and np.abs(shift).max() > 127:
        raise ValueError("lattice image shift exceeds int8: the cell is far too thin for r_cut")
    return ImageList(
        pair=np.concatenate(found_pair) if found_pair else np.zeros(0, np.int32),
        shift=shift.astype(np.int8),
        dist=np.concatenate(found_dist) if found_dist else np.zeros(0),
    )


def closest_pair(images: ImageList, n_atoms: int) -> tuple[float, int, int]:
    """(distance, i, j) of the two closest atoms in an image list, an atom's images included.

    (inf, -1, -1) when the list holds no pair other than each atom with itself at n = 0.
    """
    i, j = np.divmod(images.pair, n_atoms)
    others = np.flatnonzero((i != j) | images.shift.any(axis=1))
    if not others.size:
        return float("inf"), -1, -1
    best = others[np.argmin(images.dist[others])]
    return float(images.dist[best]), int(i[best]), int(j[best])


def niggli_basis(lattice: np.ndarray) -> np.ndarray:
    """A Niggli-reduced basis of the same lattice: short, nearly orthogonal vectors."""
    reduced = spglib.niggli_reduce(np.asarray(lattice, dtype=np.float64))
    if reduced is None:
        return np.asarray(lattice, dtype=np.float64)
    # Keep a right-handed basis so the Cartesian frame (and any stored orientation) is unchanged.
    return -reduced if np.linalg.det(reduced) < 0 else reduced


def _has_fractional_translation(
    lattice: np.ndarray, frac: np.ndarray, types: np.ndarray, symprec: float
) -> bool:
    """Whether some translation other than a lattice vector maps the crystal onto itself.

    A cell is primitive exactly when no such translation exists. Candidates are the offsets
    from one atom of the rarest type to the others of that type.
    """
    kinds, counts = np.unique(types, return_counts=True)
    if gcd(*counts.tolist()) == 1:
        return False  # a k-fold supercell holds a multiple of k atoms of every type
    anchor_type = kinds[np.argmin(counts)]
    members = np.flatnonzero(types == anchor_type)
    shifts = frac[members[1:]] - frac[members[0]]  # (T, 3) candidate translations
    # Cheap filter first: a symmetry translation maps the rarest type onto itself.
    shifts = shifts[_maps_onto(lattice, frac[members], shifts, frac[members], symprec)]
    if not len(shifts):
        return False
    same_type = types[:, None] == types[None, :]
    return bool(_maps_onto(lattice, frac, shifts, frac, symprec, same_type).any())


def _maps_onto(lattice, frac, shifts, targets, symprec, allowed=None) -> np.ndarray:
    """For each shift (T,), whether every translated atom lands on an allowed target atom."""
    d = frac[None, :, None, :] + shifts[:, None, None, :] - targets[None, None, :, :]
    d -= np.round(d)  # (T, N, M, 3): minimum-image fractional offsets
    cart = d @ lattice
    close = np.einsum("tijk,tijk->tij", cart, cart) < symprec * symprec
    if allowed is not None:
        close &= allowed
    return close.any(axis=2).all(axis=1)


def reduce_cell(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    types: np.ndarray,
    *,
    primitive: bool = True,
    symprec: float = 0.01,
) -> ReducedCell:
    """Primitive cell (spglib, positions not idealised) in a Niggli-reduced basis.

    `types` labels the distinct site compositions. spglib runs only when the cell might not
    be primitive, because its full symmetry search is the slowest step of featurisation.
    With `primitive=False` the input cell is kept and only its basis is reduced.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    frac = np.asarray(frac_coords, dtype=np.float64) % 1.0
    types = np.asarray(types)
    site_of = np.arange(len(frac))
    if primitive and _may_be_supercell(lattice, frac, types, symprec):
        found = spglib.standardize_cell(
            (lattice, frac, types), to_primitive=True, no_idealize=True, symprec=symprec
        )
        if found is not None and len(found[2]) < len(frac):
            lattice, frac, prim_types = (np.asarray(x) for x in found)
            first_site_of_type = {t: k for k, t in reversed(list(enumerate(types.tolist())))}
            site_of = np.array([first_site_of_type[t] for t in prim_types.tolist()])
    basis = niggli_basis(lattice)
    frac = (frac @ lattice @ np.linalg.inv(basis)) % 1.0
    frac[frac >= 1.0 - 1e-12] = 0.0
    return ReducedCell(basis, frac, site_of)


def _may_be_supercell(
    lattice: np.ndarray, frac: np.ndarray, types: np.ndarray, symprec: float
) -> bool:
    if len(frac) > _PRETEST_MAX_ATOMS:
        return True
    return _has_fractional_translation(lattice, frac, types, symprec)


def equivalent_atoms(images: ImageList, n_atoms: int, kinds: np.ndarray) -> np.ndarray:
    """For each atom, the first atom that no attention layer can tell from it.

    Atoms are equivalent when they are of one kind (`kinds`: their exact composition) and
    their images show the same multiset of (class of the other atom, float32 distance as
    stored), with classes refined this way until none splits (colour refinement). An
    attention layer's output for atom i depends only on its own features and that multiset
    over its images, so equivalent atoms keep equal features in every layer and the model
    computes one per class. Every symmetry orbit falls in one class (unless float32
    rounding tells two of its distances apart); equality is exact, there is no tolerance.
    """
    i, j = np.divmod(images.pair.astype(np.int64), n_atoms)  # i ascending (pair order)
    distinct, distance = np.unique(images.dist.astype(np.float32), return_inverse=True)
    n_distances = len(distinct)  # `distance`: each image's rank among them
    bounds = np.searchsorted(i, np.arange(n_atoms + 1))
    colour = np.unique(kinds, return_inverse=True)[1].astype(np.int64)
    n_colours = len(set(colour.tolist()))
    while True:
        # (class of j, distance) as one number per image, sorted within each atom i's run
        token = colour[j] * n_distances + distance.ravel()
        run = i * (n_colours * n_distances)
        token = np.sort(run + token) - run
        classes: dict[tuple[int, bytes], int] = {}
        refined = np.array(
            [
                classes.setdefault((c, token[lo:hi].tobytes()), len(classes))
                for c, lo, hi in zip(colour.tolist(), bounds[:-1], bounds[1:], strict=True)
            ],
            np.int64,
        )
        if len(classes) == n_colours:  # refining only splits: no split means stable
            break
        colour, n_colours = refined, len(classes)
    first = np.full(n_colours, n_atoms)
    np.minimum.at(first, colour, np.arange(n_atoms))
    return first[colour]
