"""crystalformer-hts: high-throughput screening of inorganic crystals with Crystalformer."""

__version__ = "0.1.0"
