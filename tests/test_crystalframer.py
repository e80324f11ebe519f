"""CrystalFramer: dynamic "max" frames and angular value terms, on real MP crystals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import INVARIANCE_IDS, structure_of
from test_model import TRANSFORMS, assert_rows_close, freeze_sigma_stats, table_of

from crystalformer.conf import model_config
from crystalformer.model import (
    Crystalformer,
    CrystalformerConfig,
    CrystalFramer,
    CrystalFramerConfig,
    Runtime,
    batch_from_table,
    build_model,
)
from crystalformer.model.crystalframer import (
    COLLINEAR,
    TIE_TOLERANCE,
    AngularSum,
    FramedAttention,
    angular_kernels,
    max_frames,
)
from crystalformer.predict import predict_structures, predict_table
from crystalformer.train import load_model, save_model

RTOL = 1e-4
SMALL = {"n_layers": 2, "dim": 32, "n_heads": 4, "ffn_dim": 64, "n_rbf": 16, "n_angle_rbf": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def structures(mp_cifs):
    return [structure_of(mp_cifs, material_id) for material_id in INVARIANCE_IDS]


@pytest.fixture(scope="module")
def table(structures):
    return table_of(structures)


def new_framer(seed: int = 0, **options) -> CrystalFramer:
    torch.manual_seed(seed)
    return CrystalFramer(CrystalFramerConfig(**options))


@pytest.fixture(scope="module")
def framer(table) -> CrystalFramer:
    """The default CrystalFramer with its σ statistics frozen on the test crystals."""
    model = new_framer()
    freeze_sigma_stats(model, model.make_batch(table))
    return model


def test_parameter_count_and_shipped_config_are_the_papers():
    assert CrystalFramer().num_parameters() == 951_821
    shipped = model_config(name="crystalframer")
    assert isinstance(shipped, CrystalFramerConfig) and shipped.n_angle_rbf == 64
    assert isinstance(build_model(shipped), CrystalFramer)


def small_pair(seed: int, n_angle_rbf: int) -> tuple[Crystalformer, CrystalFramer]:
    """A Crystalformer and a CrystalFramer of the same small size, both seeded with `seed`."""
    plain_options = {k: v for k, v in SMALL.items() if k != "n_angle_rbf"}
    torch.manual_seed(seed)
    plain = Crystalformer(CrystalformerConfig(**plain_options))
    framed = new_framer(seed, **{**SMALL, "n_angle_rbf": n_angle_rbf})
    return plain.eval(), framed.eval()


def test_without_angle_terms_it_is_crystalformer_exactly(table):
    plain, framed = small_pair(5, n_angle_rbf=0)
    assert plain.state_dict().keys() == framed.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, framed.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(plain(plain.make_batch(table)), framed(framed.make_batch(table)))


def test_zero_angle_weights_give_crystalformer_and_nonzero_ones_do_not(table):
    plain, framed = small_pair(6, n_angle_rbf=16)
    shared = {k: v for k, v in framed.state_dict().items() if ".angle" not in k}
    plain.load_state_dict(shared)
    with torch.no_grad():
        expected = plain(plain.make_batch(table))
        with_angles = framed(framed.make_batch(table))
        for block in framed.blocks:
            block.attention.angle.zero_()
        without = framed(framed.make_batch(table))
    torch.testing.assert_close(without, expected, rtol=1e-6, atol=1e-7)
    assert (with_angles - expected).abs().max() > 1e-3


# --- frames -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geometry(table):
    """Real image directions and atoms, with seeded positive weights per image and head."""
    batch = batch_from_table(table, dtype=torch.float64, image_vectors=True)
    weight = torch.rand(len(batch.image_unit), 4, generator=torch.Generator().manual_seed(0))
    weight = weight / (1 + batch.image_dist_sq[:, None])
    return batch, weight.double()


def test_frames_are_orthonormal_and_right_handed(geometry):
    batch, weight = geometry
    frames = max_frames(weight, batch.image_unit, batch.image_atom, batch.n_atoms)
    identity = torch.eye(3, dtype=frames.dtype).expand_as(frames)
    torch.testing.assert_close(frames @ frames.transpose(-1, -2), identity, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(frames), torch.ones(()).double(), atol=1e-12)


@pytest.mark.parametrize("off_line", [1.0, 1e-200], ids=["seeded", "faint-off-line"])
def test_frames_follow_the_most_attended_images(geometry, off_line):
    """e1 toward the largest weight (r = 0 excluded); e2 in the plane of e1 and the image
    the authors' rule picks: the largest log w + log max(1 - |cos|, 1e-5) among images with
    |cos| < 0.9999 only. Checked atom by atom against plain loops; "faint-off-line" makes
    the images on e1's line (|cos| ≥ 0.9999) outweigh all others 1e200 to 1, which still
    never lets them give e2."""
    batch, weight = geometry
    unit = batch.image_unit.numpy()
    first = {}  # each atom's first image with a direction
    for t, atom in enumerate(batch.image_atom.tolist()):
        if np.abs(unit[t]).sum() > 0:
            first.setdefault(atom, unit[t])
    along = np.array([first[atom] for atom in batch.image_atom.tolist()])
    on_line = np.abs((unit * along).sum(1)) >= COLLINEAR
    weight = weight * torch.from_numpy(np.where(on_line, 1.0, off_line))[:, None]
    frames = max_frames(weight, batch.image_unit, batch.image_atom, batch.n_atoms)
    for atom in range(batch.n_atoms):
        images = np.flatnonzero((batch.image_atom.numpy() == atom) & (np.abs(unit).sum(1) > 0))
        for head in range(weight.shape[1]):
            w = weight[images, head].numpy()
            e1 = unit[images[np.argmax(w)]]
            assert np.allclose(frames[atom, head, 0].numpy(), e1, atol=1e-12)
            cos = np.abs(unit[images] @ e1)
            score = np.log(w) + np.log(np.maximum(1 - cos, 1e-5))
            second = unit[images[np.argmax(np.where(cos < 0.9999, score, -np.inf))]]
            normal = np.cross(e1, second)
            assert abs(frames[atom, head, 1].numpy() @ normal) < 1e-9
            assert frames[atom, head, 1].numpy() @ second > 0


def test_tied_weights_pick_the_first_image(geometry):
    """Weights within TIE_TOLERANCE of the maximum (here a function of distance only, so
    every shell ties) go to the first such image in the batch's order, whatever round-off
    (1e-7) distinguishes them."""
    batch, _ = geometry
    weight = (1 / (1 + batch.image_dist_sq))[:, None].repeat(1, 2)
    noise = torch.rand(len(weight), generator=torch.Generator().manual_seed(1))
    weight[:, 1] *= 1 + 1e-7 * noise
    frames = max_frames(weight, batch.image_unit, batch.image_atom, batch.n_atoms)
    unit, w = batch.image_unit.numpy(), weight[:, 0].numpy()
    for atom in range(batch.n_atoms):
        images = np.flatnonzero((batch.image_atom.numpy() == atom) & (np.abs(unit).sum(1) > 0))
        tied = images[w[images] >= w[images].max() * (1 - TIE_TOLERANCE)]
        assert np.allclose(frames[atom, 0, 0].numpy(), unit[tied.min()], atol=1e-12)
    torch.testing.assert_close(frames[:, 1], frames[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True], ids=["chunked", "compiled"])
def test_angular_sum_and_its_gradient_are_exact(compiled):
    """Against autograd through the plainly written sum, in float64; chunks of 3 images."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.rand(7, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    cos = 2 * torch.rand(7, 2, 3, dtype=torch.float64, generator=generator) - 1
    target = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    centres = torch.linspace(-1, 1, 5, dtype=torch.float64)
    kernels = angular_kernels(3, compiled)
    total = AngularSum.apply(weight, cos, target, 3, centres, kernels)
    basis = torch.exp(-0.5 * ((cos[..., None] - centres) / (8 / 63)) ** 2)
    reference = torch.zeros(3, 2, 3, 5, dtype=torch.float64).index_add(
        0, target, weight[:, :, None, None] * basis
    )
    torch.testing.assert_close(total, reference, rtol=1e-12, atol=1e-300)
    probe = torch.rand(3, 2, 3, 5, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad((total * probe).sum(), weight)
    (expected,) = torch.autograd.grad((reference * probe).sum(), weight)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-300)


