"""The Crystalformer encoder (docs/model.md §2, §4, §6) on real MP crystals.

α, β and the attention output are checked against an independent float64 brute-force sum
over a large box of lattice images; the whole network against the invariances a crystal model
must have, with `primitive=False` so that the image sums (not the cell reduction) carry the
test; batching, gradients, memory on a 1,000-atom cell, the cutoff guard and the frozen σ
statistics.
"""

from __future__ import annotations

import copy
import itertools
import resource
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import INVARIANCE_IDS, R_CUT, structure_of
from pymatgen.core import Lattice, Structure

from crystalformer.conf import featurize_config
from crystalformer.featurize import FeaturizeSettings, featurize
from crystalformer.model import CrystalBatch, Crystalformer, CrystalformerConfig, batch_from_table
from crystalformer.model.batch import IMAGE_BLOCK, batch_images
from crystalformer.model.config import RUNTIME_KEYS
from crystalformer.model.crystalformer import (
    image_log_weights,
    periodic_attention,
    periodic_kernels,
    sigma_from_query,
)
from crystalformer.model.layers import (
    RadialBasis,
    exp_flushed,
    flush_tiny,
    radial_basis,
    segment_softmax,
)
from crystalformer.predict import predict_structures, predict_table
from crystalformer.shards import rows_to_table
from crystalformer.structures import crystal_from_structure

# Real crystals of different sizes (atoms in the CIF cell): FeN 2, RbAgO 3, VS2 3, Ce2MnN3 6,
# Y2MgS4 14.
RTOL = 1e-4  # float32 round-off (docs/model.md §6)


# --- helpers ---------------------------------------------------------------------------------


def table_of(
    structures: Sequence[Structure],
    r_cut: float = R_CUT,
    primitive: bool = False,
    every_atom: bool = False,
) -> pa.Table:
    """Shard rows for the structures, featurised as `predict_structures` does; with
    `every_atom` without the equivalent atoms, so that a batch holds every atom."""
    settings = FeaturizeSettings(r_cut, primitive=primitive)
    rows = [
        featurize(crystal_from_structure(s, id=str(k)), settings) for k, s in enumerate(structures)
    ]
    table = rows_to_table(rows, [], settings)
    return table.drop_columns(["equivalent_atom"]) if every_atom else table


def batch_of(
    structures: Sequence[Structure],
    r_cut: float = R_CUT,
    primitive: bool = False,
    dtype: torch.dtype = torch.float32,
    every_atom: bool = False,
) -> CrystalBatch:
    return batch_from_table(table_of(structures, r_cut, primitive, every_atom), dtype)


def encode(model: Crystalformer, structures: Sequence[Structure]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.encode(batch_of(structures))


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Each row equal to rtol relative to that row's largest entry (no near-zero scalars)."""
    scale = expected.abs().amax(dim=1, keepdim=True)
    error = ((actual - expected).abs() / scale).amax(dim=1)
    assert torch.all(error <= rtol), f"relative error per row {error.tolist()} above {rtol}"


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def supercell(s: Structure) -> Structure:
    return s.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 2]], in_place=False)


def rotated(s: Structure) -> Structure:
    rotation = random_rotation(7)
    return Structure(Lattice(s.lattice.matrix @ rotation.T), s.species_and_occu, s.frac_coords)


def translated(s: Structure) -> Structure:
    moved = s.copy()
    moved.translate_sites(range(len(s)), [3.1, -7.4, 0.37], frac_coords=False, to_unit_cell=True)
    return moved


def permuted(s: Structure) -> Structure:
    order = np.random.default_rng(3).permutation(len(s))
    if np.array_equal(order, np.arange(len(s))):
        order = np.roll(order, 1)
    return Structure.from_sites([s[int(k)] for k in order])


TRANSFORMS = {
    "skewed-supercell": supercell,
    "rotation": rotated,
    "translation": translated,
    "permutation": permuted,
}


def freeze_sigma_stats(model: Crystalformer, batch: CrystalBatch) -> None:
    """One training-mode forward fixes each layer's σ mean/std (docs/model.md §2), then eval."""
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


# --- fixtures --------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def training_table(mp_cifs) -> pa.Table:
    """The first 20 crystals of the MP snapshot (2 to 80 atoms), primitive cells."""
    chosen = [structure_of(mp_cifs, material_id) for material_id in mp_cifs.index[:20]]
    return table_of(chosen, primitive=True)


def new_model(seed: int = 0, **options) -> Crystalformer:
    torch.manual_seed(seed)
    return Crystalformer(CrystalformerConfig(**options)).eval()


@pytest.fixture(scope="module")
def frozen_model(training_table) -> Crystalformer:
    model = new_model()
    freeze_sigma_stats(model, batch_from_table(training_table))
    return model


