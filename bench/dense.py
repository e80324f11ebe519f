"""The dense formulation bench/model.py compares ours with: our weights, every image in a box.

It evaluates a Crystalformer's weights the way the reference implementation does without its
CUDA kernels: every crystal's N² (i, j) pairs, concatenated over the batch with no padding
(as the reference's `edges` are), times a fixed box of 125 images n ∈ [−2, 2]³ per pair, with
the (pair, image) distances, the (pair, head, image) logits and the (pair, image, K) radial
basis materialised; α is a log-sum-exp over the 125 images and β the softmax-weighted basis
(a batched matmul) times W_h. The attention over j, the FFN and the pooling are the model's
own code, so a comparison isolates the image sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from crystalformer.model import Crystalformer, batch_from_table
from crystalformer.model.batch import TensorBatch
from crystalformer.model.layers import segment_softmax

BOX = 2  # the dense formulation's images: n ∈ [−BOX, BOX]³, 125 per pair


@dataclass
class DenseBatch(TensorBatch):
    """All N² (i, j) pairs of each crystal, concatenated; the cells to place 125 images per pair."""

    n_crystals: int
    species_atom: torch.Tensor  # (S,) as in CrystalBatch
    species_z: torch.Tensor  # (S,)
    species_occupancy: torch.Tensor  # (S,)
    atom_crystal: torch.Tensor  # (A,)
    positions: torch.Tensor  # (A, 3) Cartesian, Å
    lattice: torch.Tensor  # (C, 3, 3) rows = lattice vectors
    shifts: torch.Tensor  # (R, 3) the image box n ∈ [−BOX, BOX]³
    edge_i: torch.Tensor  # (E,) attending atom (global index), E = Σ N²
    edge_j: torch.Tensor  # (E,) attended atom
    edge_crystal: torch.Tensor  # (E,)
    # correctness check only: drop images beyond r_cut and round |r| to float32, as ours store it
    r_cut: float | None = None
    stored_precision: bool = False


def dense_batch_from_table(
    table: pa.Table,
    dtype: torch.dtype = torch.float32,
    r_cut: float | None = None,
    stored_precision: bool = False,
) -> DenseBatch:
    """A dense batch from shard rows: the stored cell's positions and lattice, no image lists."""
    # species and atoms as ours, every atom (the dense formulation knows no equivalent
    # atoms); its images are dropped
    atoms = batch_from_table(table.drop_columns(["equivalent_atom"]), dtype)
    n = table["n_atoms"].to_numpy().astype(np.int64)
    atom_offsets = np.r_[0, np.cumsum(n)[:-1]]
    edge_crystal = np.repeat(np.arange(len(n)), n**2)
    edge_offsets = np.r_[0, np.cumsum(n**2)]
    i, j = np.divmod(np.arange(len(edge_crystal)) - edge_offsets[edge_crystal], n[edge_crystal])
    box = np.arange(-BOX, BOX + 1)
    shifts = np.stack(np.meshgrid(box, box, box, indexing="ij"), -1).reshape(-1, 3)

    def values(column: str, shape: tuple[int, ...]) -> torch.Tensor:
        flat = pc.list_flatten(table[column]).to_numpy()
        return torch.tensor(flat.reshape(shape), dtype=dtype)

    return DenseBatch(
        n_crystals=len(n),
        species_atom=atoms.species_atom,
        species_z=atoms.species_z,
        species_occupancy=atoms.species_occupancy,
        atom_crystal=atoms.atom_crystal,
        positions=values("positions", (-1, 3)),
        lattice=values("lattice", (-1, 3, 3)),
        shifts=torch.from_numpy(shifts).to(dtype),
        edge_i=torch.from_numpy(atom_offsets[edge_crystal] + i),
        edge_j=torch.from_numpy(atom_offsets[edge_crystal] + j),
        edge_crystal=torch.from_numpy(edge_crystal),
        r_cut=r_cut,
        stored_precision=stored_precision,
    )


