"""What every encoder shares: target normalisation, the MLP head, prediction in target units.

An encoder subclasses `PropertyModel` and supplies `encode(batch)` (one vector per crystal)
and, when it reads more than `batch_from_table` gives, `make_batch(table)`. Trainer,
`predict` and `screen` see only this interface, so they run any encoder unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from pymatgen.core import Structure
from torch import nn

from crystalformer.featurize import FeaturizeSettings, featurize
from crystalformer.model.batch import batch_from_table, batch_images
from crystalformer.records import InputRejected
from crystalformer.shards import rows_to_table
from crystalformer.structures import crystal_from_structure, validate

CUTOFF_MARGIN = 0.05  # Å added to the model's r_cut when featurising in-process (featurize.yaml)


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

    def encode(self, batch) -> torch.Tensor:
        """One vector per crystal, (C, dim)."""
        raise NotImplementedError

    def make_batch(self, table: pa.Table):
        """The batch this encoder reads, from shard rows."""
        return batch_from_table(table)

    def batch_images(self, table: pa.Table) -> np.ndarray:
        """Per row, the images its batch holds, which bounds a batch's memory (screening
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

    def predict_table(self, table: pa.Table, batch_size: int = 128) -> np.ndarray:
        """Predictions in target units for shard rows, (rows, n_targets)."""
        metadata = table.schema.metadata or {}
        if b"r_cut" in metadata:
            self.check_cutoff(float(metadata[b"r_cut"]))
        device = resolve_device(self.config)
        was_training = self.training
        self.to(device).eval()
        outputs = []
        with torch.no_grad():
            for start in range(0, table.num_rows, batch_size):
                batch = self.make_batch(table.slice(start, batch_size)).to(device)
                outputs.append(self.to_target_units(self(batch)).cpu())
        self.train(was_training)
        if not outputs:
            return np.zeros((0, self.config.n_targets), np.float32)
        return torch.cat(outputs).numpy()

    def predict(
        self, structures: Sequence[Structure], *, primitive: bool = True, batch_size: int = 128
    ) -> np.ndarray:
        """Predictions in target units for pymatgen Structures, (n_structures, n_targets).

        Each structure is validated and featurised in-process (`primitive=False` keeps the
        given cell); an invalid one raises InputRejected naming its position.
        """
        settings = FeaturizeSettings(self.config.r_cut + CUTOFF_MARGIN, primitive=primitive)
        rows = []
        for index, structure in enumerate(structures):
            crystal = crystal_from_structure(structure, id=str(index))
            try:
                validate(crystal)
                rows.append(featurize(crystal, settings))
            except InputRejected as error:
                raise InputRejected(error.stage, f"structure {index}: {error.reason}") from None
        return self.predict_table(rows_to_table(rows, [], settings), batch_size)


def resolve_device(config) -> torch.device:
    """The configured device ("auto": CUDA when there is one); TF32 only when asked for."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
    return device
