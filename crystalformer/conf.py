"""YAML configuration in conf/, validated on load with errors that name the bad key.

conf/sources.yaml is read by `crystalformer.sources.refresh`: each registered source brings
the model of its own section.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from crystalformer.featurize import MAX_IMAGES, FeaturizeSettings
from crystalformer.model.config import (
    ENCODER_CONFIGS,
    RUNTIME_KEYS,
    CrystalformerConfig,
    SiteNetConfig,
)
from crystalformer.model.runtime import Runtime
from crystalformer.recipe import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(os.environ.get("CRYSTALFORMER_CONF", PROJECT_ROOT / "conf"))
SNAPSHOT_DIR = PROJECT_ROOT / "data" / "snapshots"


class ConfigError(ValueError):
    """A config file is missing, unreadable, or has a bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- featurisation ------------------------------------------------------------------------------


class FeaturizeConfig(Strict):
    margin: float = Field(0.05, ge=0)
    r_cut: float | None = Field(None, gt=0)
    primitive: bool = True
    symprec: float = Field(0.01, gt=0)
    min_distance: float = Field(0.5, ge=0)
    shard_size: int = Field(2000, ge=1)
    max_images: int = Field(MAX_IMAGES, ge=1)

    def settings(self, model: CrystalformerConfig) -> FeaturizeSettings:
        """Image lists long enough for `model`: its 3.5·σ_max plus the margin."""
        r_cut = self.r_cut if self.r_cut is not None else model.r_cut + self.margin
        return FeaturizeSettings(
            round(r_cut, 6), self.primitive, self.symprec, self.min_distance, self.max_images
        )


# --- datasets -----------------------------------------------------------------------------------


class TargetConfig(Strict):
    column: str
    unit: str | None = None
    transform: Literal["log10"] | None = None


class DatasetConfig(Strict):
    description: str = ""
    source: str
    files: list[str] = Field(min_length=1)
    id_column: str
    structure_column: Literal["cif", "poscar", "structure", "arrays"]
    split_column: str | None = None
    split_values: dict[str, str | None] = {}
    targets: dict[str, TargetConfig] = {}

    def units(self) -> dict[str, str | None]:
        return {name: target.unit for name, target in self.targets.items()}


class DatasetsConfig(Strict):
    datasets: dict[str, DatasetConfig]


# --- training -------------------------------------------------------------------------------


class PropertyConfig(Strict):
    dataset: str
    preset: str = "mp"


class TrainAllConfig(Strict):
    """conf/train-all.yaml: the properties `train-all` trains, one model each."""

    properties: dict[str, PropertyConfig] = Field(min_length=1)


# --- loading ------------------------------------------------------------------------------------

T = TypeVar("T")


def load_yaml(path: Path, model: type[T]) -> T:
    """Read and validate one YAML file into a pydantic model or a dataclass.

    A ConfigError names the file and every bad key (unknown keys included).
    """
    path = Path(path)
    data = _read_yaml(path)
    if dataclasses.is_dataclass(model) and isinstance(data, dict):
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(model)})
        if unknown:
            raise ConfigError(f"{path}: {', '.join(unknown)}: unknown key")
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<top>'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def model_config(
    conf_dir: Path = CONF_DIR, name: str | Path = "crystalformer"
) -> CrystalformerConfig | SiteNetConfig:
    """conf/model/<name>.yaml, or the YAML file `name` is a path to, as the config of the
    encoder its `encoder` key names (crystalformer when it names none)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(conf_dir) / "model" / f"{name}.yaml"
    data = _read_yaml(path)
    encoder = data.get("encoder", "crystalformer") if isinstance(data, dict) else None
    if encoder not in ENCODER_CONFIGS:
        known = ", ".join(ENCODER_CONFIGS)
        raise ConfigError(f"{path}: encoder: {encoder!r} is not one of {known}")
    moved = sorted(RUNTIME_KEYS & set(data))
    if moved:
        raise ConfigError(
            f"{path}: {', '.join(moved)}: how a model runs, not what it is; set it in "
            "conf/runtime.yaml (compile_kernels is its `compiled`) or with --device"
        )
    return load_yaml(path, ENCODER_CONFIGS[encoder])


def runtime_config(conf_dir: Path = CONF_DIR) -> Runtime:
    """conf/runtime.yaml: how models train and predict on this machine (device, kernels)."""
    return load_yaml(Path(conf_dir) / "runtime.yaml", Runtime)


def featurize_config(conf_dir: Path = CONF_DIR) -> FeaturizeConfig:
    return load_yaml(Path(conf_dir) / "featurize.yaml", FeaturizeConfig)


def default_settings(conf_dir: Path = CONF_DIR) -> FeaturizeSettings:
    return featurize_config(conf_dir).settings(model_config(conf_dir))


def datasets_config(conf_dir: Path = CONF_DIR) -> DatasetsConfig:
    return load_yaml(Path(conf_dir) / "datasets.yaml", DatasetsConfig)


def train_config(preset: str | Path = "mp", conf_dir: Path = CONF_DIR) -> TrainConfig:
    """A preset name from conf/train/ (mp, jarvis, jarvis_mbj, ...) or a YAML file's path."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(conf_dir) / "train" / f"{preset}.yaml"
    return load_yaml(path, TrainConfig)


def train_all_config(conf_dir: Path = CONF_DIR) -> TrainAllConfig:
    return load_yaml(Path(conf_dir) / "train-all.yaml", TrainAllConfig)


def data_root() -> Path:
    """Where runtime outputs go: $CRYSTALFORMER_DATA_ROOT, else ./var."""
    return Path(os.environ.get("CRYSTALFORMER_DATA_ROOT", "var")).resolve()
