"""Models shipped in models/: what a shipped folder holds, how any model is loaded by name or
URI, and how shipped models become champions that a smoke run never displaces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import structure_of

from crystalformer import load_model, pretrained
from crystalformer.conf import datasets_config
from crystalformer.datasets import featurize_inputs
from crystalformer.model.config import RUNTIME_KEYS
from crystalformer.predict import predict_structures
from crystalformer.tracking import (
    CHAMPION,
    download_model,
    register_pretrained,
    registered_name,
    ship_run,
    train_property,
    use_tracking,
)
from crystalformer.train import load_model as load_folder

CARD_KEYS = {
    "architecture", "config", "targets", "units", "target", "unit", "dataset",
    "dataset_version", "dataset_shards_sha256", "preset", "recipe", "epochs",
    "training_seconds", "machine", "commit", "val_mae", "test_mae", "n_train", "n_val",
}  # fmt: skip


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, biternary_raws, settings) -> dict:
    """A one-epoch band-gap model trained on 80 MP-20 crystals and shipped to a temp models/."""
    root = tmp_path_factory.mktemp("root")
    folder = root / "datasets" / "biternary"
    units = datasets_config().datasets["mp20_biternary"].units()
    featurize_inputs(biternary_raws[:80], folder, settings, units, progress=False)
    outcome = train_property(str(folder), "band_gap", overrides={"epochs": 1}, root=root)
    dest = tmp_path_factory.mktemp("models")
    ship_run(outcome.run_id, "band_gap", "mp", root, dest=dest)
    return {"root": root, "dest": dest, "run": outcome.run_id, "folder": folder}


@pytest.fixture
def models_dir(shipped, monkeypatch) -> Path:
    monkeypatch.setattr(pretrained, "MODELS_DIR", shipped["dest"])
    return shipped["dest"]


def test_shipped_folder_holds_weights_card_and_split(shipped):
    folder = shipped["dest"] / "band_gap"
    assert {p.name for p in folder.iterdir()} == {
        "model.json",
        "model.safetensors",
        "split.parquet",
    }
    card = json.loads((folder / "model.json").read_text())
    assert set(card) >= CARD_KEYS
    assert card["target"] == "band_gap" and card["unit"] == "eV" and card["epochs"] == 1
    assert card["n_train"] == 64 and card["val_mae"] > 0 and card["training_seconds"] > 0


def test_a_model_loads_by_name_uri_and_folder_and_predicts_the_same(
    models_dir, shipped, structures, tmp_path
):
    cif = tmp_path / "first.cif"
    structures[0].to(filename=str(cif))
    expected, _ = load_folder(models_dir / "band_gap")
    reference = predict_structures(expected, [structures[0], *structures])
    for name in ("band_gap", "pretrained:band_gap", str(models_dir / "band_gap")):
        loaded = load_model(name, shipped["root"])
        assert loaded.targets == ["band_gap"] and loaded.units == {"band_gap": "eV"}
        np.testing.assert_allclose(loaded.predict([cif, *structures]), reference, rtol=1e-6)
    from_run = load_model(f"runs:/{shipped['run']}", shipped["root"])
    np.testing.assert_allclose(from_run.predict(structures), reference[1:], rtol=1e-6)
    assert download_model("pretrained:band_gap") == models_dir / "band_gap"
    with pytest.raises(FileNotFoundError, match="shipped: band_gap"):
        download_model("pretrained:density")


def test_shipped_models_are_champions_that_a_smoke_run_does_not_displace(models_dir, shipped):
    root = shipped["root"] / "fresh"
    client = use_tracking(root)
    (first,) = register_pretrained(root)
    assert "is the new champion" in first
    assert register_pretrained(root) == []  # the same weights are registered once
    smoke = train_property(
        str(shipped["folder"]), "band_gap", overrides={"epochs": 1, "max_crystals": 30}, root=root
    )
    assert not smoke.champion and "subsample" in smoke.message
    champion = client.get_model_version_by_alias(registered_name("band_gap"), CHAMPION)
    assert champion.tags["pretrained"] == "band_gap"
    champion_folder = download_model(f"models:/{registered_name('band_gap')}@{CHAMPION}", root)
    assert (champion_folder / "model.safetensors").read_bytes() == (
        models_dir / "band_gap" / "model.safetensors"
    ).read_bytes()


# Predictions of the shipped models when they were shipped, on mp2018 validation crystals:
# a change of code that moves them changes what users get from the same weights.
PINNED: dict[str, dict[str, float]] = {
    "band_gap": {
        "mp-1001024": 1.528787,
        "mp-1002115": -0.003468,
        "mp-1002122": -0.001128,
    },
    "formation_energy_per_atom": {
        "mp-1001024": -2.293831,
        "mp-1002115": -0.880753,
        "mp-1002122": -0.913301,
    },
    "e_above_hull": {
        "mp-1001024": 0.001184,
        "mp-1002115": 0.002564,
        "mp-1002122": -0.000023,
    },
    "log10_bulk_modulus_vrh": {
        "mp-1001024": 1.804339,
        "mp-1002115": 1.480880,
        "mp-1002122": 2.300073,
    },
    "log10_shear_modulus_vrh": {
        "mp-1001024": 1.374982,
        "mp-1002115": 0.788936,
        "mp-1002122": 1.845163,
    },
}


def test_shipped_models_are_complete_small_and_predict_as_when_shipped(mp_cifs):
    names = pretrained.pretrained_names()
    assert set(PINNED) <= set(names)
    size = sum(f.stat().st_size for f in pretrained.MODELS_DIR.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    for name in names:
        card = json.loads((pretrained.MODELS_DIR / name / "model.json").read_text())
        assert set(card) >= CARD_KEYS and card["target"] == name
    first = json.loads((pretrained.MODELS_DIR / "formation_energy_per_atom/model.json").read_text())
    assert set(first["config"]) >= RUNTIME_KEYS  # an older card: they load, dropped
    for name, expected in PINNED.items():
        structures = [structure_of(mp_cifs, material_id) for material_id in expected]
        predicted = load_model(name).predict(structures)[:, 0]
        np.testing.assert_allclose(predicted, list(expected.values()), rtol=1e-5, atol=1e-6)