# --- the angular sums -------------------------------------------------------------------------


def layer_image_weights(model: CrystalFramer, batch, monkeypatch) -> list[torch.Tensor]:
    """The a_ij·w_ijn (T, H) each framed layer meets in one forward pass."""
    seen = []
    angular_sums = FramedAttention.angular_sums

    def spy(layer, batch, image_weight, kernels):
        seen.append(image_weight.detach().clone())
        return angular_sums(layer, batch, image_weight, kernels)

    with monkeypatch.context() as patch:
        patch.setattr(FramedAttention, "angular_sums", spy)
        with torch.no_grad():
            model(batch)
    return seen


def brute_force_angular_sums(table, weight, frames, centres) -> torch.Tensor:
    """Σ_(j,n: r > 0) w_ijn exp(-(e_k·r̂ - μ_m)²/2s²), s = 8/63, for every atom i, head h and
    axis k of its frame, (A, H, 3, M): r_ijn rebuilt from the structure in plain loops,
    `weight` (T', H) per stored image of `table` in its order, `frames` (A, H, 3, 3)."""
    vectors = torch.from_numpy(_image_vectors(table))  # (T', 3)
    atoms, offset = [], 0  # the attending atom i of each image, numbered across crystals
    for row in table.to_pylist():
        atoms += [offset + code // row["n_atoms"] for code in row["image_pair"]]
        offset += row["n_atoms"]
    atoms = np.array(atoms)
    out = torch.zeros(*frames.shape[:2], 3, len(centres), dtype=torch.float64)
    for atom in range(frames.shape[0]):
        r = vectors[atoms == atom]
        distance = r.norm(dim=1, keepdim=True)
        away = distance[:, 0] > 1e-6  # the atom itself has no direction: not in the sum
        direction = r[away] / distance[away]
        for head in range(frames.shape[1]):
            cos = direction @ frames[atom, head].T  # (images, 3 axes)
            gaussians = torch.exp(-0.5 * ((cos[..., None] - centres) / (8 / 63)) ** 2)
            w = weight[atoms == atom][away, head]
            out[atom, head] = (w[:, None, None] * gaussians).sum(0)
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["chunked", "compiled"])
def test_angular_sums_match_the_definition_on_real_crystals(table, compiled, monkeypatch):
    """Every layer's angular sums and their gradient against `brute_force_angular_sums`, in
    float64, fed the layer's own image weights and frames: the atom's own position (r = 0)
    adds nothing, in either kernel path."""
    model = new_framer(7, **SMALL).double()
    batch = batch_from_table(table, dtype=torch.float64, image_vectors=True)
    freeze_sigma_stats(model, batch)
    real = ~batch.image_padding  # the batch's images in the table's order, then padding
    Runtime(device="cpu", compiled=compiled).prepare(model)
    probe = torch.rand(batch.n_atoms, 4, 3, 16, dtype=torch.float64)
    layers = [block.attention for block in model.blocks]
    for layer, weight in zip(layers, layer_image_weights(model, batch, monkeypatch), strict=True):
        weight.requires_grad_(True)
        summed = layer.angular_sums(batch, weight, model.kernels.angular)
        frames = max_frames(weight.detach(), batch.image_unit, batch.image_atom, batch.n_atoms)
        reference = brute_force_angular_sums(table, weight[real], frames, layer.angle_centres)
        scale = reference.abs().max().item()
        torch.testing.assert_close(summed, reference, rtol=0, atol=1e-12 * scale)
        (grad,) = torch.autograd.grad((summed * probe).sum(), weight)
        (expected,) = torch.autograd.grad((reference * probe).sum(), weight)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


