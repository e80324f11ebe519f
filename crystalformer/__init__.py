"""crystalformer-hts: high-throughput screening of inorganic crystals with Crystalformer."""

from crystalformer.version import __version__

__all__ = ["__version__", "load_model"]


def load_model(name_or_uri: str, root=None, runtime=None):
    """A trained model ready to predict: a pretrained name (`formation_energy_per_atom`,
    `pretrained:band_gap`), a model folder or an MLflow URI, prepared on `runtime` (a
    crystalformer.model.Runtime; conf/runtime.yaml's when None). See crystalformer.predict."""
    from crystalformer.tracking import load_model as load

    return load(name_or_uri, root, runtime)