@pytest.fixture(scope="module", params=["initial-sigma-stats", "frozen-sigma-stats"])
def model(request, frozen_model) -> Crystalformer:
    """The default model before any training step (σ stats 0/1) and after freezing them."""
    if request.param == "initial-sigma-stats":
        return new_model()
    return frozen_model


# --- configuration ---------------------------------------------------------------------------


def test_config_defaults_are_the_papers():
    config = CrystalformerConfig()
    assert (config.n_layers, config.dim, config.n_heads, config.head_dim) == (4, 128, 8, 16)
    assert (config.ffn_dim, config.n_rbf, config.rbf_max) == (512, 64, 14.0)
    assert (config.r0, config.b, config.cutoff_sigmas) == (1.4, 0.5, 3.5)
    assert config.sigma_max == pytest.approx(1.4 / np.sqrt(0.5))
    assert config.r_cut == pytest.approx(6.93, abs=0.005)
    assert not RUNTIME_KEYS & set(vars(config))  # the architecture only: no run-time switch
    assert config.r_cut <= R_CUT  # the fixtures' image lists serve the default model


def test_parameter_count_is_the_papers():
    assert Crystalformer(CrystalformerConfig()).num_parameters() == 853_517
    assert Crystalformer(CrystalformerConfig(n_rbf=0)).num_parameters() == 820_749


def test_frozen_sigma_stats_are_not_the_initial_ones(frozen_model):
    for block in frozen_model.blocks:
        attention = block.attention
        assert bool(attention.sigma_frozen)
        assert float(attention.sigma_mean) != 0.0
        assert float(attention.sigma_std) != 1.0


# --- α and β against a float64 brute force ---------------------------------------------------

ALPHA_BETA_IDS = ["mp-1009019", "mp-1013526"]  # FeN (2 atoms), VS2 (3 atoms)
SIGMA_RANGE = (0.8, 1.9)  # Å, below σ_max = 1.98 Å
N_HEADS, HEAD_DIM = 3, 4
RBF_CENTRES = np.arange(1, 65) * 14.0 / 64  # docs/model.md §2: μ_k = k·14/64 Å, k = 1..64
RBF_WIDTH = 14.0 / 64


def shift_box(lattice: np.ndarray, reach: float) -> np.ndarray:
    """Every n with |n_k| <= reach·|b_k| + 1: holds all images within `reach` of any atom."""
    bound = np.ceil(reach * np.linalg.norm(np.linalg.inv(lattice), axis=0)).astype(int) + 1
    return np.array(list(itertools.product(*(range(-k, k + 1) for k in bound))))


