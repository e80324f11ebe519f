"""CrystalFramer (Ito et al., ICLR 2025): Crystalformer with angles in dynamic frames.

docs/model.md §7. Each layer, atom and head builds an orthonormal frame (e1, e2, e3) from its own
attention over images, and the value of image n of pair (i, j) gains angular terms:

    ψ_ijn = W0·b(|r|) + Σ_k W_k·c(e_k·r̂_ijn),   c: Gaussians on cos ∈ [-1, 1].

Like β, the angular terms enter linearly, so they are summed per atom over images
(Σ_(j,n) a_ij w_ijn c(e_k·r̂_ijn), an (atoms × heads × 3 × M) tensor) and never formed per
pair. The Gaussians depend only on geometry and the frame, which carries no gradient, so the
backward pass recomputes them chunk by chunk instead of storing (images × heads × 3 × M).

"max" frames, by the rule of the authors' code (omron-sinicx/crystalframer, compared in float64
layer by layer in issue 19):
- e1 points to the image with the largest attention weight a_ij·w_ijn, r = 0 excluded;
- e2 to the image with the largest a_ij·w_ijn·(1 - |e1·r̂|) among those with |e1·r̂| < 0.9999
  (`COLLINEAR`), made orthogonal to e1 (Gram-Schmidt); e3 = e1 × e2, so every frame is
  right-handed. The authors maximise log w + log max(1 - |cos|, 1e-5) over the same images:
  the same argmax, since 1 - |cos| > 1e-4 there. One difference remains: images whose
  weight was flushed to 0 (`flush_tiny`, < 1e-19 in float32) give no axis, where the
  authors' log-space rule still ranks them. That can matter only when the images off e1's
  line weigh next to nothing; when all of them are flushed, e2 is any perpendicular
  (e1 × the Cartesian axis least parallel to it).
- The atom itself (r = 0) has no direction: it enters neither the frames nor the angular sums
  (the authors' kernels give it a cosine outside [-1, 1], so it adds nothing; until issue 19
  it added w·c(0) to every axis here).
The Gaussians c are computed in full. The authors' kernels cut each beyond ±4 widths, an
approximation (a cut Gaussian is < e^-8 of its peak; 2e-4 relative on issue 19's crystals)
not copied here.

Ties: weights within a relative `TIE_TOLERANCE` of the maximum count as equal (so float
round-off in a different batch cannot flip the choice) and the first such image in the
batch's image order wins: the lowest attended atom j, then the shard's shift order. (The
authors add random noise of ±0.5e-5 instead.) Which tied image wins matters in some crystals
(tests/test_crystalframer.py, float64, untrained models; listing each pair's images in
another order makes other tied images win):
- ties related by a rotation of the site change nothing: rock salt (ZrAs) and cubic
  perovskite (KMgF3), whose every site is m-3m, give the same output to 1e-14;
- ties between mirror images flip e3, which mirrors its Gaussian sums (c(-cos) for c(cos)):
  VS2 (R-3m) by 31% of the largest sum in the first layer, its output by 13%;
- ties between images that no operation of the site keeping e1 exchanges change every axis:
  ZrZnNi4 (F-43m) by 9% of the largest sum in the first layer (Zn's 12 Ni neighbours weigh
  the same there; four make the same angle with e1: two pairs of mirror images, the pairs
  exchanged by no operation of the site that keeps e1).
Over 150 mp2018 crystals of ≤ 12 atoms, each with its images in three other orders, the
default model (untrained) moved 50 outputs by more than 1e-3 of the outputs' standard
deviation, 7 by more than 0.1 of it, at most 0.37 (RhN). So a prediction can depend on the
order a shard lists images in: it is reproducible for one shard, but another cell or image
order of the same crystal may give another of these values (the authors' noise picks one at
random on every pass). This is a limit of max frames themselves, not of this implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from crystalformer.model.config import CrystalFramerConfig
from crystalformer.model.crystalformer import (
    Crystalformer,
    PeriodicAttention,
    PeriodicKernels,
    attention_weights,
    edge_term,
    periodic_kernels,
)
from crystalformer.model.layers import ScatterProduct, chunks, compiled_kernel, exp_flushed

TIE_TOLERANCE = 1e-5  # relative: attention weights this close to the maximum tie
COLLINEAR = 0.9999  # |cos| with e1 from which an image cannot give e2 (the authors' bound)
ANGLE_WIDTH = 4 * 2 / 63  # of the cos Gaussians (docs/model.md §7), centres 2/63 apart


def angle_basis(cos: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Gaussians of width 4·2/63 at `centres` on cos ∈ [-1, 1], (..., M)."""
    return exp_flushed(-0.5 * ((cos[..., None] - centres) / ANGLE_WIDTH).square())


