"""Lattice-image enumeration and cell reduction on real MP crystals.

`enumerate_images` must list exactly every (i, j, n) with |p_j + nL - p_i| <= r_cut (docs/model.md
§3), whatever basis the cell is written in; featurisation must see the same crystal through
any supercell, change of basis, atom order, rotation or translation (docs/model.md §6).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import spglib
from conftest import R_CUT
from pymatgen.core import Structure

from crystalformer.featurize import FeaturizedCrystal, FeaturizeSettings, featurize
from crystalformer.lattice import closest_pair, enumerate_images, equivalent_atoms, reduce_cell
from crystalformer.records import Crystal, RawInput
from crystalformer.structures import (
    crystal_from_structure,
    load,
    site_types,
    structure_hash,
    validate,
)

# Unimodular changes of basis (same cell, skewed vectors), applied without any reduction.
SKEWS = {
    "identity": np.eye(3, dtype=int),
    "a+b": np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]),
    "a+3b": np.array([[1, 3, 0], [0, 1, 0], [0, 0, 1]]),
    "mixed": np.array([[1, 0, 1], [1, 1, 0], [1, 1, 1]]),
}
# Supercells: 2x2x2, and a skewed 5-fold one whose vectors are far from the crystal's axes.
SUPERCELLS = {"2x2x2": np.diag([2, 2, 2]), "skewed-5": np.array([[2, 1, 0], [0, 1, 1], [1, 0, 2]])}
SMALL_CELLS = ["mp-81", "mp-8638", "mp-754382", "mp-103", "mp-1009019", "mp-10054"]


def brute_force_images(lattice: np.ndarray, positions: np.ndarray, r_cut: float) -> dict:
    """{(pair, n0, n1, n2): distance} by scanning a box of n that provably holds every image.

    Independent of the library's bound: |(n + f_j - f_i) L| >= |n + f_j - f_i| · s_min, with
    s_min the smallest singular value of L, so every |n_k| <= r_cut / s_min + max |f_j - f_i|.
    Distances are measured directly as |p_j + nL - p_i|.
    """
    n_atoms = len(positions)
    frac = positions @ np.linalg.inv(lattice)
    s_min = np.linalg.svd(lattice, compute_uv=False).min()
    spread = np.abs(frac[None, :, :] - frac[:, None, :]).max()
    k = int(np.ceil(r_cut / s_min + spread)) + 1
    shifts = np.array(list(itertools.product(range(-k, k + 1), repeat=3)))
    images = shifts @ lattice
    found = {}
    for i in range(n_atoms):
        dist = np.linalg.norm(positions[None, :, :] + images[:, None, :] - positions[i], axis=-1)
        for b, j in zip(*np.nonzero(dist <= r_cut + 1e-9), strict=True):
            found[(i * n_atoms + int(j), *shifts[b].tolist())] = float(dist[b, j])
    return found


def assert_matches_brute_force(lattice: np.ndarray, positions: np.ndarray, r_cut: float) -> None:
    images = enumerate_images(lattice, positions, r_cut)
    got = {
        (int(p), *s.tolist()): float(d)
        for p, s, d in zip(images.pair, images.shift, images.dist, strict=True)
    }
    assert len(got) == len(images.pair), "an image is listed twice"
    expected = brute_force_images(lattice, positions, r_cut)
    # Images within 1e-9 Å of the cutoff may go either way; none should be missing or extra.
    borderline = {key for key, d in expected.items() if abs(d - r_cut) <= 1e-9}
    assert set(got) - borderline == set(expected) - borderline
    worst = max(abs(got[key] - expected[key]) for key in set(got) & set(expected))
    assert worst <= 1e-9


def skewed(crystal: Crystal, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same atoms (Cartesian positions kept as given) on the basis matrix · L."""
    assert round(abs(np.linalg.det(matrix))) == 1
    return matrix @ crystal.lattice, crystal.cart_coords


@pytest.fixture(scope="module")
def varied_crystals(mp_crystals) -> list[Crystal]:
    """Three dozen real crystals of 1 to 24 atoms with varied cell shapes."""
    chosen = [c for c in mp_crystals.values() if c.n_atoms <= 24][::4][:36]
    assert len(chosen) == 36
    return chosen


@pytest.fixture(scope="module")
def small_cells(mp_cifs) -> list[Crystal]:
    """Real 1- and 2-atom cells (fcc Au, hcp Tc, He, hcp Hf, rock-salt FeN, CsCl-type ZrAs)."""
    cells = [load(RawInput(m, "mp2018", "cif", mp_cifs[m])) for m in SMALL_CELLS]
    assert sorted({c.n_atoms for c in cells}) == [1, 2]
    return cells