def brute_force_alpha_beta(
    structure: Structure,
    sigma: np.ndarray,
    projection: np.ndarray,
    reach: float,
    r_max: float = np.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """α (N, N, H) and β (N, N, H, D) by summing over a box of images, all in float64.

    α_ij = log Σ_n exp(-|r|²/2σ_i²), β_ij = Σ_n softmax_n(-|r|²/2σ_i²) W_h b(|r|), over the
    images within r_max (all of the box by default), straight from docs/model.md §2.
    """
    lattice = structure.lattice.matrix
    positions = structure.cart_coords
    images = shift_box(lattice, reach) @ lattice
    n_atoms = len(positions)
    alpha = np.full((n_atoms, n_atoms, N_HEADS), -np.inf)
    beta = np.zeros((n_atoms, n_atoms, N_HEADS, projection.shape[1]))
    for i, j in itertools.product(range(n_atoms), repeat=2):
        dist_sq = np.sum((positions[j] + images - positions[i]) ** 2, axis=1)
        dist_sq = dist_sq[dist_sq <= r_max**2]
        if not len(dist_sq):
            continue
        exponent = -dist_sq[:, None] / (2 * sigma[i] ** 2)  # (M, H)
        top = exponent.max(axis=0)
        alpha[i, j] = top + np.log(np.exp(exponent - top).sum(axis=0))
        weights = np.exp(exponent - alpha[i, j])  # (M, H), sums to 1 over M
        basis = np.exp(-((np.sqrt(dist_sq)[:, None] - RBF_CENTRES) ** 2) / (2 * RBF_WIDTH**2))
        beta[i, j] = np.einsum("mh,mk,hdk->hd", weights, basis, projection)
    return alpha, beta


def brute_force_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """y_i = Σ_j softmax_j(q_i·k_j/√d + α_ij)(v_j + β_ij) for one crystal, (N, H, D)."""
    scores = np.einsum("ihd,jhd->ijh", q, k) / np.sqrt(q.shape[2]) + alpha
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("ijh,ijhd->ihd", weights, v[None] + beta)


def local_pairs(batch: CrystalBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crystal, i, j) of each pair, i and j counted within the crystal."""
    first_atom = np.r_[0, np.cumsum(np.bincount(batch.atom_crystal.numpy()))]
    crystal = batch.atom_crystal[batch.pair_i].numpy()
    return (
        crystal,
        batch.pair_i.numpy() - first_atom[crystal],
        batch.pair_j.numpy() - first_atom[crystal],
    )


def test_alpha_and_attention_output_equal_a_float64_brute_force_image_sum(mp_cifs):
    """Two real crystals in one float64 batch, σ random per atom and head in [0.8, 1.9] Å.

    The image list is cut at 9·1.9 Å, where an image weighs < e^-40 of one at r = 0, and the
    brute force sums a box reaching 20 Å, so both are the infinite sums to float64 precision
    (distances are stored as float32 in shards, hence 1e-6 and not 1e-12).
    """
    chosen = [structure_of(mp_cifs, material_id) for material_id in ALPHA_BETA_IDS]
    batch = batch_of(chosen, r_cut=9 * SIGMA_RANGE[1], dtype=torch.float64, every_atom=True)
    generator = torch.Generator().manual_seed(11)
    sigma = torch.empty(batch.n_atoms, N_HEADS, dtype=torch.float64)
    sigma.uniform_(*SIGMA_RANGE, generator=generator)
    projection = torch.randn(N_HEADS, HEAD_DIM, 64, dtype=torch.float64, generator=generator)
    q, k, v = torch.randn(
        3, batch.n_atoms, N_HEADS, HEAD_DIM, dtype=torch.float64, generator=generator
    )
    alpha, _ = image_log_weights(batch, sigma)
    basis = RadialBasis(64, 14.0).double()(batch.image_dist_sq.sqrt())
    y = periodic_attention(batch, q, k, v, sigma, basis, projection, periodic_kernels(7, False))

    crystal, i, j = local_pairs(batch)
    first_atom = 0
    for c, structure in enumerate(chosen):
        atoms = slice(first_atom, first_atom + len(structure))
        expected_alpha, expected_beta = brute_force_alpha_beta(
            structure, sigma[atoms].numpy(), projection.numpy(), reach=20.0
        )
        mine = crystal == c
        assert mine.sum() == len(structure) ** 2  # every pair has images within 17 Å here
        np.testing.assert_allclose(
            alpha[mine].numpy(), expected_alpha[i[mine], j[mine]], rtol=1e-6, atol=1e-6
        )
        expected_y = brute_force_attention(
            q[atoms].numpy(), k[atoms].numpy(), v[atoms].numpy(), expected_alpha, expected_beta
        )
        scale = np.abs(expected_y).max()
        np.testing.assert_allclose(y[atoms].numpy(), expected_y, rtol=1e-6, atol=1e-6 * scale)
        first_atom += len(structure)


def test_pairs_left_out_of_the_image_list_are_negligible_in_the_brute_force_sum(mp_cifs):
    """A 128-atom FeN supercell at the model's own cutoff (3.5·σ_max + margin), σ in [0.8, 1.9].

    The pair list must hold exactly the pairs with an image within r_cut, and α of each
    listed pair must equal the brute-force sum over those images. Against the infinite sum:
    each image left out weighs < e^-6.1 (r > 3.5·σ_i), a left-out pair as a whole has
    α_ij < -5.5 (measured -5.9: several images just past r_cut add up) while α_ii >= 0, and
    each atom loses < 1 % of its attention mass Σ_j exp(α_ij) to the cutoff (measured 0.3 %;
    0.5 % with σ near σ_max).
    """
    fen = structure_of(mp_cifs, "mp-1009019").make_supercell([4, 4, 4], in_place=False)
    batch = batch_of([fen], r_cut=R_CUT, dtype=torch.float64, every_atom=True)
    generator = torch.Generator().manual_seed(5)
    sigma = torch.empty(batch.n_atoms, N_HEADS, dtype=torch.float64)
    sigma.uniform_(*SIGMA_RANGE, generator=generator)
    alpha, _ = image_log_weights(batch, sigma)

    n_atoms = len(fen)
    lattice, positions = fen.lattice.matrix, fen.cart_coords
    images = shift_box(lattice, 20.0) @ lattice
    full = np.empty((n_atoms, n_atoms, N_HEADS))  # α over every image within 20 Å
    cut = np.full((n_atoms, n_atoms, N_HEADS), -np.inf)  # α over the images within r_cut
    for i in range(n_atoms):
        dist_sq = np.sum((positions[None, :, :] + images[:, None, :] - positions[i]) ** 2, -1)
        exponent = -dist_sq[:, :, None] / (2 * sigma[i].numpy() ** 2)  # (M, N, H)
        full[i] = np.logaddexp.reduce(exponent, axis=0)
        inside = np.where((dist_sq <= R_CUT**2)[:, :, None], exponent, -np.inf)
        cut[i] = np.logaddexp.reduce(inside, axis=0)

    _, i, j = local_pairs(batch)
    listed = np.zeros((n_atoms, n_atoms), bool)
    listed[i, j] = True
    assert np.array_equal(listed, np.isfinite(cut[:, :, 0]))
    assert 0 < (~listed).sum() < n_atoms**2 // 2  # the test needs some pairs left out
    np.testing.assert_allclose(alpha.numpy(), cut[i, j], rtol=1e-6, atol=1e-6)

    assert np.all(full[np.arange(n_atoms), np.arange(n_atoms)] >= 0)  # α_ii, (N, H)
    assert np.all(full[~listed] < -5.5)
    # everything the cutoff drops, left-out pairs and far images of listed ones, per (i, h)
    lost = 1 - np.exp(np.logaddexp.reduce(cut, axis=1) - np.logaddexp.reduce(full, axis=1))
    assert np.all(lost < 0.01)


# --- invariances (docs/model.md §6) ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model, structures) -> tuple[torch.Tensor, np.ndarray]:
    """Encodings and predictions of the invariance crystals as given."""
    return encode(model, structures), predict_structures(model, structures, primitive=False)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_prediction_is_invariant_to_a_different_view_of_the_crystal(
    transform, model, structures, reference
):
    """Supercell, rotation, translation and atom order, each with `primitive=False`."""
    changed = [TRANSFORMS[transform](s) for s in structures]
    if transform == "skewed-supercell":
        assert all(len(b) == 2 * len(a) for a, b in zip(structures, changed, strict=True))
    encoded, expected = reference
    assert_rows_close(encode(model, changed), encoded, RTOL)
    actual = predict_structures(model, changed, primitive=False)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_disordered_site_is_embedded_as_the_occupancy_weighted_mix(model, structures):
    """FeN with Fe:Co 1:1 starts from (e_Fe + e_Co)/2 on that site and gives its own output."""
    fen, mixed = structures[0], structures[-1]
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        cofe = fen.copy()
        cofe.replace_species({"Fe": "Co"})
        encoded = encode(model, [fen, cofe, mixed])
    finally:
        hook.remove()
    x = captured[0]  # (atoms, dim): FeN, CoN, (Fe,Co)N, two atoms each
    torch.testing.assert_close(x[4:6], (x[0:2] + x[2:4]) / 2, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(encoded[2], encoded[0])
    assert not torch.allclose(encoded[2], encoded[1])


# --- batching --------------------------------------------------------------------------------


def test_batch_gives_the_same_result_as_one_crystal_at_a_time(frozen_model, training_table):
    sizes = training_table["n_atoms"].to_pylist()
    assert len(set(sizes)) > 5 and max(sizes) >= 40  # a real mix of sizes
    with torch.no_grad():
        together = frozen_model.encode(batch_from_table(training_table))
        alone = torch.cat(
            [
                frozen_model.encode(batch_from_table(training_table.slice(k, 1)))
                for k in range(training_table.num_rows)
            ]
        )
        heads = frozen_model.head(together), frozen_model.head(alone)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5 * alone.abs().max())
    torch.testing.assert_close(*heads, rtol=1e-5, atol=1e-5 * heads[1].abs().max())
    predicted = predict_table(frozen_model, training_table, max_rows=7)  # uneven batches
    np.testing.assert_allclose(predicted, heads[1].numpy(), rtol=1e-5, atol=1e-6)


# --- gradients -------------------------------------------------------------------------------


def test_gradients_match_finite_differences_in_float64(mp_cifs, training_table):
    """gradcheck on a tiny 2-layer model (dim 16, 2 heads, K = 8) over FeN and VS2, float64.

    Inputs: the embedding columns of Fe, N, V and S, w_h of layer 0 (σ, so α and the image
    weights of β), W_h of layer 1 (β) and the key bias of layer 1; σ stats frozen first.
    """
    torch.manual_seed(0)
    config = CrystalformerConfig(n_layers=2, dim=16, n_heads=2, ffn_dim=32, n_rbf=8)
    model = Crystalformer(config)
    freeze_sigma_stats(model, batch_from_table(training_table))
    model.double()
    chosen = [structure_of(mp_cifs, material_id) for material_id in ALPHA_BETA_IDS]
    margin = featurize_config().margin
    batch = batch_of(chosen, r_cut=config.r_cut + margin, dtype=torch.float64)
    columns = torch.unique(batch.species_z) - 1
    parameters = dict(model.named_parameters())
    names = [
        "blocks.0.attention.sigma_query",
        "blocks.1.attention.edge",
        "blocks.1.attention.key.bias",
    ]

    def forward(embedding_columns: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        replaced = dict(zip(names, tensors, strict=True))
        embed = parameters["embed.weight"].detach().clone()
        embed[:, columns] = embedding_columns
        replaced["embed.weight"] = embed
        return torch.func.functional_call(model, replaced, (batch,))

    inputs = [parameters["embed.weight"][:, columns].detach().clone().requires_grad_()]
    inputs += [parameters[name].detach().clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_compiled_kernels_give_the_chunked_result_and_gradients(mp_cifs):
    """torch.compile'd sparse products and radial basis (fused, no chunks) against the eager
    chunked ones, float64, forward and every input gradient, on FeN and VS2 in one batch."""
    chosen = [structure_of(mp_cifs, material_id) for material_id in ALPHA_BETA_IDS]
    batch = batch_of(chosen, dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    shape = (batch.n_atoms, N_HEADS, HEAD_DIM)
    inputs = [torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(3)]
    inputs.append(torch.empty(batch.n_atoms, N_HEADS, dtype=torch.float64).uniform_(0.8, 1.9))
    inputs.append(torch.randn(N_HEADS, HEAD_DIM, 64, dtype=torch.float64, generator=generator))
    rbf = RadialBasis(64, 14.0).double()
    results = []
    for kernels in (periodic_kernels(5, False), periodic_kernels(5, True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        q, k, v, sigma, projection = leaves
        basis = rbf(batch.image_dist_sq.sqrt(), kernels.sparse)
        y = periodic_attention(batch, q, k, v, sigma, basis, projection, kernels)
        y.square().sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_chunked_attention_gradients_match_finite_differences(mp_cifs):
    """The hand-written backward of the chunked pair and image products (chunks of 5), float64.

    Inputs q, k, v, σ and W_h of FeN and VS2 in one batch, K = 8 so the Jacobian stays small.
    """
    chosen = [structure_of(mp_cifs, material_id) for material_id in ALPHA_BETA_IDS]
    batch = batch_of(chosen, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    shape = (batch.n_atoms, N_HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(3))
    sigma = torch.empty(batch.n_atoms, N_HEADS, dtype=torch.float64)
    sigma.uniform_(*SIGMA_RANGE, generator=generator)
    projection = torch.randn(N_HEADS, HEAD_DIM, 8, dtype=torch.float64, generator=generator)
    basis = RadialBasis(8, 14.0).double()(batch.image_dist_sq.sqrt())
    inputs = [t.requires_grad_() for t in (q, k, v, sigma, projection)]

    def attend(*tensors: torch.Tensor) -> torch.Tensor:
        q, k, v, sigma, projection = tensors
        kernels = periodic_kernels(5, False)
        return periodic_attention(batch, q, k, v, sigma, basis, projection, kernels)

    assert torch.autograd.gradcheck(attend, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# --- memory on a large cell ------------------------------------------------------------------


def _rss_bytes() -> int:
    """Resident set size now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_since_reset_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return _peak_rss_bytes()


def test_forward_on_a_1008_atom_supercell_fits_in_bounded_memory_on_cpu(frozen_model, mp_cifs):
    """FeNi3 (4 atoms, 11 Å³/atom: a dense metal) as a 6×6×7 supercell: 136,080 images.

    Measured: the no-grad forward raises the process's peak RSS by 130 MiB on CPU (1,016,064
    pairs; nothing of size pairs × heads × K is ever formed). Asserted: below 1 GiB, finite,
    and equal to the 4-atom cell's result to float32 round-off. No time is asserted.
    """
    small = structure_of(mp_cifs, "mp-1007855")
    big = small.make_supercell([6, 6, 7], in_place=False)
    assert len(big) == 1008
    batch = batch_of([big], every_atom=True)  # FeNi3 has 2 classes of equivalent atoms
    frozen_model.eval()
    before = _rss_bytes()
    exact_peak = _reset_peak_rss()
    with torch.no_grad():
        encoded = frozen_model.encode(batch)
        prediction = frozen_model.to_target_units(frozen_model.head(encoded))
    peak = _peak_rss_since_reset_bytes() if exact_peak else _peak_rss_bytes()
    growth = peak - before
    assert torch.isfinite(encoded).all() and torch.isfinite(prediction).all()
    assert_rows_close(encoded, encode(frozen_model, [small]), RTOL)
    expected = predict_structures(frozen_model, [small], primitive=True)
    np.testing.assert_allclose(prediction.numpy(), expected, rtol=RTOL, atol=1e-6)
    assert growth < 2**30, f"forward on 1008 atoms grew the peak RSS by {growth / 2**20:.0f} MiB"


# --- cutoff guard, σ bound, state dict, softmax ----------------------------------------------


def test_image_lists_cut_shorter_than_the_model_needs_are_refused(mp_cifs):
    model = new_model()
    chosen = [structure_of(mp_cifs, material_id) for material_id in INVARIANCE_IDS[:2]]
    with pytest.raises(ValueError, match=r"cut at 5 Å .* needs 6\.93 Å .* re-featurise"):
        predict_table(model, table_of(chosen, r_cut=5.0))
    assert predict_table(model, table_of(chosen, r_cut=model.config.r_cut)).shape == (2, 1)
    # a model with a smaller r0 needs a shorter list, and accepts the same 5 Å table
    short = new_model(r0=1.0)
    assert short.config.r_cut < 5.0
    assert predict_table(short, table_of(chosen, r_cut=5.0)).shape == (2, 1)


def test_sigma_stays_below_r0_over_root_b_for_any_input():
    config = CrystalformerConfig()
    x = torch.cat(
        [torch.randn(10_000) * scale for scale in (1e-3, 1.0, 10.0, 1e3, 1e6, 1e30)]
        + [torch.tensor([-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max])]
    )
    sigma = sigma_from_query(x[:, None], config.b, config.r0)
    assert torch.all(torch.isfinite(sigma)) and torch.all(sigma >= 0)
    assert sigma.max() <= config.sigma_max * (1 + 1e-6)  # = σ_max only where ELU saturates
    assert torch.all(sigma[x.abs() < 50] < config.sigma_max)
    assert config.cutoff_sigmas * sigma.max() <= config.r_cut * (1 + 1e-6)

    # and through a layer, with queries from embeddings of any size and frozen stats
    model = new_model(seed=2)
    attention = model.blocks[0].attention
    q = (
        torch.randn(500, config.n_heads, config.head_dim)
        * torch.logspace(-3, 4, 500)[:, None, None]
    )
    with torch.no_grad():
        attention.train()
        first = attention.sigma(q[:100])
        attention.eval()
        sigma = attention.sigma(q)
    assert torch.all(first < config.sigma_max) and torch.all(sigma <= config.sigma_max * 1.000001)
    assert torch.all(torch.isfinite(sigma)) and torch.all(sigma >= 0)


def test_frozen_sigma_stats_are_saved_and_reloaded(frozen_model, training_table, structures):
    state = frozen_model.state_dict()
    for k in range(frozen_model.config.n_layers):
        prefix = f"blocks.{k}.attention."
        assert bool(state[prefix + "sigma_frozen"])
        assert state[prefix + "sigma_mean"] == frozen_model.blocks[k].attention.sigma_mean
        assert state[prefix + "sigma_std"] == frozen_model.blocks[k].attention.sigma_std

    reloaded = new_model(seed=99)
    reloaded.load_state_dict(copy.deepcopy(state))
    expected = predict_structures(frozen_model, structures, primitive=False)
    reloaded_predictions = predict_structures(reloaded, structures, primitive=False)
    np.testing.assert_array_equal(reloaded_predictions, expected)
    # a training step on the reloaded model keeps the saved stats, it does not refreeze them
    reloaded.train()
    with torch.no_grad():
        reloaded(batch_from_table(training_table.slice(3, 5)))
    for mine, theirs in zip(reloaded.blocks, frozen_model.blocks, strict=True):
        assert mine.attention.sigma_mean == theirs.attention.sigma_mean
        assert mine.attention.sigma_std == theirs.attention.sigma_std


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_images_fill_whole_blocks_of_one_atom_and_the_padding_weighs_zero(training_table, dtype):
    """The blocked image layout: each block belongs to one atom, the images (merged by
    equal distance, with their counts) are the shard's, padding only ends an atom's last
    block, and its weight exp(log w) is exactly 0 however wide σ is (1,000 Å here; the
    paper's σ < 1.98 Å). Every atom here (equivalent atoms: `test_equivalent_*`)."""
    table = training_table.drop_columns(["equivalent_atom"])
    batch = batch_from_table(table, dtype=dtype)
    every = batch_from_table(table, dtype=dtype, image_vectors=True)  # none merged
    stored = np.concatenate(table["image_dist"].to_pylist())
    np.testing.assert_allclose(
        np.sqrt(every.image_dist_sq.numpy()[~every.image_padding.numpy()]), stored, rtol=1e-6
    )
    assert torch.all(every.image_log_count[~every.image_padding] == 0)
    assert len(batch.image_pair) < len(every.image_pair)  # symmetric crystals merge images
    np.testing.assert_array_equal(_expanded_images(batch), _expanded_images(every))
    atom, padding = batch.image_atom.numpy(), batch.image_padding.numpy()
    assert len(atom) % IMAGE_BLOCK == 0
    blocks = atom.reshape(-1, IMAGE_BLOCK)
    assert np.all(blocks == blocks[:, :1])
    assert batch.max_distance == pytest.approx(stored.max())
    images_per_atom = np.bincount(atom[~padding], minlength=batch.n_atoms)
    padding_per_atom = np.bincount(atom[padding], minlength=batch.n_atoms)
    assert np.all(padding_per_atom == -images_per_atom % IMAGE_BLOCK)
    real_after_padding = padding[:-1] & ~padding[1:] & (atom[:-1] == atom[1:])
    assert not real_after_padding.any()  # padding ends each atom's images
    assert torch.equal(batch.pair_i[batch.image_pair], batch.image_atom)
    sigma = torch.full((batch.n_atoms, 2), 1000.0, dtype=dtype)
    _, log_w = image_log_weights(batch, sigma)
    weight = exp_flushed(log_w)
    assert torch.all(weight[batch.image_padding] == 0)
    totals = torch.zeros(len(batch.pair_i), 2, dtype=dtype).index_add(0, batch.image_pair, weight)
    torch.testing.assert_close(totals, torch.ones_like(totals))  # Σ_n w_ijn = 1 per pair


def _expanded_images(batch: CrystalBatch, atom_index: np.ndarray | None = None) -> np.ndarray:
    """(i, j, |r|) of every real image, each merged one repeated by its count, sorted; i and j
    through `atom_index` (the batch's atom → an index of the caller's) when given."""
    real = ~batch.image_padding
    pair = batch.image_pair[real]
    count = batch.image_log_count[real].exp().round().long().numpy()
    i, j = batch.pair_i[pair].numpy(), batch.pair_j[pair].numpy()
    if atom_index is not None:
        i, j = atom_index[i], atom_index[j]
    rows = np.stack([i, j, batch.image_dist_sq[real].sqrt().numpy()], 1)
    rows = np.repeat(rows, count, axis=0)
    return rows[np.lexsort(rows.T[::-1])]


# --- equivalent atoms (batch.py) ------------------------------------------------------------


@pytest.fixture(scope="module")
def equivalent_table(mp_cifs, structures, training_table) -> pa.Table:
    """The 20 training crystals, and kept whole: two supercells (exactly symmetric: the
    copies of an atom are equivalent) and one of FeN with one Fe site shared by Fe and Co."""
    fen, vs2 = (structure_of(mp_cifs, material_id) for material_id in ALPHA_BETA_IDS)
    mixed = supercell(fen)
    mixed.replace(0, {"Fe": 0.5, "Co": 0.5})
    whole = table_of([supercell(fen), vs2.make_supercell([2, 2, 1], in_place=False), mixed])
    return pa.concat_tables([training_table, whole])


def test_equivalent_atoms_batch_holds_each_class_once_with_all_its_images(equivalent_table):
    """One row per class, counting its atoms; its images are those of the class's first
    atom in the shard, each j replaced by j's class (merged by equal distance, counted)."""
    batch = batch_from_table(equivalent_table, torch.float64)
    n_atoms = np.array(equivalent_table["n_atoms"].to_pylist())
    assert batch.n_atoms < n_atoms.sum() / 2
    per_crystal = torch.zeros(batch.n_crystals, dtype=torch.float64)
    per_crystal.index_add_(0, batch.atom_crystal, batch.atom_multiplicity)
    np.testing.assert_array_equal(per_crystal.numpy(), n_atoms)
    expected, firsts, first_atom = [], [], 0
    columns = ["n_atoms", "equivalent_atom", "image_pair", "image_dist"]
    for record in equivalent_table.select(columns).to_pylist():
        equivalent = np.array(record["equivalent_atom"])
        i, j = np.divmod(np.array(record["image_pair"]), record["n_atoms"])
        first = equivalent[i] == i
        dist = np.array(record["image_dist"], np.float32).astype(np.float64)
        rows = [first_atom + i[first], first_atom + equivalent[j[first]], dist[first]]
        expected.append(np.stack(rows, 1))
        firsts.append(first_atom + np.flatnonzero(equivalent == np.arange(record["n_atoms"])))
        first_atom += record["n_atoms"]
    kept_per_row = [len(rows) for rows in expected]  # what sizes screening's batches
    np.testing.assert_array_equal(batch_images(equivalent_table), kept_per_row)
    every = equivalent_table["image_dist"].to_pylist()
    np.testing.assert_array_equal(batch_images(equivalent_table, True), [len(d) for d in every])
    expected = np.concatenate(expected)
    expected = expected[np.lexsort(expected.T[::-1])]
    np.testing.assert_array_equal(_expanded_images(batch, np.concatenate(firsts)), expected)


def test_equivalent_atoms_leave_predictions_sigma_statistics_and_gradients_unchanged(
    equivalent_table,
):
    """float64, a fresh model in training mode (σ statistics frozen by this batch) on the
    batch of classes and on the batch of every atom: the same σ mean and std, outputs and
    parameter gradients, to float64 round-off (the classes are exact: no tolerance)."""
    every_atom = equivalent_table.drop_columns(["equivalent_atom"])
    results = []
    for table in (equivalent_table, every_atom):
        model = new_model(seed=2).double().train()
        output = model(batch_from_table(table, torch.float64))
        output.square().sum().backward()
        attention = [block.attention for block in model.blocks]
        sigma = [(a.sigma_mean.item(), a.sigma_std.item()) for a in attention]
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((output.detach(), sigma, grads))
    (output, sigma, grads), (output_all, sigma_all, grads_all) = results
    np.testing.assert_allclose(sigma, sigma_all, rtol=1e-12)
    scale = output_all.abs().max()
    torch.testing.assert_close(output, output_all, rtol=1e-10, atol=1e-10 * scale)
    largest = max(g.abs().max() for g in grads_all.values())  # key biases get round-off only
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_all[name], rtol=1e-8, atol=1e-10 * largest)


