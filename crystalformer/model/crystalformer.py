"""The Crystalformer encoder (Taniai et al., ICLR 2024), as docs/model.md §2–§4 defines it.

Top-down in the order the data meets it: the config (model/config.py), σ, α, the image
weights w and β, the attention they make, the layer, the block, the model. Every sum over
atoms, pairs or images is a scatter over flat segment ids (model/batch.py), so a batch mixes
crystals of any size; the blocks other encoders share (radial basis, softmax over segments,
the sparse products and their kernels) are in model/layers.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from crystalformer.model.base import PropertyModel
from crystalformer.model.batch import IMAGE_BLOCK, CrystalBatch, batch_from_table, batch_images
from crystalformer.model.config import CrystalformerConfig
from crystalformer.model.layers import (
    GatheredDot,
    RadialBasis,
    ScatterProduct,
    SparseKernels,
    compiled_kernel,
    exp_flushed,
    flush_tiny,
    segment_softmax,
    sparse_kernels,
)
from crystalformer.records import MAX_Z

# --- σ, α, w and β (docs/model.md §2) --------------------------------------------------------


def sigma_from_query(x: torch.Tensor, b: float, r0: float) -> torch.Tensor:
    """σ = r0/√ρ with ρ = (1-b)·ELU(0.1·x/(1-b)) + 1, so ρ > b and σ < r0/√b.

    x is the normalised projection q·w of each atom's query, (A, H).
    """
    rho = (1 - b) * F.elu(0.1 * x / (1 - b)) + 1
    return r0 / torch.sqrt(rho)


def image_log_weights(
    batch: CrystalBatch, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """α per pair and log w per image: a stable log-sum-exp over the images of each pair.

    α_ij = log Σ_n exp(-|r_ij(n)|² / 2σ_i²); the nearest image's term is factored out, so the
    remaining exponents are ≤ 0 (plus log c for an image standing for c) and the sum is
    ≥ 1. log w_ijn = -|r|²/2σ_i² - α_ij.
    Returns (alpha (P, H), log_w (T, H)).
    """
    return _log_weights(sigma, *image_geometry(batch))


def image_geometry(batch: CrystalBatch) -> tuple[torch.Tensor, ...]:
    """The batch tensors `_log_weights` reads, in its order."""
    return (
        batch.pair_i,
        batch.image_pair,
        batch.image_dist_sq,
        batch.pair_min_dist_sq,
        batch.image_log_count,
    )


def _log_weights(sigma, pair_i, image_pair, image_dist_sq, pair_min_dist_sq, image_log_count):
    """`image_log_weights` on plain tensors (what torch.compile traces).

    An image standing for c equal images of its pair (batch.py) enters as c terms: log c
    is added to its exponent, so its w is c times one image's, exactly what every sum of
    the pair's images needs; padding (c = 0, log c = -inf) gets w = 0.
    """
    inv_two_var = 0.5 / sigma.square()  # (A, H)
    pair_scale = inv_two_var[pair_i]  # (P, H)
    excess = image_dist_sq - pair_min_dist_sq[image_pair]  # (T,) ≥ 0
    relative = image_log_count[:, None] - excess[:, None] * pair_scale[image_pair]  # (T, H)
    total = torch.zeros_like(pair_scale).index_add_(0, image_pair, exp_flushed(relative))
    log_total = total.log()
    alpha = -pair_min_dist_sq[:, None] * pair_scale + log_total
    log_w = relative - log_total[image_pair]
    return alpha, log_w


def _image_weights(attention, image_pair, log_w):
    """a_ij · w_ijn per image and head, (T, H), tiny values flushed: what β and CrystalFramer's
    frames weigh each image by."""
    return flush_tiny(attention[image_pair] * exp_flushed(log_w))


def edge_term(
    batch: CrystalBatch,
    image_weight: torch.Tensor,
    basis: torch.Tensor,
    projection: torch.Tensor,
) -> torch.Tensor:
    """Σ_j a_ij β_ij = W_h Σ_(j,n) a_ij w_ijn b(|r_ijn|) per atom and head, (A, H, D).

    β enters linearly, so it is never formed per pair: one (atoms × heads × K) sum over
    images of `image_weight` a_ij·w_ijn (T, H) times the basis b(|r|) (T, K' ≤ K; the
    Gaussians left out are 0 everywhere, see RadialBasis). Images come in blocks of one
    atom each (batch.py), so the sum is a batched matrix product over blocks, then a sum of
    each atom's blocks.
    """
    n_heads, n_basis = image_weight.shape[1], basis.shape[1]
    per_block = torch.bmm(
        image_weight.view(-1, IMAGE_BLOCK, n_heads).transpose(1, 2),
        basis.view(-1, IMAGE_BLOCK, n_basis),
    )  # (blocks, H, K')
    summed = per_block.new_zeros(batch.n_atoms, n_heads, n_basis)
    summed = summed.index_add(0, batch.image_atom[::IMAGE_BLOCK], per_block)
    return torch.einsum("ahk,hdk->ahd", summed, projection[..., :n_basis])


# --- the periodic attention ------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodicKernels:
    """What attention computes per pair and image, all eager or all torch.compile'd (chosen
    once per model by `Runtime.prepare`): the sparse products and the radial basis
    (layers.py), and α with log w, and a·w, per image."""

    sparse: SparseKernels
    log_weights: Callable  # `_log_weights`
    image_weights: Callable  # `_image_weights`


@functools.cache
def periodic_kernels(chunk: int, compiled: bool) -> PeriodicKernels:
    per_image = (_log_weights, _image_weights)
    if compiled:
        per_image = tuple(map(compiled_kernel, per_image))
    return PeriodicKernels(sparse_kernels(chunk, compiled), *per_image)


def attention_weights(
    batch: CrystalBatch,
    q: torch.Tensor,
    k: torch.Tensor,
    sigma: torch.Tensor,
    kernels: PeriodicKernels,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_j(q_i·k_j/√d + α_ij) per pair (P, H), and log w_ijn per image (T, H)."""
    alpha, log_w = kernels.log_weights(sigma, *image_geometry(batch))
    scores = GatheredDot.apply(q, k, batch.pair_i, batch.pair_j, kernels.sparse)
    attention = segment_softmax(scores / math.sqrt(q.shape[2]) + alpha, batch.pair_i, len(q))
    return attention, log_w


