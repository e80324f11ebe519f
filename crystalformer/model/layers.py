"""Blocks every encoder shares: flushed exponentials, softmax within segments, the radial
basis, and the sparse products over pairs and images with their memory-saving backward.

A sum over a crystal's pairs or images is a scatter over flat segment ids (model/batch.py).
The sparse products come in two forms, chosen once per model by `model.runtime.Runtime`
(docs/model.md §10): eager, in chunks of edges so no (edges × heads × features) tensor is
ever whole; or fused by torch.compile, which never stores per-edge products at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

Kernel = TypeVar("Kernel", bound=Callable)

# --- flushed exponentials ---------------------------------------------------------------------


def flush_tiny(x: torch.Tensor) -> torch.Tensor:
    """x with |values| below √(smallest normal number) set to 0.

    Far images give Gaussians and weights like e^-60, whose products are subnormal floats,
    on which x86 CPUs are many times slower (measured: one layer's β sum took 175 ms instead
    of 23 ms). Below 1.1e-19 (float32) in sums of order 1e-2..1, such terms change nothing;
    with both factors flushed, no product of two is subnormal.
    """
    return x.masked_fill(x.abs() < math.sqrt(torch.finfo(x.dtype).tiny), 0.0)


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """exp(x), 0 where that is below √(smallest normal): `flush_tiny(x.exp())` without ever
    computing a subnormal (exp is slow there too)."""
    floor = flush_exponent(x.dtype)
    return torch.exp(x.clamp_min(floor)).masked_fill(x < floor, 0.0)


def flush_exponent(dtype: torch.dtype) -> float:
    """The x below which `exp_flushed(x)` is 0: log √(smallest normal number)."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


