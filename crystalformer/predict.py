"""The one prediction path: shard rows, structures and files, with one or more trained models.

Every prediction goes through `predict_table`: shard rows in batches of similar size, each
bounded by its lattice images, on a model prepared to run (`model.runtime.Runtime`).
Screening and training's evaluation call it on the shards they hold. Structures and files
are first validated and featurised in-process with `featurize`'s readers, rules and settings
(conf/featurize.yaml): `predict_structures` for a list (an invalid one raises), and
`predict_inputs` for files a chunk at a time (duplicate ids included: the first copy is
predicted, the others are rejects), so memory stays flat and every input id ends up in the
predictions or in the rejects. `tracking.load_model` gives a `LoadedModel` from any URI.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pymatgen.core import Structure

from crystalformer import conf
from crystalformer.datasets import chunked, split_duplicates
from crystalformer.featurize import FeaturizeSettings, featurize_chunk
from crystalformer.idindex import IdIndex
from crystalformer.model.base import PropertyModel
from crystalformer.records import InputRejected, RawInput, Reject
from crystalformer.screen_run import MAX_IMAGES_PER_BATCH  # light: no torch
from crystalformer.shards import (
    REJECT_COLUMNS,
    cut_by_total,
    rejects_path,
    rows_to_table,
    write_atomic,
)

SUFFIXES = (".csv", ".parquet")


def size_batches(
    n_images: np.ndarray, max_images: int, max_rows: int | None = None
) -> list[np.ndarray]:
    """Row indices sorted by image count and cut into batches of at most `max_images` images
    and `max_rows` rows (a crystal bigger than that is a batch of its own): similar sizes
    share a batch."""
    order = np.argsort(n_images, kind="stable")
    ranges = cut_by_total(n_images[order], max_images, max_rows)
    return [order[start:stop] for start, stop in ranges]


def predict_table(
    model: PropertyModel,
    table: pa.Table,
    max_images: int = MAX_IMAGES_PER_BATCH,
    max_rows: int | None = None,
) -> np.ndarray:
    """Predictions in target units for shard rows, (rows, n_targets) float64 in row order.

    `model` runs where it was prepared, in eval mode (its mode is restored afterwards); rows
    go in batches of `size_batches`, so a batch's memory is bounded whatever the crystals.
    A table whose metadata says its image lists were cut short for the model is refused.
    """
    metadata = table.schema.metadata or {}
    if b"r_cut" in metadata:
        model.check_cutoff(float(metadata[b"r_cut"]))
    out = np.empty((table.num_rows, model.config.n_targets), np.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows in size_batches(model.batch_images(table), max_images, max_rows):
            batch = model.make_batch(table.take(rows)).to(model.device)
            out[rows] = model.to_target_units(model(batch)).cpu().numpy()
    model.train(was_training)
    return out


def featurize_settings(models: Iterable[PropertyModel], primitive: bool) -> FeaturizeSettings:
    """conf/featurize.yaml's settings, with image lists long enough for the widest model."""
    settings = conf.featurize_config().model_copy(update={"primitive": primitive})
    return settings.settings(max((model.config for model in models), key=lambda c: c.r_cut))


def predict_structures(
    model: PropertyModel, structures: Sequence[Structure], *, primitive: bool = True
) -> np.ndarray:
    """Predictions in target units for pymatgen Structures, (n_structures, n_targets).

    Each structure is validated and featurised as `featurize` would (`primitive=False` keeps
    the given cell); an invalid one raises InputRejected naming its position.
    """
    raws = [RawInput(str(k), "", "structure", s.as_dict()) for k, s in enumerate(structures)]
    settings = featurize_settings([model], primitive)
    result = featurize_chunk(raws, settings)
    if result.rejects:
        first = result.rejects[0]
        raise InputRejected(first.stage, f"structure {first.id}: {first.reason}")
    return predict_table(model, rows_to_table(result.rows, [], settings))


