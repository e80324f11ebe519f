"""Site-Net on real MP crystals: the supercell (size, growth, minimum-image distances against a
float64 brute force), equality with the explicit supercell, invariances, batching, gradients,
prediction through the base class and the shipped config.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from conftest import structure_of
from pymatgen.core import Structure
from test_model import (
    assert_rows_close,
    permuted,
    random_rotation,
    rotated,
    translated,
)
from test_model import table_of as shard_table

from crystalformer.conf import featurize_config, load_yaml, model_config
from crystalformer.model import SiteNet, SiteNetConfig, build_model
from crystalformer.model.batch import flat_list
from crystalformer.model.sitenet import (
    TIE,
    orthogonal_shear,
    sitenet_batch,
    supercell_matrices,
)
from crystalformer.predict import predict_structures

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "sitenet.yaml"
RTOL = 1e-4  # float32 round-off
BUDGET = 40  # small supercells keep the file fast
SMALL = {
    "n_layers": 2,
    "dim": 32,
    "n_heads": 4,
    "interaction_dim": 16,
    "attention_hidden": 16,
    "n_rbf": 16,
    "max_supercell_atoms": BUDGET,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def table_of(structures: Sequence[Structure], primitive: bool = False) -> pa.Table:
    """Shard rows as `predict` makes them (Site-Net needs no image lists beyond r = 0)."""
    return shard_table(structures, featurize_config().margin, primitive)


def new_model(seed: int = 0, **options) -> SiteNet:
    torch.manual_seed(seed)
    return SiteNet(SiteNetConfig(**{**SMALL, **options})).eval()


def encode(model: SiteNet, structures: Sequence[Structure]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(model.make_batch(table_of(structures)))


def cell_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(atoms per crystal, atom offsets, positions (A, 3), lattices (C, 3, 3)) as stored."""
    _, offsets = flat_list(table["atomic_numbers"])
    positions = flat_list(table["positions"])[0].reshape(-1, 3)
    lattices = flat_list(table["lattice"])[0].reshape(-1, 3, 3)
    return np.diff(offsets), offsets, positions, lattices


@pytest.fixture(scope="module")
def mp_table(mp_cifs) -> pa.Table:
    """The first 40 crystals of the MP snapshot as primitive cells (2 to 80 atoms)."""
    return table_of([structure_of(mp_cifs, i) for i in mp_cifs.index[:40]], primitive=True)


# --- the supercell ---------------------------------------------------------------------------


def test_supercell_stays_within_budget_and_grows_with_it(mp_table):
    n_atoms, _, _, lattices = cell_arrays(mp_table)
    previous = None
    for budget in (8, 30, 100):
        sites = sitenet_batch(mp_table, budget).supercell_sites.numpy()
        repeats = np.diagonal(supercell_matrices(lattices, n_atoms, budget), axis1=1, axis2=2)
        assert np.array_equal(sites, n_atoms * repeats.prod(1))
        over = n_atoms > budget
        assert np.array_equal(sites[over], n_atoms[over])  # a cell over budget as it is
        # the greedy growth stops only when one more repeat would break the budget
        assert np.all((sites[~over] <= budget) & (2 * sites[~over] > budget))
        if previous is not None:
            assert np.all(sites >= previous) and np.any(sites > previous)
        else:
            assert over.any() and not over.all()
        previous = sites


def test_supercell_grows_along_its_shortest_axis(mp_table):
    """Each axis k grown past 1 was the shortest when last grown: (n_k - 1)·h_k <= min n·h;
    M is upper triangular with the repeats on its diagonal (what the site enumeration needs)."""
    n_atoms, _, _, lattices = cell_arrays(mp_table)
    _, heights = orthogonal_shear(lattices)
    matrices = supercell_matrices(lattices, n_atoms, 100)
    repeats = np.diagonal(matrices, axis1=1, axis2=2)
    grown = repeats > 1
    assert grown.sum() >= 40  # most of these cells are repeated
    shortest = (repeats * heights).min(1, keepdims=True) * (1 + TIE)
    assert np.all(((repeats - 1) * heights <= shortest)[grown])
    assert np.all(np.tril(matrices, -1) == 0)
    assert np.any(np.triu(matrices, 1) != 0)  # some cells are sheared toward orthorhombic


def test_rotated_cells_get_the_same_supercell(mp_table):
    """Tied axes and half-integer shears are common (hexagonal, cubic cells): round-off of a
    rotation must not break those ties another way."""
    n_atoms, _, _, lattices = cell_arrays(mp_table)
    expected = supercell_matrices(lattices, n_atoms, 100)
    for seed in range(10):
        rotated_lattices = lattices @ random_rotation(seed).T
        assert np.array_equal(supercell_matrices(rotated_lattices, n_atoms, 100), expected)


def brute_force_distances(positions: np.ndarray, lattice: np.ndarray, matrix: np.ndarray):
    """(N, S) distances from each cell atom to every supercell site, float64, from scratch:
    the sites are the lattice points inside the supercell found in a wide box, and each
    distance is the minimum over a 7×7×7 box of supercell images."""
    supercell = matrix @ lattice
    box = np.array(list(itertools.product(range(-12, 13), repeat=3)), float)
    inside = box @ np.linalg.inv(matrix.astype(float))
    points = box[np.all((inside > -1e-9) & (inside < 1 - 1e-9), axis=1)] @ lattice
    sites = (points[:, None, :] + positions[None, :, :]).reshape(-1, 3)
    images = np.array(list(itertools.product(range(-3, 4), repeat=3)), float) @ supercell
    vectors = sites[None, :, None, :] + images[None, None] - positions[:, None, None, :]
    return np.linalg.norm(vectors, axis=3).min(axis=2)


