"""The Crystalformer encoder and its batches (no Prefect, MLflow or data-source imports).

Torch is imported only when a model or batch is first used, so reading the model config
(e.g. for featurisation's cutoff) stays light.
"""

from crystalformer.model.config import CrystalformerConfig

__all__ = ["CrystalBatch", "Crystalformer", "CrystalformerConfig", "batch_from_table"]


def __getattr__(name: str):
    if name in ("Crystalformer",):
        from crystalformer.model import crystalformer

        return getattr(crystalformer, name)
    if name in ("CrystalBatch", "batch_from_table"):
        from crystalformer.model import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'crystalformer.model' has no attribute {name!r}")