def periodic_attention(
    batch: CrystalBatch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    basis: torch.Tensor | None,
    projection: torch.Tensor | None,
    kernels: PeriodicKernels,
) -> torch.Tensor:
    """y_i = Σ_j softmax_j(q_i·k_j/√d + α_ij) (v_j + β_ij) per head, (A, H, D).

    q, k, v are (A, H, D), σ is (A, H), `basis` b(|r|) per image (T, K') and `projection` W_h
    (H, D, K), both None without β. Pair and image products go through `kernels` (chunked
    or compiled).
    """
    attention, log_w = attention_weights(batch, q, k, sigma, kernels)
    y = ScatterProduct.apply(attention, v, batch.pair_j, batch.pair_i, len(q), kernels.sparse)
    if projection is None:
        return y
    image_weight = kernels.image_weights(attention, batch.image_pair, log_w)  # a·w, (T, H)
    return y + edge_term(batch, image_weight, basis, projection)


# --- the layer, the block, the model ----------------------------------------------------------


class PeriodicAttention(nn.Module):
    """y_i = Σ_j softmax_j(q_i·k_j/√d + α_ij) (v_j + β_ij), summed over all images of j."""

    def __init__(self, config: CrystalformerConfig):
        super().__init__()
        self.config = config
        h, d = config.n_heads, config.head_dim
        self.query = nn.Linear(config.dim, config.dim)
        self.key = nn.Linear(config.dim, config.dim)
        self.value = nn.Linear(config.dim, config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.sigma_query = nn.Parameter(torch.empty(h, d))  # w_h: σ from the unscaled query
        self.edge = nn.Parameter(torch.empty(h, d, config.n_rbf)) if config.n_rbf else None
        # σ normalisation: frozen from the first training batch, saved in the state dict
        self.register_buffer("sigma_mean", torch.zeros(()))
        self.register_buffer("sigma_std", torch.ones(()))
        self.register_buffer("sigma_frozen", torch.zeros((), dtype=torch.bool))

    def sigma(self, q: torch.Tensor, multiplicity: torch.Tensor | None = None) -> torch.Tensor:
        """σ_ih per atom and head, (A, H), from q (A, H, D); `multiplicity` (A,) is how many
        atoms each row stands for (batch.py), so the frozen statistics are over atoms."""
        x = torch.einsum("ahd,hd->ah", q, self.sigma_query)
        if self.training and not bool(self.sigma_frozen):
            with torch.no_grad():
                mean, std = _atom_statistics(x, multiplicity)
                self.sigma_mean.copy_(mean)
                self.sigma_std.copy_(torch.nan_to_num(std, nan=1.0).clamp_min(1e-6))
                self.sigma_frozen.fill_(True)
        x = (x - self.sigma_mean) / self.sigma_std
        # contiguous: the einsum leaves (A, H) transposed, which the compiled image kernels
        # would read by gathers (measured 2.3x slower)
        return sigma_from_query(x, self.config.b, self.config.r0).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        batch: CrystalBatch,
        basis: torch.Tensor | None,
        kernels: PeriodicKernels,
    ) -> torch.Tensor:
        """x (A, dim) → (A, dim); `basis` is b(|r|) per image (T, K'), None when K = 0."""
        h, d = self.config.n_heads, self.config.head_dim
        q, k, v = (layer(x).view(-1, h, d) for layer in (self.query, self.key, self.value))
        return self.out(self.attend(batch, q, k, v, basis, kernels).reshape(-1, h * d))

    def attend(self, batch, q, k, v, basis, kernels: PeriodicKernels) -> torch.Tensor:
        """The heads' outputs (A, H, D) from their queries, keys and values."""
        sigma = self.sigma(q, batch.atom_multiplicity)
        return periodic_attention(batch, q, k, v, sigma, basis, self.edge, kernels)