@pytest.mark.parametrize("skew", list(SKEWS))
def test_enumerate_images_matches_brute_force_on_real_crystals(varied_crystals, skew):
    for crystal in varied_crystals:
        assert_matches_brute_force(*skewed(crystal, SKEWS[skew]), R_CUT)


@pytest.mark.parametrize("r_cut", [1.0, 3.0, R_CUT, 11.0])
def test_enumerate_images_matches_brute_force_on_small_cells(small_cells, r_cut):
    """Cutoffs far longer than the cell vectors (2.5-3.5 Å) need many shifts per axis."""
    for crystal in small_cells:
        for matrix in SKEWS.values():
            assert_matches_brute_force(*skewed(crystal, matrix), r_cut)


def test_enumerate_images_takes_unwrapped_positions(varied_crystals):
    """Atoms given outside the cell (fractions beyond [0, 1)) get the same images."""
    crystal = varied_crystals[5]
    offsets = np.array([[1, -2, 0], [3, 0, -1]])[np.arange(crystal.n_atoms) % 2]
    moved = crystal.cart_coords + offsets @ crystal.lattice
    assert_matches_brute_force(crystal.lattice, moved, R_CUT)


def test_image_list_is_grouped_by_pair_and_symmetric(varied_crystals):
    for crystal in varied_crystals[:12]:
        n = crystal.n_atoms
        images = enumerate_images(crystal.lattice, crystal.cart_coords, R_CUT)
        assert np.all(np.diff(images.pair) >= 0)
        i, j = np.divmod(images.pair, n)
        self_rows = (i == j) & ~images.shift.any(axis=1)
        assert sorted(i[self_rows].tolist()) == list(range(n))
        assert np.all(images.dist[self_rows] == 0.0)
        # (i, j, n) within r_cut if and only if (j, i, -n) is, at the same distance
        rows = zip(i.tolist(), j.tolist(), images.shift.tolist(), images.dist, strict=True)
        forward = {(a, b, *s): d for a, b, s, d in rows}
        for (a, b, *s), d in forward.items():
            assert forward[(b, a, *(-x for x in s))] == pytest.approx(d, abs=1e-12)


def test_closest_pair_counts_an_atom_and_its_own_images(small_cells):
    gold = small_cells[0]  # fcc Au, one atom: its nearest neighbour is its own image
    images = enumerate_images(gold.lattice, gold.cart_coords, R_CUT)
    distance, i, j = closest_pair(images, 1)
    assert (i, j) == (0, 0)
    assert distance == pytest.approx(np.linalg.norm(gold.lattice[0]), abs=1e-9)
    alone = enumerate_images(gold.lattice, gold.cart_coords, 1.0)  # only the atom itself
    assert closest_pair(alone, 1) == (float("inf"), -1, -1)


# --- featurisation sees one crystal however it is written ---------------------------------------


