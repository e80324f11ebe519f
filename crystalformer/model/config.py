"""Encoder configurations: plain dataclasses (no torch import), loadable from conf/model/*.yaml.

The architecture only: how a model runs (device, kernels) is a `model.runtime.Runtime`, given
when it is prepared. The `encoder` field names the architecture; `ENCODER_CONFIGS` maps it to
its dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class CrystalformerConfig:
    """Defaults are the paper's (853,517 parameters with one target)."""

    encoder: str = "crystalformer"
    n_layers: int = 4
    dim: int = 128
    n_heads: int = 8
    ffn_dim: int = 512
    n_rbf: int = 64  # K radial basis functions in β; 0 gives the simplified model (no β)
    rbf_max: float = 14.0  # Å: centres μ_k = k·rbf_max/K, width rbf_max/K
    r0: float = 1.4  # Å
    b: float = 0.5
    cutoff_sigmas: float = 3.5
    n_targets: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def sigma_max(self) -> float:
        return self.r0 / math.sqrt(self.b)

    @property
    def r_cut(self) -> float:
        """Images farther than this weigh less than e^-6.1 of the nearest, for every σ."""
        return self.cutoff_sigmas * self.sigma_max


@dataclass
class CrystalFramerConfig(CrystalformerConfig):
    """CrystalFramer (Ito et al., ICLR 2025): Crystalformer plus angles in dynamic frames
    (docs/model.md §7). Defaults are the paper's: 951,821 parameters with one target."""

    encoder: str = "crystalframer"
    n_angle_rbf: int = 64  # Gaussians on cos ∈ [-1, 1] per frame axis; 0: exactly Crystalformer


@dataclass
class SiteNetConfig:
    """Site-Net (Moran et al., arXiv 2209.08190): global self-attention over the sites of a
    real-space supercell, with pairwise interaction features; no periodic sum."""

    encoder: str = "sitenet"
    max_supercell_atoms: int = 100  # the unit cell is repeated while it stays within this
    n_layers: int = 3
    dim: int = 128  # site features
    n_heads: int = 8  # each head weighs one shared value of dim // n_heads per pair
    interaction_dim: int = 64  # pair (interaction) features, all heads together
    attention_hidden: int = 64  # hidden width of the MLP that gives the attention logits
    n_rbf: int = 64  # Gaussians of the pair distance in the interaction features
    rbf_max: float = 12.0  # Å: centres k·rbf_max/n_rbf, width rbf_max/n_rbf
    n_targets: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def r_cut(self) -> float:
        """Site-Net reads positions and lattice, not image lists: any shard serves."""
        return 0.0


ENCODER_CONFIGS: dict[str, type] = {
    "crystalformer": CrystalformerConfig,
    "crystalframer": CrystalFramerConfig,
    "sitenet": SiteNetConfig,
}

# Run-time settings that configs held before they moved to model.runtime.Runtime: cards of
# models saved then (the shipped ones, MLflow artifacts) still carry them.
RUNTIME_KEYS = frozenset({"device", "allow_tf32", "image_chunk", "compile_kernels"})


def config_from_card(encoder: str, fields: dict[str, Any]):
    """The architecture config a model card saved, for `encoder`; the run-time settings an
    older card carries are dropped (the runtime is chosen when the model is prepared)."""
    architecture = {k: v for k, v in fields.items() if k not in RUNTIME_KEYS}
    return ENCODER_CONFIGS[encoder](**architecture)