# --- ties -------------------------------------------------------------------------------------


def images_reordered(table: pa.Table, seed: int) -> pa.Table:
    """The same crystals with each pair's images listed in a seeded random order: whichever
    of several tied images comes first changes, nothing else does."""
    rng = np.random.default_rng(seed)
    rows = table.to_pylist()
    for row in rows:
        pair = np.array(row["image_pair"])
        order = np.arange(len(pair))
        starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(pair)], strict=True):
            order[start:stop] = start + rng.permutation(stop - start)
        row["image_pair"] = pair[order].tolist()
        row["image_dist"] = np.array(row["image_dist"])[order].tolist()
        row["image_shift"] = np.reshape(row["image_shift"], (-1, 3))[order].ravel().tolist()
    return pa.Table.from_pylist(rows, schema=table.schema)


def framed_run(model, table, monkeypatch):
    """(output (C, 1), every layer's frames (A, H, 3, 3), its angular sums (A, H, 3, M))."""
    frames, sums = [], []

    def frames_spy(*args):
        frames.append(max_frames(*args))
        return frames[-1]

    angular_sums = FramedAttention.angular_sums

    def sums_spy(layer, batch, image_weight, kernels):
        sums.append(angular_sums(layer, batch, image_weight, kernels))
        return sums[-1]

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr("crystalformer.model.crystalframer.max_frames", frames_spy)
        patch.setattr(FramedAttention, "angular_sums", sums_spy)
        output = model(batch_from_table(table, dtype=torch.float64, image_vectors=True))
    return output, frames, sums


def double_framer(table) -> CrystalFramer:
    model = new_framer(3, **SMALL).double()
    freeze_sigma_stats(model, batch_from_table(table, dtype=torch.float64, image_vectors=True))
    return model