def _atom_statistics(
    x: torch.Tensor, multiplicity: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of x (A, H) with row a counted
    multiplicity[a] times: torch's mean and std of the batch with every atom present."""
    if multiplicity is None:
        return x.mean(), x.std()
    weight = multiplicity[:, None].expand_as(x)
    n = weight.sum()
    mean = (weight * x).sum() / n
    return mean, ((weight * (x - mean).square()).sum() / (n - 1)).sqrt()


class Block(nn.Module):
    """x + attention(x), then x + FFN(x); no LayerNorm (T-Fixup initialisation instead)."""

    def __init__(self, config: CrystalformerConfig, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.ffn = nn.Sequential(
            nn.Linear(config.dim, config.ffn_dim),
            nn.ReLU(),
            nn.Linear(config.ffn_dim, config.dim),
        )

    def forward(
        self,
        x: torch.Tensor,
        batch: CrystalBatch,
        basis: torch.Tensor | None,
        kernels: PeriodicKernels,
    ) -> torch.Tensor:
        x = x + self.attention(x, batch, basis, kernels)
        return x + self.ffn(x)


class Crystalformer(PropertyModel):
    """Atom embedding → blocks → mean over each crystal's atoms → MLP head."""

    image_vectors = False  # whether batches carry each image's direction (for angles)

    def __init__(self, config: CrystalformerConfig | None = None):
        config = config or CrystalformerConfig()
        super().__init__(config)
        self.embed = nn.Linear(MAX_Z, config.dim, bias=False)
        self.rbf = RadialBasis(config.n_rbf, config.rbf_max) if config.n_rbf else None
        self.blocks = nn.ModuleList(
            Block(config, self.attention_layer(config)) for _ in range(config.n_layers)
        )
        self.reset_parameters()

    def attention_layer(self, config: CrystalformerConfig) -> nn.Module:
        return PeriodicAttention(config)

    def select_kernels(self, chunk: int, compiled: bool) -> None:
        self.kernels = periodic_kernels(chunk, compiled)

    def make_batch(self, table):
        return batch_from_table(table, image_vectors=self.image_vectors)

    def batch_images(self, table):
        return batch_images(table, self.image_vectors)

    def reset_parameters(self) -> None:
        """T-Fixup: xavier everywhere, FFN/value/output × 0.67·L^-1/4 (docs/model.md §4)."""
        n_layers, dim = self.config.n_layers, self.config.dim
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        scale = 0.67 * n_layers**-0.25
        for block in self.blocks:
            attention = block.attention
            for linear in (block.ffn[0], block.ffn[2], attention.value, attention.out):
                linear.weight.data.mul_(scale)
            nn.init.normal_(attention.sigma_query, std=attention.sigma_query.shape[1] ** -0.5)
            if attention.edge is not None:
                for head in attention.edge:
                    nn.init.xavier_uniform_(head, gain=self.config.n_rbf**-0.5)
        nn.init.normal_(self.embed.weight, std=dim**-0.5 * (9 * n_layers) ** -0.25)

    def num_parameters(self) -> int:
        """Learned parameters plus the σ-normalisation buffers, as the reference counts them."""
        sigma_buffers = sum(
            buffer.numel() for name, buffer in self.named_buffers() if ".sigma_" in name
        )
        return sum(p.numel() for p in self.parameters()) + sigma_buffers

    def encode(self, batch: CrystalBatch) -> torch.Tensor:
        """One vector per crystal, (C, dim)."""
        atoms = self.embed.weight.T[batch.species_z - 1] * batch.species_occupancy[:, None]
        x = atoms.new_zeros(batch.n_atoms, self.config.dim)
        x = x.index_add(0, batch.species_atom, atoms)
        basis = None
        if self.rbf is not None:
            distance = batch.image_dist_sq.sqrt()
            basis = self.rbf(distance, self.kernels.sparse, batch.max_distance)  # (T, K')
        for block in self.blocks:
            x = block(x, batch, basis, self.kernels)
        # each row stands for its class's atoms: the mean over all atoms of the crystal
        weight = batch.atom_multiplicity
        counts = x.new_zeros(batch.n_crystals).index_add(0, batch.atom_crystal, weight)
        pooled = x.new_zeros(batch.n_crystals, self.config.dim)
        pooled = pooled.index_add(0, batch.atom_crystal, x * weight[:, None])
        return pooled / counts.clamp_min(1)[:, None]