@pytest.mark.parametrize("material_id", ["mp-1009019", "mp-1013526", "mp-1001024"])
def test_minimum_image_distances_match_brute_force(mp_cifs, material_id):
    """FeN (2 atoms), VS2 (3, hexagonal: half-integer shears) and Y2MgS4 (14)."""
    table = table_of([structure_of(mp_cifs, material_id)])
    batch = sitenet_batch(table, BUDGET, dtype=torch.float64)
    n_atoms, _, positions, lattices = cell_arrays(table)
    matrix = supercell_matrices(lattices, n_atoms, BUDGET)[0]
    expected = brute_force_distances(positions, lattices[0], matrix)
    assert (
        expected.shape[1]
        == int(batch.supercell_sites[0])
        == n_atoms[0] * round(np.linalg.det(matrix))
    )
    ours = batch.pair_dist.numpy().reshape(n_atoms[0], -1)  # pairs grouped by attending atom
    np.testing.assert_allclose(np.sort(ours, 1), np.sort(expected, 1), rtol=0, atol=1e-9)


def test_27_images_hold_the_minimum_on_real_batches(mp_table):
    """The near-orthorhombic supercells never need more than the 27 neighbouring images."""
    n_atoms, offsets, positions, lattices = cell_arrays(mp_table)
    for budget in (1, 100):
        batch = sitenet_batch(mp_table, budget, dtype=torch.float64)
        matrices = supercell_matrices(lattices, n_atoms, budget)
        start = 0
        for c in range(len(n_atoms)):
            cell = slice(offsets[c], offsets[c + 1])
            expected = brute_force_distances(positions[cell], lattices[c], matrices[c])
            ours = batch.pair_dist.numpy()[start : start + expected.size]
            start += expected.size
            np.testing.assert_allclose(
                np.sort(ours.reshape(expected.shape), 1), np.sort(expected, 1), atol=1e-9
            )


# --- the model -------------------------------------------------------------------------------


def test_cell_and_its_supercell_give_the_same_features(mp_cifs):
    """Attending from the cell's atoms only is exactly the full S×S model: the explicit
    supercell (S atoms, not repeated again as 2S > budget) gives the same vector."""
    model = new_model()
    for material_id in ("mp-1013526", "mp-10068"):  # VS2, Ce2MnN3
        structure = structure_of(mp_cifs, material_id)
        table = table_of([structure])
        n_atoms, _, positions, lattices = cell_arrays(table)
        matrix = supercell_matrices(lattices, n_atoms, BUDGET)[0]
        stored = Structure(lattices[0], structure.species, positions, coords_are_cartesian=True)
        explicit = stored.make_supercell(matrix, in_place=False)
        assert len(explicit) == int(model.make_batch(table).supercell_sites[0]) > len(stored)
        assert_rows_close(encode(model, [explicit]), encode(model, [structure]), RTOL)


def test_interaction_features_keep_every_gaussian_for_short_distances(mp_cifs):
    """All n_rbf Gaussians of d, even when every distance is far below rbf_max (one small
    cell, no supercell): the interaction layer reads a fixed K + 2 features."""
    model = new_model(max_supercell_atoms=1)
    batch = model.make_batch(table_of([structure_of(mp_cifs, "mp-1013526")]))  # VS2
    assert float(batch.pair_dist.max()) < model.config.rbf_max / 2
    features = model.interaction_features(batch)
    assert features.shape == (len(batch.pair_dist), model.config.n_rbf + 2)


@pytest.mark.parametrize(
    "transform", [rotated, translated, permuted], ids=["rotation", "translation", "permutation"]
)
def test_prediction_is_invariant(structures, transform):
    model = new_model()
    expected = encode(model, structures)
    moved = encode(model, [transform(s) for s in structures])
    assert_rows_close(moved, expected, RTOL)
    with torch.no_grad():
        assert_rows_close(model.head(moved), model.head(expected), RTOL)


def test_batch_equals_one_by_one(structures):
    model = new_model()
    together = encode(model, structures)
    alone = torch.cat([encode(model, [s]) for s in structures])
    assert_rows_close(together, alone, 1e-5)
    assert not torch.allclose(together[0], together[-1])  # the disordered FeN is not FeN


def test_gradients_are_finite_and_reach_every_parameter(structures):
    model = new_model().train()
    batch = model.make_batch(table_of(structures))
    model(batch).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_predict_structures_through_the_one_prediction_path(structures):
    model = new_model(n_targets=2)
    predicted = predict_structures(model, structures, primitive=False)
    assert predicted.shape == (len(structures), 2)
    assert np.isfinite(predicted).all()
    with torch.no_grad():
        direct = model(model.make_batch(table_of(structures))).numpy()
    np.testing.assert_allclose(predicted, direct, rtol=1e-5, atol=1e-6)


# --- configuration ---------------------------------------------------------------------------


def test_shipped_config_is_every_default():
    keys = list(yaml.safe_load(CONF.read_text()))
    assert keys[0] == "encoder" and set(keys) == {f.name for f in fields(SiteNetConfig)}
    assert load_yaml(CONF, SiteNetConfig) == SiteNetConfig()
    shipped = model_config(name="sitenet")
    assert isinstance(build_model(shipped), SiteNet)
    assert shipped.r_cut == 0.0


def test_default_parameter_count():
    assert SiteNet().num_parameters() == 204_329
