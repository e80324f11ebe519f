"""The library's version, written into every shard, model card and screening run.

A module of its own so that those writers need not import the package root, which imports
the prediction code for `crystalformer.load_model`.
"""

__version__ = "0.1.0"