# --- softmax over segments --------------------------------------------------------------------


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of `scores` (E, H) within each segment (e.g. over j for each attending atom i)."""
    index = segment[:, None].expand_as(scores)
    top = scores.new_full((n_segments, scores.shape[1]), -torch.inf)
    top = top.scatter_reduce(0, index, scores, reduce="amax", include_self=True)
    weights = (scores - top[segment]).exp()
    total = torch.zeros_like(top).index_add_(0, segment, weights)
    return weights / total[segment]


# --- the radial basis -------------------------------------------------------------------------


class RadialBasis(nn.Module):
    """K Gaussians b_k(r) = exp(-(r - μ_k)²/2s²), μ_k = k·s for k = 1..K, s = rbf_max/K."""

    def __init__(self, n_rbf: int, rbf_max: float):
        super().__init__()
        self.width = rbf_max / n_rbf
        self.register_buffer("centres", torch.arange(1, n_rbf + 1) * self.width, persistent=False)

    def forward(
        self,
        dist: torch.Tensor,
        kernels: SparseKernels | None = None,
        largest: float | None = None,
    ) -> torch.Tensor:
        """b(dist), (T, K); through `kernels` (e.g. compiled) when given.

        With `largest`, the largest distance that matters, only the first K' ≤ K Gaussians:
        those centred farther than `largest` plus `reach` widths are flushed to 0 at every
        such distance (`exp_flushed`), so they are left out rather than computed (a third
        of them with r_cut 7 Å and rbf_max 14 Å); a caller that sums them against weights
        (Crystalformer's `edge_term`) loses nothing.
        """
        centres = self.centres
        if largest is not None:
            reach = math.sqrt(-2 * flush_exponent(dist.dtype))
            centres = centres[: int(largest / self.width + reach) + 1]
        basis = kernels.radial_basis if kernels is not None else radial_basis
        return basis(dist, centres, self.width)


def radial_basis(dist: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussians of width `width` at `centres`, flushed, (T, len(centres))."""
    return exp_flushed(-0.5 * ((dist[:, None] - centres) / width).square())


# --- sparse products over pairs and images ----------------------------------------------------


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of at most `size` covering range(n) in order."""
    return (slice(start, start + size) for start in range(0, n, size))


def _scatter_product(weight, values, source, target, n_out: int, chunk: int) -> torch.Tensor:
    """out[target[e], h] += weight[e, h] · values[source[e], h], in chunks of edges."""
    out = values.new_zeros(n_out, weight.shape[1], values.shape[2])
    for part in chunks(len(weight), chunk):
        out.index_add_(0, target[part], weight[part, :, None] * values[source[part]])
    return out


def _gathered_dot(left, right, left_index, right_index, chunk: int) -> torch.Tensor:
    """out[e, h] = left[left_index[e], h] · right[right_index[e], h], in chunks of edges."""
    out = left.new_empty(len(left_index), left.shape[1])
    for part in chunks(len(left_index), chunk):
        out[part] = (left[left_index[part]] * right[right_index[part]]).sum(-1)
    return out


def _scatter_fused(weight, values, source, target, n_out: int) -> torch.Tensor:
    """`_scatter_product` in one piece: under torch.compile the product is never stored."""
    out = values.new_zeros(n_out, weight.shape[1], values.shape[2])
    return out.index_add_(0, target, weight[:, :, None] * values[source])


def _dot_fused(left, right, left_index, right_index) -> torch.Tensor:
    """`_gathered_dot` in one piece, for torch.compile."""
    return (left[left_index] * right[right_index]).sum(-1)


@dataclass(frozen=True)
class SparseKernels:
    """What every sum over pairs and images computes: eager, the products in chunks of edges
    so memory stays bounded, or compiled by torch.compile into fused loops that never store
    per-edge products (no chunks needed; faster, after a compilation of seconds per
    process)."""

    scatter: Callable  # (weight, values, source, target, n_out) -> (n_out, H, F)
    dot: Callable  # (left, right, left_index, right_index) -> (E, H)
    radial_basis: Callable  # `radial_basis`


def compiled_kernel(function: Kernel) -> Kernel:
    """`function` fused by torch.compile for inputs of any number of edges."""
    return torch.compile(function, dynamic=True)


@functools.cache
def sparse_kernels(chunk: int, compiled: bool) -> SparseKernels:
    """The kernels for `chunk` edges per eager chunk, or compiled (one set per process)."""
    if compiled:
        return SparseKernels(*map(compiled_kernel, (_scatter_fused, _dot_fused, radial_basis)))
    return SparseKernels(
        functools.partial(_scatter_product, chunk=chunk),
        functools.partial(_gathered_dot, chunk=chunk),
        radial_basis,
    )


class ScatterProduct(torch.autograd.Function):
    """`kernels.scatter` whose backward keeps only its inputs, never per-edge products.

    Autograd on the chunked loop would save every (edges × heads × features) chunk; here
    the backward recomputes them, so training memory stays at the inputs'.
    """

    @staticmethod
    def forward(ctx, weight, values, source, target, n_out, kernels):
        ctx.save_for_backward(weight, values, source, target)
        ctx.kernels = kernels
        return kernels.scatter(weight, values, source, target, n_out)

    @staticmethod
    def backward(ctx, grad):
        weight, values, source, target = ctx.saved_tensors
        kernels = ctx.kernels
        grad_weight = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_weight = kernels.dot(grad, values, target, source)
        if ctx.needs_input_grad[1]:
            grad_values = kernels.scatter(weight, grad, target, source, len(values))
        return grad_weight, grad_values, None, None, None, None


class GatheredDot(torch.autograd.Function):
    """`kernels.dot` whose backward scatters with the same kernels (see ScatterProduct)."""

    @staticmethod
    def forward(ctx, left, right, left_index, right_index, kernels):
        ctx.save_for_backward(left, right, left_index, right_index)
        ctx.kernels = kernels
        return kernels.dot(left, right, left_index, right_index)

    @staticmethod
    def backward(ctx, grad):
        left, right, left_index, right_index = ctx.saved_tensors
        kernels = ctx.kernels
        grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_left = kernels.scatter(grad, right, right_index, left_index, len(left))
        if ctx.needs_input_grad[1]:
            grad_right = kernels.scatter(grad, left, left_index, right_index, len(right))
        return grad_left, grad_right, None, None, None
