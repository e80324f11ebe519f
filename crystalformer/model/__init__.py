"""The encoders (Crystalformer, CrystalFramer, Site-Net), their batches from shard rows, and
the runtime that prepares them to run (no Prefect, MLflow, pymatgen or data-source imports).

Torch is imported only when a model or batch is first used, so reading a model config
(e.g. for featurisation's cutoff) or a runtime stays light.
"""

from crystalformer.model.config import (
    ENCODER_CONFIGS,
    CrystalformerConfig,
    CrystalFramerConfig,
    SiteNetConfig,
)
from crystalformer.model.runtime import Runtime

__all__ = [
    "ENCODER_CONFIGS",
    "CrystalBatch",
    "CrystalFramer",
    "CrystalFramerConfig",
    "Crystalformer",
    "CrystalformerConfig",
    "Runtime",
    "SiteNet",
    "SiteNetConfig",
    "batch_from_table",
    "build_model",
]

_LAZY = {
    "Crystalformer": "crystalformer.model.crystalformer",
    "CrystalFramer": "crystalformer.model.crystalframer",
    "SiteNet": "crystalformer.model.sitenet",
    "CrystalBatch": "crystalformer.model.batch",
    "batch_from_table": "crystalformer.model.batch",
}
_ENCODERS = {
    "crystalformer": "Crystalformer",
    "crystalframer": "CrystalFramer",
    "sitenet": "SiteNet",
}


def build_model(config):
    """A freshly initialised model of the encoder that `config.encoder` names."""
    return __getattr__(_ENCODERS[config.encoder])(config)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crystalformer.model' has no attribute {name!r}")