class DenseCrystalformer(nn.Module):
    """Our Crystalformer's weights, evaluated on all N² pairs × 125 images of every crystal."""

    def __init__(self, model: Crystalformer):
        super().__init__()
        self.model = model  # shared: the same parameters and buffers

    def pair_image_dist_sq(self, batch: DenseBatch) -> torch.Tensor:
        """|p_j + nL − p_i|² for every pair and image, (E, R)."""
        offsets = batch.shifts @ batch.lattice  # (C, R, 3)
        delta = batch.positions[batch.edge_j] - batch.positions[batch.edge_i]  # (E, 3)
        r = delta[:, None, :] + offsets[batch.edge_crystal]  # (E, R, 3)
        dist_sq = r.square().sum(-1)
        if batch.stored_precision:  # shards store |r| as float32
            dist_sq = dist_sq.sqrt().float().to(dist_sq.dtype).square()
        return dist_sq

    def radial_basis(self, dist_sq: torch.Tensor) -> torch.Tensor:
        """b(|r|) per pair and image, (E, R, K), built in place as the reference builds it."""
        rbf = self.model.rbf
        basis = dist_sq.sqrt()[..., None] - rbf.centres
        return basis.div_(rbf.width).square_().mul_(-0.5).exp_()

    def encode(self, batch: DenseBatch) -> torch.Tensor:
        """One vector per crystal, (C, dim), as Crystalformer.encode computes it."""
        model = self.model
        atoms = model.embed.weight.T[batch.species_z - 1] * batch.species_occupancy[:, None]
        x = atoms.new_zeros(len(batch.atom_crystal), model.config.dim)
        x = x.index_add(0, batch.species_atom, atoms)
        dist_sq = self.pair_image_dist_sq(batch)
        basis = self.radial_basis(dist_sq) if model.rbf is not None else None
        outside = dist_sq > batch.r_cut**2 if batch.r_cut is not None else None
        for block in model.blocks:
            x = x + dense_attention(block.attention, x, batch, dist_sq, basis, outside)
            x = x + block.ffn(x)
        counts = torch.bincount(batch.atom_crystal, minlength=batch.n_crystals).clamp_min(1)
        pooled = x.new_zeros(batch.n_crystals, x.shape[1]).index_add(0, batch.atom_crystal, x)
        return pooled / counts[:, None].to(x.dtype)

    def forward(self, batch: DenseBatch) -> torch.Tensor:
        return self.model.head(self.encode(batch))


def dense_attention(
    attention: nn.Module,
    x: torch.Tensor,
    batch: DenseBatch,
    dist_sq: torch.Tensor,
    basis: torch.Tensor | None,
    outside: torch.Tensor | None,
) -> torch.Tensor:
    """A PeriodicAttention's weights with α and β summed over the 125 images of every pair."""
    h, d = attention.config.n_heads, attention.config.head_dim
    q = attention.query(x).view(-1, h, d)
    k = attention.key(x).view(-1, h, d)
    v = attention.value(x).view(-1, h, d)
    sigma = attention.sigma(q)  # (A, H), the same frozen normalisation as ours
    scale = (0.5 / sigma.square())[batch.edge_i]  # (E, H)
    logits = -dist_sq[:, None, :] * scale[:, :, None]  # (E, H, R)
    if outside is not None:
        logits = logits.masked_fill(outside[:, None, :], -torch.inf)
    alpha = torch.logsumexp(logits, dim=-1)  # (E, H)
    scores = (q[batch.edge_i] * k[batch.edge_j]).sum(-1) / math.sqrt(d) + alpha
    weights = segment_softmax(scores, batch.edge_i, len(x))  # over j, for each i
    message = v[batch.edge_j]  # (E, H, D)
    if basis is not None:
        w = torch.softmax(logits, dim=-1)  # (E, H, R)
        if outside is not None:  # a pair with every image beyond r_cut: no term, as in ours
            w = w.nan_to_num(0.0)
        weighted = torch.bmm(w, basis)  # (E, H, R) @ (E, R, K) -> (E, H, K)
        message = message + torch.einsum("ehk,hdk->ehd", weighted, attention.edge)
    y = torch.zeros_like(q).index_add_(0, batch.edge_i, weights[:, :, None] * message)
    return attention.out(y.reshape(-1, h * d))