def _angular_total(weight, cos, target, n_out: int, centres) -> torch.Tensor:
    """out[target[t], h, k, :] += weight[t, h] · basis(cos[t, h, k]), (n_out, H, 3, M)."""
    out = weight.new_zeros(n_out, *cos.shape[1:], len(centres))
    return out.index_add_(0, target, weight[:, :, None, None] * angle_basis(cos, centres))


def _angular_weight_grad(grad, cos, target, centres) -> torch.Tensor:
    """d total / d weight[t, h] = Σ_(k,m) grad[target[t], h, k, m] · basis(cos[t, h, k])_m."""
    return (grad[target] * angle_basis(cos, centres)).sum((2, 3))


def _chunked_total(weight, cos, target, n_out: int, centres, chunk: int) -> torch.Tensor:
    out = weight.new_zeros(n_out, *cos.shape[1:], len(centres))
    for part in chunks(len(weight), chunk):
        out += _angular_total(weight[part], cos[part], target[part], n_out, centres)
    return out


def _chunked_weight_grad(grad, cos, target, centres, chunk: int) -> torch.Tensor:
    parts = chunks(len(cos), chunk)
    return torch.cat([_angular_weight_grad(grad, cos[p], target[p], centres) for p in parts])


@dataclass(frozen=True)
class AngularKernels:
    """The angular sum and its weight gradient: eager in chunks of images (bounded memory),
    or fused by torch.compile so no (images × heads × 3 × M) tensor is ever stored."""

    total: Callable  # (weight, cos, target, n_out, centres) -> (n_out, H, 3, M)
    weight_grad: Callable  # (grad, cos, target, centres) -> (T, H)


@functools.cache
def angular_kernels(chunk: int, compiled: bool) -> AngularKernels:
    if compiled:
        return AngularKernels(
            compiled_kernel(_angular_total), compiled_kernel(_angular_weight_grad)
        )
    return AngularKernels(
        functools.partial(_chunked_total, chunk=chunk),
        functools.partial(_chunked_weight_grad, chunk=chunk),
    )


@dataclass(frozen=True)
class FramedKernels(PeriodicKernels):
    """Crystalformer's kernels and the angular ones, chosen together (`Runtime.prepare`)."""

    angular: AngularKernels


@functools.cache
def framed_kernels(chunk: int, compiled: bool) -> FramedKernels:
    periodic = periodic_kernels(chunk, compiled)
    return FramedKernels(
        periodic.sparse,
        periodic.log_weights,
        periodic.image_weights,
        angular_kernels(chunk, compiled),
    )


class AngularSum(torch.autograd.Function):
    """`kernels.total` whose backward recomputes the basis instead of saving it.

    Only `weight` takes a gradient: the basis depends on geometry and the frames alone.
    """

    @staticmethod
    def forward(ctx, weight, cos, target, n_out, centres, kernels):
        ctx.save_for_backward(cos, target, centres)
        ctx.kernels = kernels
        return kernels.total(weight, cos, target, n_out, centres)

    @staticmethod
    def backward(ctx, grad):
        cos, target, centres = ctx.saved_tensors
        return ctx.kernels.weight_grad(grad, cos, target, centres), None, None, None, None, None


def segment_argmax(scores: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Per segment and column, the first row whose score ties the maximum, (n_segments, H).

    Rows with a score ≤ 0 never win; a segment without a positive score gets len(scores).
    """
    index = segment[:, None].expand_as(scores)
    top = scores.new_zeros(n_segments, scores.shape[1])
    top = top.scatter_reduce(0, index, scores, reduce="amax", include_self=True)
    best = top[segment]
    tied = (scores > 0) & (scores >= best * (1 - TIE_TOLERANCE))
    rows = torch.arange(len(scores), device=scores.device)[:, None].expand_as(scores)
    first = torch.full_like(top, len(scores), dtype=torch.long)
    return first.scatter_reduce(0, index, rows.masked_fill(~tied, len(scores)), reduce="amin")


def without_self(image_weight: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """`image_weight` (T, H) with 0 for the images without a direction (`unit` (T, 3) zero):
    the atom itself, r = 0, and the batch's padding."""
    return image_weight.masked_fill(unit.abs().sum(1, keepdim=True) == 0, 0.0)


@torch.no_grad()
def max_frames(
    image_weight: torch.Tensor, unit: torch.Tensor, image_atom: torch.Tensor, n_atoms: int
) -> torch.Tensor:
    """Right-handed orthonormal frames (A, H, 3 axes, 3 xyz) from the attention over images.

    `image_weight` is a_ij·w_ijn (T, H), `unit` the image directions r̂ (T, 3), zero for r = 0.
    """
    weight = without_self(image_weight, unit)
    padded = torch.cat([unit, unit.new_zeros(1, 3)])  # "no image" picks a zero direction
    e1 = padded[segment_argmax(weight, image_atom, n_atoms)]  # (A, H, 3)
    e1 = torch.where(e1.abs().sum(-1, keepdim=True) > 0, e1, e1.new_tensor([1.0, 0.0, 0.0]))
    cos1 = torch.einsum("tx,thx->th", unit, e1[image_atom]).abs()  # |e1·r̂|
    off_line = (weight * (1 - cos1)).masked_fill(cos1 >= COLLINEAR, 0.0)  # e2's candidates
    second = padded[segment_argmax(off_line, image_atom, n_atoms)]
    e2 = second - (second * e1).sum(-1, keepdim=True) * e1
    fallback = torch.cross(e1, _least_aligned_axis(e1), dim=-1)
    e2 = torch.where(second.abs().sum(-1, keepdim=True) > 0, e2, fallback)
    e2 = e2 / e2.norm(dim=-1, keepdim=True)
    return torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=2)


