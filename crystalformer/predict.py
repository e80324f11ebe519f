"""Predict properties of crystals in files with one or more trained models.

Inputs are read, validated and featurised in-process a chunk at a time (the same readers and
rules as `featurize`, duplicate ids included: the first copy is predicted, the others are
rejects), so memory stays flat; every input id ends up in the predictions or in the rejects.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from crystalformer import config
from crystalformer.featurize import featurize_chunk
from crystalformer.idindex import IdIndex
from crystalformer.model.base import PropertyModel
from crystalformer.pipeline import chunked, split_duplicates
from crystalformer.pretrained import SCHEME, pretrained_names
from crystalformer.records import RawInput, Reject
from crystalformer.shards import REJECT_COLUMNS, rows_to_table, write_atomic

SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class LoadedModel:
    """A trained model and its card, from any URI: predictions in target units."""

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
        return self.model.predict(loaded, primitive=primitive)


def load_model(name_or_uri: str, root: Path | None = None) -> LoadedModel:
    """A shipped model's name (`formation_energy_per_atom`, or `pretrained:…`), a model
    folder, or an MLflow URI (`models:/crystalformer-band_gap@champion`, `runs:/ID`)."""
    from crystalformer.tracking import download_model
    from crystalformer.train import load_model as load_folder

    uri = name_or_uri
    if name_or_uri in pretrained_names():
        uri = SCHEME + name_or_uri
    model, card = load_folder(download_model(uri, root))
    return LoadedModel(name_or_uri, model.eval(), card)


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
                predicted = loaded.model.predict_table(table)
                frame.update({c: predicted[:, k] for k, c in enumerate(columns)})
            frames.append(pd.DataFrame(frame))
    columns = ["id", *itertools.chain(*names)]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return predictions.astype({c: np.float64 for c in columns[1:]}), rejects


def rejects_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.rejects.csv")


def check_output(out: Path) -> None:
    """Refuse an output that could not be written before predicting, not after: a .csv or
    .parquet file, no folder, in a folder that takes new files (made if missing)."""
    if out.suffix not in SUFFIXES:
        raise ValueError(f"--out {out}: must end in .csv or .parquet")
    for path in (out, rejects_path(out)):
        if path.is_dir():
            raise IsADirectoryError(f"--out {out}: {path} is a folder; name a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):  # permissions, read-only mounts, root too
            pass
    except OSError as error:
        raise OSError(f"--out {out}: cannot write in {out.parent} ({error.strerror})") from None


def write_predictions(predictions: pd.DataFrame, rejects: list[Reject], out: Path) -> Path:
    """The predictions to `out` and the rejects beside it, each atomically; the rejects' path."""
    if out.suffix == ".csv":
        write_atomic(out, lambda tmp: predictions.to_csv(tmp, index=False))
    else:
        write_atomic(out, lambda tmp: predictions.to_parquet(tmp, index=False))
    frame = pd.DataFrame([r.__dict__ for r in rejects], columns=REJECT_COLUMNS)
    write_atomic(rejects_path(out), lambda tmp: frame.to_csv(tmp, index=False))
    return rejects_path(out)