@dataclass(frozen=True)
class LoadedModel:
    """A trained model, prepared to run, and its card: predictions in target units."""

    uri: str
    model: PropertyModel
    card: dict

    @property
    def targets(self) -> list[str]:
        return list(self.card["targets"])

    @property
    def units(self) -> dict[str, str | None]:
        return dict(self.card.get("units", {}))

    def predict(
        self, structures: Sequence[Structure | str | Path], *, primitive: bool = True
    ) -> np.ndarray:
        """(n, n_targets) for pymatgen Structures or structure files (CIF, POSCAR, JSON);
        an invalid one raises InputRejected naming its position."""
        loaded = [s if isinstance(s, Structure) else Structure.from_file(s) for s in structures]
        return predict_structures(self.model, loaded, primitive=primitive)


def column_names(models: list[LoadedModel]) -> list[list[str]]:
    """One column per (model, target): the target's name, or `target[uri]` when shared."""
    counts: dict[str, int] = {}
    for loaded in models:
        for target in loaded.targets:
            counts[target] = counts.get(target, 0) + 1
    return [
        [t if counts[t] == 1 else f"{t}[{loaded.uri}]" for t in loaded.targets] for loaded in models
    ]


def column_units(models: list[LoadedModel]) -> dict[str, str | None]:
    """Each prediction column's unit, from its model's card (None when the card has none)."""
    return {
        column: loaded.units.get(target)
        for loaded, columns in zip(models, column_names(models), strict=True)
        for target, column in zip(loaded.targets, columns, strict=True)
    }


def predict_inputs(
    inputs: Iterable[RawInput | Reject],
    models: list[LoadedModel],
    *,
    primitive: bool = True,
    chunk_size: int = 512,
) -> tuple[pd.DataFrame, list[Reject]]:
    """Predictions (id, one column per model target) and the rejected inputs."""
    settings = featurize_settings((loaded.model for loaded in models), primitive)
    names = column_names(models)
    frames, rejects = [], []
    with (
        tempfile.TemporaryDirectory(prefix="crystalformer-predict-") as scratch,
        contextlib.closing(IdIndex(Path(scratch))) as ids,  # ids read so far, on disk
    ):
        for chunk in chunked(inputs, chunk_size):
            raws, early = split_duplicates(chunk, ids)
            result = featurize_chunk(raws, settings)
            rejects += early + result.rejects
            if not result.rows:
                continue
            table = rows_to_table(result.rows, [], settings)
            frame = {"id": table["id"].to_pylist()}
            for loaded, columns in zip(models, names, strict=True):
                predicted = predict_table(loaded.model, table)
                frame.update({c: predicted[:, k] for k, c in enumerate(columns)})
            frames.append(pd.DataFrame(frame))
    columns = ["id", *itertools.chain(*names)]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return predictions.astype({c: np.float64 for c in columns[1:]}), rejects


def units_path(out: Path) -> Path:
    """The sidecar that gives each prediction column's unit: the columns keep plain names."""
    return out.with_name(f"{out.stem}.units.json")


def check_output(out: Path) -> None:
    """Refuse an output that could not be written before predicting, not after: a .csv or
    .parquet file, no folder, in a folder that takes new files (made if missing)."""
    if out.suffix not in SUFFIXES:
        raise ValueError(f"--out {out}: must end in .csv or .parquet")
    for path in (out, rejects_path(out), units_path(out)):
        if path.is_dir():
            raise IsADirectoryError(f"--out {out}: {path} is a folder; name a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):  # permissions, read-only mounts, root too
            pass
    except OSError as error:
        raise OSError(f"--out {out}: cannot write in {out.parent} ({error.strerror})") from None


def write_predictions(
    predictions: pd.DataFrame,
    rejects: list[Reject],
    out: Path,
    units: dict[str, str | None],
) -> Path:
    """The predictions to `out`, the rejects and the columns' `units` beside it, each
    atomically; the rejects' path."""
    if out.suffix == ".csv":
        write_atomic(out, lambda tmp: predictions.to_csv(tmp, index=False))
    else:
        write_atomic(out, lambda tmp: predictions.to_parquet(tmp, index=False))
    frame = pd.DataFrame([r.__dict__ for r in rejects], columns=REJECT_COLUMNS)
    write_atomic(rejects_path(out), lambda tmp: frame.to_csv(tmp, index=False))
    text = json.dumps(units, indent=1)
    write_atomic(units_path(out), lambda tmp: Path(tmp).write_text(text))
    return rejects_path(out)