def _least_aligned_axis(direction: torch.Tensor) -> torch.Tensor:
    """The Cartesian axis least parallel to each direction (..., 3): a safe cross partner."""
    return torch.eye(3, dtype=direction.dtype, device=direction.device)[direction.abs().argmin(-1)]


class FramedAttention(PeriodicAttention):
    """Periodic attention whose values gain the angular terms Σ_k W_k·c(e_k·r̂)."""

    def __init__(self, config: CrystalFramerConfig):
        super().__init__(config)
        h, d, m = config.n_heads, config.head_dim, config.n_angle_rbf
        self.register_buffer("angle_centres", torch.linspace(-1.0, 1.0, m), persistent=False)
        self.angle = nn.Parameter(torch.empty(h, d, 3, m))

    def attend(self, batch, q, k, v, basis, kernels: FramedKernels) -> torch.Tensor:
        attention, log_w = attention_weights(batch, q, k, self.sigma(q), kernels)
        y = ScatterProduct.apply(attention, v, batch.pair_j, batch.pair_i, len(q), kernels.sparse)
        image_weight = kernels.image_weights(attention, batch.image_pair, log_w)  # (T, H)
        if self.edge is not None:
            y = y + edge_term(batch, image_weight, basis, self.edge)
        summed = self.angular_sums(batch, image_weight, kernels.angular)  # (A, H, 3, M)
        return y + torch.einsum("ahkm,hdkm->ahd", summed, self.angle)

    def angular_sums(
        self, batch, image_weight: torch.Tensor, kernels: AngularKernels
    ) -> torch.Tensor:
        """Σ_(j,n: r ≠ 0) a_ij w_ijn c(e_k·r̂_ijn) per atom, head and axis k, (A, H, 3, M),
        in the max frames of `image_weight` a_ij·w_ijn (T, H). The atom itself has no
        direction: it enters neither the frames nor the sums (its weight is set to 0 here,
        before either kernel path)."""
        unit = batch.image_unit
        weight = without_self(image_weight, unit)
        frames = max_frames(weight.detach(), unit, batch.image_atom, batch.n_atoms)
        cos = torch.einsum("tx,thkx->thk", unit, frames[batch.image_atom])  # (T, H, 3)
        return AngularSum.apply(
            weight, cos, batch.image_atom, batch.n_atoms, self.angle_centres, kernels
        )


class CrystalFramer(Crystalformer):
    """Crystalformer whose attention layers measure angles in dynamic "max" frames.

    With n_angle_rbf = 0 it is Crystalformer, layer for layer and weight for weight.
    """

    def __init__(self, config: CrystalFramerConfig | None = None):
        super().__init__(config or CrystalFramerConfig())

    def attention_layer(self, config: CrystalFramerConfig) -> nn.Module:
        return FramedAttention(config) if config.n_angle_rbf else PeriodicAttention(config)

    def select_kernels(self, chunk: int, compiled: bool) -> None:
        self.kernels = framed_kernels(chunk, compiled)

    def reset_parameters(self) -> None:
        """Crystalformer's initialisation; each angle projection like the edge one."""
        super().reset_parameters()
        for block in self.blocks:
            angle = getattr(block.attention, "angle", None)
            if angle is not None:
                for head in angle.data:  # (D, 3, M)
                    for axis in range(3):
                        nn.init.xavier_uniform_(head[:, axis], gain=self.config.n_angle_rbf**-0.5)

    @property
    def image_vectors(self) -> bool:
        return bool(self.config.n_angle_rbf)
