"""Predict properties of crystals in files with one or more trained models.

Inputs are read, validated and featurised in-process a chunk at a time (the same readers and
rules as `featurize`), so memory stays flat; every input id ends up in the predictions or in
the rejects.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from crystalformer import config
from crystalformer.featurize import featurize_chunk
from crystalformer.model.base import PropertyModel
from crystalformer.pipeline import chunked
from crystalformer.records import RawInput, Reject
from crystalformer.shards import rows_to_table


@dataclass
class LoadedModel:
    uri: str
    model: PropertyModel
    targets: list[str]


def column_names(models: list[LoadedModel]) -> list[list[str]]:
    """One column per (model, target): the target's name, or `target[uri]` when shared."""
    counts: dict[str, int] = {}
    for loaded in models:
        for target in loaded.targets:
            counts[target] = counts.get(target, 0) + 1
    return [
        [t if counts[t] == 1 else f"{t}[{loaded.uri}]" for t in loaded.targets] for loaded in models
    ]


def predict_inputs(
    inputs: Iterable[RawInput | Reject],
    models: list[LoadedModel],
    *,
    primitive: bool = True,
    chunk_size: int = 512,
) -> tuple[pd.DataFrame, list[Reject]]:
    """Predictions (id, one column per model target) and the rejected inputs."""
    settings_config = config.featurize_config().model_copy(update={"primitive": primitive})
    widest = max((loaded.model.config for loaded in models), key=lambda c: c.r_cut)
    settings = settings_config.settings(widest)
    names = column_names(models)
    frames, rejects = [], []
    for chunk in chunked(inputs, chunk_size):
        raws = [item for item in chunk if isinstance(item, RawInput)]
        rejects += [item for item in chunk if isinstance(item, Reject)]
        result = featurize_chunk(raws, settings)
        rejects += result.rejects
        if not result.rows:
            continue
        table = rows_to_table(result.rows, [], settings)
        frame = {"id": table["id"].to_pylist()}
        for loaded, columns in zip(models, names, strict=True):
            predicted = loaded.model.predict_table(table)
            frame.update({c: predicted[:, k] for k, c in enumerate(columns)})
        frames.append(pd.DataFrame(frame))
    columns = ["id", *itertools.chain(*names)]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return predictions.astype({c: np.float64 for c in columns[1:]}), rejects
