"""User errors of the verbs that take models (issue 14): one line, exit code 2, and nothing
written twice or lost.

The model is a small untrained Crystalformer saved as training saves one (its numbers do not
matter here, only that they are a function of the crystal); MLflow is a SQLite store under a
temporary data root. Crystals are real MP-20 ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import SNAPSHOTS
from test_cli import assert_user_error
from typer.testing import CliRunner

from crystalformer.cli import app
from crystalformer.model import CrystalformerConfig, build_model
from crystalformer.tracking import registered_name, use_tracking
from crystalformer.train import save_model

BITERNARY = SNAPSHOTS / "mp_20_biternary" / "val.csv.gz"
TINY = CrystalformerConfig(n_layers=1, dim=16, n_heads=2, ffn_dim=32, n_rbf=8)
UNKNOWN_MODELS = {
    "models:/crystalformer-bandgap@champion": "crystalformer-bandgap not found",
    "runs:/deadbeef": "deadbeef not found",
    f"models:/{registered_name('band_gap')}@no-such-alias": "no-such-alias not found",
}


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "model"
    save_model(build_model(TINY), folder, {"targets": ["band_gap"], "units": {"band_gap": "eV"}})
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A data root whose MLflow store knows crystalformer-band_gap, with no version or alias."""
    root = tmp_path_factory.mktemp("root")
    use_tracking(root).create_registered_model(registered_name("band_gap"))
    return root


@pytest.fixture
def data_root(store, monkeypatch) -> Path:
    monkeypatch.setenv("CRYSTALFORMER_DATA_ROOT", str(store))
    return store


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """a.csv: three MP-20 crystals; b.csv: a fourth one, and another crystal under a.csv's
    first id (so its prediction would differ)."""
    folder = tmp_path_factory.mktemp("tables")
    frame = pd.read_csv(BITERNARY, nrows=5)[["material_id", "cif"]]
    frame.iloc[:3].to_csv(folder / "a.csv", index=False)
    second = frame.iloc[3:5].copy()
    second.iloc[1, 0] = frame.iloc[0, 0]
    second.to_csv(folder / "b.csv", index=False)
    return folder


def test_predict_keeps_the_first_copy_of_a_duplicate_id(model, tables, tmp_path):
    """As featurize does: the first copy is predicted, the second is a `duplicate` reject
    naming where the first came from; every id is once in one of the two files."""
    out = tmp_path / "predicted.csv"
    a, b = str(tables / "a.csv"), str(tables / "b.csv")
    done = run("predict", a, b, "--model", str(model), "--out", str(out))
    assert done.exit_code == 0, done.output
    for name, table in (("a_alone.csv", a), ("b_alone.csv", b)):
        alone = run("predict", table, "--model", str(model), "--out", str(tmp_path / name))
        assert alone.exit_code == 0, alone.output

    predicted = pd.read_csv(out)
    rejects = pd.read_csv(tmp_path / "predicted.rejects.csv")
    duplicate = pd.read_csv(tables / "b.csv")["material_id"].iloc[1]
    assert predicted["id"].is_unique and len(predicted) == 4
    assert list(rejects["id"]) == [duplicate] and list(rejects["stage"]) == ["duplicate"]
    assert a in rejects["reason"][0] and rejects["origin"][0].startswith(b)
    kept = predicted.set_index("id")["band_gap"][duplicate]
    first, second = (
        pd.read_csv(tmp_path / name).set_index("id")["band_gap"][duplicate]
        for name in ("a_alone.csv", "b_alone.csv")
    )
    assert kept == pytest.approx(first, rel=1e-5) and kept != pytest.approx(second, rel=1e-3)


@pytest.mark.parametrize(
    ("out", "words"),
    [
        ("folder.csv", ["folder.csv is a folder"]),
        ("/sys/crystalformer-test/p.csv", ["cannot write in /sys/crystalformer-test"]),
        ("predictions.txt", ["must end in .csv or .parquet"]),
    ],
)
def test_predict_refuses_an_output_it_cannot_write_before_any_work(tables, tmp_path, out, words):
    """Checked before the models are loaded: the missing model is never reached."""
    (tmp_path / "folder.csv").mkdir()
    model = str(tmp_path / "no-such-model")
    result = run("predict", str(tables / "a.csv"), "--model", model, "--out", str(tmp_path / out))
    assert_user_error(result, *words)


@pytest.mark.parametrize("uri", UNKNOWN_MODELS)
def test_predict_and_screen_name_an_unknown_model(uri, data_root, tables, tmp_path):
    predicted = run(
        "predict", str(tables / "a.csv"), "--model", uri, "--out", str(tmp_path / "p.csv")
    )
    assert_user_error(predicted, uri, UNKNOWN_MODELS[uri])
    screened = run("screen", str(tables / "a.csv"), "--models", uri, "--out", str(tmp_path / "s"))
    assert_user_error(screened, uri, UNKNOWN_MODELS[uri])


def test_train_resume_of_an_unknown_run_fails_before_any_work(data_root, tmp_path):
    """The data does not exist either: the run id is checked first."""
    result = run("train", "--data", str(tmp_path / "nothing"), "--target", "band_gap",
                 "--resume", "deadbeef")  # fmt: skip
    assert_user_error(result, "--resume 'deadbeef'", "deadbeef not found")


def test_screen_filter_of_a_single_value_is_one_line(model, tables, tmp_path):
    result = run("screen", str(tables / "a.csv"), "--models", str(model), "--out",
                 str(tmp_path / "s"), "--filter", "1 > 0", "--no-compile", "--quiet")  # fmt: skip
    assert_user_error(result, "'1 > 0'", "one value")


def test_predict_and_screen_take_model_and_models_alike(model, tables, tmp_path):
    """`--model` and `--models` are one repeatable option on both verbs (issue 17.4)."""
    table = str(tables / "a.csv")
    outs = [tmp_path / "model.csv", tmp_path / "models.csv"]
    for flag, out in zip(("--model", "--models"), outs, strict=True):
        assert run("predict", table, flag, str(model), "--out", str(out)).exit_code == 0
    first, second = (pd.read_csv(out) for out in outs)
    assert len(first) == 3 and first.equals(second)
    for flag in ("--models", "--model"):
        screened = run("screen", table, flag, str(model), "--out",
                       str(tmp_path / f"run{flag}"), "--no-compile", "--quiet")  # fmt: skip
        assert screened.exit_code == 0, screened.output
        assert "3 screened" in screened.output, screened.output