def environments(row: FeaturizedCrystal) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per atom: (its type, the types of its images, their distances), sorted by (type, d)."""
    n = row.crystal.n_atoms
    types = site_types(row.crystal)
    i, j = np.divmod(row.images.pair.astype(np.int64), n)
    order = np.lexsort((row.images.dist, types[j], i))
    bounds = np.searchsorted(i[order], np.arange(n + 1))
    return [
        (int(types[a]), types[j[order[lo:hi]]], row.images.dist[order[lo:hi]])
        for a, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]


def assert_same_environments(a: FeaturizedCrystal, b: FeaturizedCrystal, times: int = 1) -> None:
    """b's atoms see exactly what a's atoms see (to 1e-6 Å), each a-atom `times` over."""

    def same(x, y) -> bool:
        return (
            x[0] == y[0]
            and len(x[2]) == len(y[2])
            and np.array_equal(x[1], y[1])
            and np.allclose(x[2], y[2], rtol=0, atol=1e-6)
        )

    classes: list[list] = []  # [environment, count in a, count in b]
    for env in environments(a):
        match = next((c for c in classes if same(env, c[0])), None)
        if match is None:
            classes.append([env, 1, 0])
        else:
            match[1] += 1
    for k, env in enumerate(environments(b)):
        match = next((c for c in classes if same(env, c[0])), None)
        assert match is not None, f"{b.crystal.id}: atom {k} sees images no atom of a sees"
        match[2] += 1
    assert [c[2] for c in classes] == [times * c[1] for c in classes]


def supercell(crystal: Crystal, matrix: np.ndarray, id: str) -> Crystal:
    structure = Structure(crystal.lattice, crystal.numbers.tolist(), crystal.frac_coords)
    return crystal_from_structure(structure.make_supercell(matrix), id=id)


@pytest.fixture(scope="module")
def invariance_crystals(mp_crystals) -> list[Crystal]:
    """Eight real crystals of 2 to 12 atoms (their 2x2x2 cells pass 64 atoms, where the
    primitive pre-test hands over to spglib alone)."""
    chosen = [c for c in mp_crystals.values() if 2 <= c.n_atoms <= 12][::6][:8]
    assert len(chosen) == 8 and max(c.n_atoms for c in chosen) > 8
    return chosen


@pytest.mark.parametrize("cell", list(SUPERCELLS))
def test_supercell_gives_same_image_distances(invariance_crystals, settings, cell):
    for crystal in invariance_crystals:
        reference = featurize(crystal, settings)
        big = supercell(crystal, SUPERCELLS[cell], crystal.id)
        validate(big)
        reduced = featurize(big, settings)
        assert reduced.crystal.n_atoms == reference.crystal.n_atoms
        assert len(reduced.images.pair) == len(reference.images.pair)
        assert reduced.formula == reference.formula
        assert_same_environments(reference, reduced)


def test_equivalent_atoms_are_the_symmetry_orbits_and_see_the_same_surroundings(
    invariance_crystals, settings
):
    """Every atom sees what the first atom equivalent to it sees (kinds of its images, their
    float32 distances, exactly); the classes are spglib's orbits; a 2×2×2 supercell kept
    whole has the primitive cell's classes (each holding the eight copies of its atoms)."""
    whole = FeaturizeSettings(settings.r_cut, primitive=False)
    for crystal in invariance_crystals:
        primitive = featurize(crystal, settings)
        big = featurize(supercell(crystal, SUPERCELLS["2x2x2"], crystal.id), whole)
        for row in (primitive, big):
            first = row.equivalent_atom
            assert np.all(first <= np.arange(len(first))) and np.all(first[first] == first)
            cell = (row.crystal.lattice, row.crystal.frac_coords, row.crystal.numbers)
            orbits = spglib.get_symmetry_dataset(cell, symprec=1e-5).equivalent_atoms
            assert _same_partition(first, orbits), row.crystal.id
        assert len(set(big.equivalent_atom.tolist())) == len(
            set(primitive.equivalent_atom.tolist())
        )
        seen = environments(big)
        for atom, first in enumerate(big.equivalent_atom.tolist()):
            (type_a, types_a, dist_a), (type_f, types_f, dist_f) = seen[atom], seen[first]
            assert type_a == type_f and np.array_equal(types_a, types_f)
            assert np.array_equal(dist_a.astype(np.float32), dist_f.astype(np.float32))


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labellings of the atoms group them alike."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_an_atom_moved_off_its_site_is_no_longer_equivalent_to_any(invariance_crystals, settings):
    whole = FeaturizeSettings(settings.r_cut, primitive=False)
    crystal = supercell(invariance_crystals[0], SUPERCELLS["2x2x2"], "big")
    before = featurize(crystal, whole).equivalent_atom
    assert before[3] != 3  # a copy of an atom of the primitive cell
    moved = copy.deepcopy(crystal)
    moved.frac_coords[3] += 1e-4 / np.linalg.norm(crystal.lattice, axis=1)  # 1e-4 Å per axis
    after = featurize(moved, whole).equivalent_atom
    assert after[3] == 3 and np.sum(after == 3) == 1
    assert len(set(after.tolist())) > len(set(before.tolist()))


def test_equivalent_atoms_tell_apart_atoms_of_different_kinds(invariance_crystals, settings):
    """The same image distances, different kinds (e.g. one site disordered): not equivalent."""
    row = featurize(supercell(invariance_crystals[0], SUPERCELLS["2x2x2"], "big"), settings)
    n_atoms = row.crystal.n_atoms
    kinds = np.zeros(n_atoms, np.int64)
    assert np.sum(equivalent_atoms(row.images, n_atoms, kinds) == 0) > 1
    kinds[0] = 1
    split = equivalent_atoms(row.images, n_atoms, kinds)
    assert split[0] == 0 and np.sum(split == 0) == 1