@pytest.mark.parametrize("material_id", ["mp-10054", "mp-3448"], ids=["ZrAs", "KMgF3"])
def test_output_does_not_depend_on_which_tied_image_wins_on_cubic_sites(
    mp_cifs, material_id, monkeypatch
):
    """Rock salt (ZrAs) and cubic perovskite (KMgF3): every site is m-3m, every frame is a
    choice among tied images, and another image order picks other ones (frames change), but
    any two choices differ by a rotation of the site: the output is the same to round-off."""
    table = table_of([structure_of(mp_cifs, material_id)])
    model = double_framer(table)
    output, frames, _ = framed_run(model, table, monkeypatch)
    for seed in range(3):
        other_output, other_frames, _ = framed_run(
            model, images_reordered(table, seed), monkeypatch
        )
        changed = [
            (a - b).abs().amax((-1, -2)) > 1e-6 for a, b in zip(frames, other_frames, strict=True)
        ]
        assert torch.stack(changed).any()
        torch.testing.assert_close(other_output, output, rtol=1e-12, atol=0)


def test_mirror_image_ties_flip_e3_and_mirror_its_angular_sums(mp_cifs, monkeypatch):
    """The limit of max frames the module documents, on VS2 (R-3m; V at -3m, S at 3m):
    where the tied images are mirror images of each other, choosing the other one flips e3,
    which reverses the first layer's e3 Gaussian sums (c(-cos) for c(cos)); e1's and e2's
    stay. The output then differs (by 13% here, untrained)."""
    table = table_of([structure_of(mp_cifs, "mp-1013526")])
    model = double_framer(table)
    output, _, (sums, *_) = framed_run(model, table, monkeypatch)
    other_output, _, (other_sums, *_) = framed_run(model, images_reordered(table, 0), monkeypatch)
    scale = sums.abs().max().item()
    close = 1e-6 * scale  # the CIF's coordinates are symmetric to ~1e-7
    torch.testing.assert_close(other_sums[:, :, :2], sums[:, :, :2], rtol=0, atol=close)
    e3, other_e3 = sums[:, :, 2], other_sums[:, :, 2]  # (A, H, M)
    same = (other_e3 - e3).abs().amax(-1) < close
    mirrored = (other_e3 - e3.flip(-1)).abs().amax(-1) < close
    assert torch.all(same | mirrored) and not torch.all(same)
    assert ((other_output - output).abs() / output.abs()).item() > 1e-2


# --- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_predictions_are_invariant(framer, structures, transform):
    """primitive=False: the image sums and the frames, not the cell reduction, carry it."""
    original = torch.from_numpy(predict_structures(framer, structures, primitive=False))
    moved = [TRANSFORMS[transform](s) for s in structures]
    moved_predictions = predict_structures(framer, moved, primitive=False)
    assert_rows_close(torch.from_numpy(moved_predictions), original, RTOL)


def test_batch_equals_one_by_one_and_repeats(framer, structures):
    together = predict_structures(framer, structures, primitive=False)
    alone = np.concatenate([predict_structures(framer, [s], primitive=False) for s in structures])
    np.testing.assert_allclose(together, alone, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(predict_structures(framer, structures, primitive=False), together)


def test_saved_model_loads_as_crystalframer(framer, table, tmp_path):
    save_model(framer, tmp_path, {"targets": ["x"], "units": {"x": None}})
    loaded, card = load_model(tmp_path)
    assert card["architecture"] == "crystalframer" and isinstance(loaded, CrystalFramer)
    np.testing.assert_array_equal(predict_table(loaded, table), predict_table(framer, table))


def test_image_directions_rebuild_the_stored_distances(table):
    batch = batch_from_table(table, dtype=torch.float64, image_vectors=True)
    rebuilt = _image_vectors(table)
    real = ~batch.image_padding.numpy()
    dist_sq, unit = batch.image_dist_sq.numpy()[real], batch.image_unit.numpy()
    assert np.allclose(np.linalg.norm(rebuilt, axis=1) ** 2, dist_sq, atol=1e-9)
    is_self = (batch.image_dist_sq.numpy() < 1e-12) & real
    assert is_self.sum() == batch.n_atoms  # one r = 0 image per atom, with no direction
    assert np.all(unit[is_self | ~real] == 0)  # nor have the padding images
    norms = np.linalg.norm(unit[~is_self & real], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-12)


def _image_vectors(table) -> np.ndarray:
    """r_ijn = p_j + n·L - p_i crystal by crystal, in plain loops (the reference)."""
    out = []
    for row in table.to_pylist():
        n = len(row["atomic_numbers"])
        positions = np.reshape(row["positions"], (n, 3))
        lattice = np.reshape(row["lattice"], (3, 3))
        shifts = np.reshape(row["image_shift"], (-1, 3))
        for code, shift in zip(row["image_pair"], shifts, strict=True):
            i, j = divmod(code, n)
            out.append(positions[j] + shift @ lattice - positions[i])
    return np.array(out)