def test_rows_without_equivalent_atoms_in_a_mixed_table_keep_every_atom(
    frozen_model, equivalent_table
):
    """A dataset folder may hold shards from before the column existed: read together,
    their rows have a null equivalent_atom and count every atom."""
    old = equivalent_table.drop_columns(["equivalent_atom"])
    mixed = pa.concat_tables([old, equivalent_table], promote_options="default")
    assert mixed["equivalent_atom"].null_count == old.num_rows
    batch = batch_from_table(mixed)
    n_classes = batch_from_table(equivalent_table).n_atoms
    assert batch.n_atoms == sum(old["n_atoms"].to_pylist()) + n_classes
    with torch.no_grad():
        encoded = frozen_model.encode(batch)
    assert_rows_close(encoded[: old.num_rows], encoded[old.num_rows :], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_basis_leaves_out_only_gaussians_that_are_zero_at_every_distance(dtype):
    """K' < K Gaussians when the distances end well before rbf_max: each one computed is
    the full basis's column, each one left out is exactly 0 at every distance (float32 and
    float64 flush at different exponents, so K' differs)."""
    rbf = RadialBasis(64, 14.0).to(dtype)
    dist = torch.linspace(0.0, 7.03, 20_001, dtype=dtype)
    full = rbf(dist)  # all K without `largest` (Site-Net's features need every one)
    assert full.shape[1] == 64 and torch.equal(full, radial_basis(dist, rbf.centres, rbf.width))
    basis = rbf(dist, largest=7.03)
    kept = basis.shape[1]
    assert 32 < kept < 64
    assert torch.equal(basis, full[:, :kept])
    assert torch.all(full[:, kept:] == 0)
    assert torch.any(full[:, kept - 2] > 0)  # one spare column at most (round-off margin)
    assert rbf(dist[:100], largest=7.03).shape[1] == kept  # the batch's largest, not dist's
    assert rbf(dist, largest=20.0).shape[1] == 64


def test_segment_softmax_sums_to_one_in_every_segment():
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(0, 50, (2_000,), generator=generator).sort().values
    segment = segment[segment != 17]  # an empty segment must not disturb the others
    scores = torch.randn(len(segment), 4, generator=generator) * 30
    scores[::7] += 1e4  # large scores: the per-segment maximum keeps exp finite
    weights = segment_softmax(scores, segment, 50)
    totals = torch.zeros(50, 4).index_add_(0, segment, weights)
    present = torch.bincount(segment, minlength=50) > 0
    torch.testing.assert_close(totals[present], torch.ones(int(present.sum()), 4))
    assert torch.all(totals[~present] == 0)
    for s in (0, 23, 49):
        mine = segment == s
        torch.testing.assert_close(weights[mine], torch.softmax(scores[mine], dim=0))


def test_tiny_values_are_flushed_to_zero_never_to_subnormals():
    """Far images' weights and Gaussians (e^-40 and below) would be subnormal floats, which
    x86 CPUs process many times slower; they are zeroed, everything else is exp itself."""
    x = torch.linspace(-120.0, 0.0, 100_001)
    floor = np.sqrt(np.finfo(np.float32).tiny)
    flushed = exp_flushed(x)
    assert torch.equal(flushed[flushed > 0], x.exp()[flushed > 0])
    assert torch.all((flushed == 0) | (flushed >= floor))
    assert torch.all((flushed == 0) == (x.exp() < floor))
    products = flush_tiny(flushed[::7]) * flush_tiny(flushed[::7].flip(0))
    assert not torch.any((products != 0) & (products.abs() < np.finfo(np.float32).tiny))
    x.requires_grad_()
    exp_flushed(x).sum().backward()
    assert torch.equal(x.grad, exp_flushed(x.detach()))
