"""The Crystalformer encoder and its batches (no Prefect, MLflow or data-source imports)."""

from crystalformer.model.batch import CrystalBatch, batch_from_table
from crystalformer.model.crystalformer import Crystalformer, CrystalformerConfig

__all__ = ["CrystalBatch", "Crystalformer", "CrystalformerConfig", "batch_from_table"]
