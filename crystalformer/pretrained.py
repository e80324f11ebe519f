"""Trained models shipped in the repository under models/<property>/.

Each is a model folder (safetensors weights, `model.json` card, `split.parquet`) trained
on the bundled snapshots (`tracking.ship_run` writes them). Anything that takes a model URI
also takes `pretrained:<property>`, and `crystalformer.load_model` the bare name.
"""

from __future__ import annotations

from pathlib import Path

from crystalformer.conf import PROJECT_ROOT

MODELS_DIR = PROJECT_ROOT / "models"
SCHEME = "pretrained:"
CARD = "model.json"


def pretrained_names() -> list[str]:
    """The properties with a shipped model."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / CARD).is_file())


def pretrained_folder(name: str) -> Path:
    """The shipped model folder of `name` (a property, with or without `pretrained:`)."""
    name = name.removeprefix(SCHEME)
    if name not in pretrained_names():
        shipped = ", ".join(pretrained_names()) or "none"
        raise FileNotFoundError(f"no pretrained model {name!r} (shipped: {shipped})")
    return MODELS_DIR / name