def test_change_of_basis_gives_same_image_distances(invariance_crystals, settings):
    for crystal in invariance_crystals:
        reference = featurize(crystal, settings)
        for matrix in SKEWS.values():
            lattice, positions = skewed(crystal, matrix)
            other = Crystal(
                crystal.id,
                crystal.source,
                lattice,
                positions @ np.linalg.inv(lattice),
                crystal.numbers,
            )
            reduced = featurize(other, settings)
            assert reduced.crystal.n_atoms == reference.crystal.n_atoms
            assert_same_environments(reference, reduced)


def test_atom_permutation_gives_same_image_distances_and_hash(invariance_crystals, settings):
    rng = np.random.default_rng(7)
    for crystal in invariance_crystals:
        order = rng.permutation(crystal.n_atoms)
        permuted = Crystal(
            crystal.id,
            crystal.source,
            crystal.lattice,
            crystal.frac_coords[order],
            crystal.numbers[order],
        )
        assert structure_hash(permuted) == structure_hash(crystal)
        assert_same_environments(featurize(crystal, settings), featurize(permuted, settings))


def test_rotation_and_translation_give_same_image_distances(invariance_crystals, settings):
    rng = np.random.default_rng(11)
    for crystal in invariance_crystals:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation = q * np.sign(np.diag(r))
        rotation *= np.linalg.det(rotation)  # a proper rotation
        moved = Crystal(
            crystal.id,
            crystal.source,
            crystal.lattice @ rotation.T,
            crystal.frac_coords + rng.uniform(-2, 2, size=3),
            crystal.numbers,
        )
        reference = featurize(crystal, settings)
        result = featurize(moved, settings)
        assert result.crystal.n_atoms == reference.crystal.n_atoms
        assert_same_environments(reference, result)


def test_structure_hash_ignores_wrapping_but_not_moved_atoms(invariance_crystals):
    crystal = invariance_crystals[0]
    shifts = np.resize(np.array([[1, 0, -1], [0, 2, 0]]), (crystal.n_atoms, 3))
    wrapped = Crystal(
        crystal.id, crystal.source, crystal.lattice, crystal.frac_coords + shifts, crystal.numbers
    )
    assert structure_hash(wrapped) == structure_hash(crystal)
    frac = crystal.frac_coords.copy()
    frac[0, 0] += 0.01
    moved = Crystal(crystal.id, crystal.source, crystal.lattice, frac, crystal.numbers)
    assert structure_hash(moved) != structure_hash(crystal)


def test_reduced_cell_undoes_a_skewed_basis(varied_crystals):
    """Niggli reduction returns the shortest basis (successive minima), right-handed, with
    every fraction in [0, 1), for the same lattice (same volume when the cell is kept)."""
    for crystal in varied_crystals:
        lattice, positions = skewed(crystal, SKEWS["a+3b"])
        frac = positions @ np.linalg.inv(lattice)
        cell = reduce_cell(lattice, frac, crystal.numbers, primitive=False)
        assert np.linalg.det(cell.lattice) == pytest.approx(abs(np.linalg.det(lattice)))
        assert np.all((cell.frac_coords >= 0) & (cell.frac_coords < 1))
        shortest = np.sort(np.linalg.norm(cell.lattice, axis=1))
        assert np.all(shortest <= np.sort(np.linalg.norm(crystal.lattice, axis=1)) + 1e-6)
        assert shortest.sum() < np.linalg.norm(lattice, axis=1).sum() - 1e-3


def test_two_thousand_atom_cell_is_featurised_whole(mp_crystals):
    """No atom-count limit: a 5x5x5 supercell (2000 atoms) kept as given (primitive=False)
    gives every atom the images its original atom has in the 16-atom cell."""
    crystal = next(c for c in mp_crystals.values() if c.n_atoms == 16)
    keep_cell = FeaturizeSettings(r_cut=R_CUT, primitive=False)
    small = featurize(crystal, keep_cell)
    big = supercell(crystal, np.diag([5, 5, 5]), crystal.id)
    validate(big)
    result = featurize(big, keep_cell)
    assert result.crystal.n_atoms == 2000
    assert len(result.images.pair) == 125 * len(small.images.pair)
    assert_same_environments(small, result, times=125)
    # With reduction on (the default), the same 2000 atoms come back as the 16-atom cell.
    reduced = featurize(big, FeaturizeSettings(r_cut=R_CUT))
    assert reduced.crystal.n_atoms == 16
    assert_same_environments(small, reduced)
