"""What every encoder shares: target normalisation, the MLP head, the cutoff guard.

An encoder subclasses `PropertyModel` and supplies `encode(batch)` (one vector per crystal)
and, when it reads more than `batch_from_table` gives, `make_batch(table)`. The trainer and
the one prediction path (crystalformer.predict) see only this interface, so they run any
encoder unchanged; a `model.runtime.Runtime` prepares it to run (device, kernels).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from crystalformer.model.batch import batch_from_table, batch_images
from crystalformer.model.runtime import Runtime


class PropertyModel(nn.Module):
    """encode → MLP head (standardised targets); `to_target_units` undoes the standardising."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head = nn.Sequential(
            nn.Linear(config.dim, config.dim),
            nn.ReLU(),
            nn.Linear(config.dim, config.n_targets),
        )
        # target normalisation: predictions come out in target units once it is set
        self.register_buffer("target_mean", torch.zeros(config.n_targets))
        self.register_buffer("target_std", torch.ones(config.n_targets))
        default = Runtime()  # eager kernels until a Runtime prepares the model
        self.select_kernels(default.image_chunk, default.compiled)

    def select_kernels(self, chunk: int, compiled: bool) -> None:
        """Choose the sparse kernels forward passes use: eager in chunks of `chunk` edges, or
        torch.compile'd (`Runtime.prepare` calls this once). Here: none to choose."""

    @property
    def device(self) -> torch.device:
        return self.target_mean.device

    def encode(self, batch) -> torch.Tensor:
        """One vector per crystal, (C, dim)."""
        raise NotImplementedError

    def make_batch(self, table: pa.Table):
        """The batch this encoder reads, from shard rows."""
        return batch_from_table(table)

    def batch_images(self, table: pa.Table) -> np.ndarray:
        """Per row, the images its batch holds, which bounds a batch's memory (prediction
        sizes batches by it); here every stored image."""
        return batch_images(table, image_vectors=True)

    def forward(self, batch) -> torch.Tensor:
        """Standardised predictions, (C, n_targets): what the loss sees."""
        return self.head(self.encode(batch))

    def to_target_units(self, standardised: torch.Tensor) -> torch.Tensor:
        return standardised * self.target_std + self.target_mean

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_cutoff(self, r_cut: float) -> None:
        """Refuse image lists cut shorter than the model's r_cut: they would drop images."""
        if r_cut < self.config.r_cut:
            raise ValueError(
                f"image lists were cut at {r_cut:.4g} Å but this model needs "
                f"{self.config.r_cut:.4g} Å (3.5·σ_max); re-featurise with a larger r_cut"
            )
