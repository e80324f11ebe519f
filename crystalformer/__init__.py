"""crystalformer-hts: high-throughput screening of inorganic crystals with Crystalformer."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from crystalformer.version import __version__

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["__version__", "load_model", "read_dataset"]


def load_model(name_or_uri: str, root=None, runtime=None):
    """A trained model ready to predict: a pretrained name (`formation_energy_per_atom`,
    `pretrained:band_gap`), a model folder or an MLflow URI, prepared on `runtime` (a
    crystalformer.model.Runtime; conf/runtime.yaml's when None). See crystalformer.predict."""
    from crystalformer.tracking import load_model as load

    return load(name_or_uri, root, runtime)


def read_dataset(folder: str | PathLike, columns: list[str] | None = None) -> pa.Table:
    """Every crystal of a dataset folder as one pyarrow Table (`.to_pandas()`,
    `polars.from_arrow`): the shards its manifest lists, so neither `manifest.json` nor a
    killed run's leftover shard is read, and a column some shards predate reads as null.
    Imported on call: `import crystalformer` stays light. See crystalformer.shards."""
    from crystalformer.shards import read_dataset as read

    return read(Path(folder), columns)
