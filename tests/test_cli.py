"""The `crystalformer` command line, run in-process on real files."""

from __future__ import annotations

import errno
import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_sources_mp import FAKE_KEY, api  # noqa: F401  (the recorded MP API fixture)
from typer.testing import CliRunner

from crystalformer import shards
from crystalformer.cli import app
from crystalformer.conf import ConfigError, FeaturizeConfig, load_yaml
from crystalformer.shards import DatasetFolder, read_dataset, read_rejects

SNAPSHOTS = Path(__file__).resolve().parent.parent / "data" / "snapshots"


@pytest.fixture
def cif_folder(tmp_path) -> Path:
    """Five real MP-20 CIFs (id = file stem) and one file that is not a crystal."""
    folder = tmp_path / "cifs"
    folder.mkdir()
    rows = pd.read_csv(SNAPSHOTS / "mp_20_biternary" / "val.csv.gz", nrows=5)
    for row in rows.itertuples():
        (folder / f"{row.material_id}.cif").write_text(row.cif)
    (folder / "broken.cif").write_text(rows.cif[0][: len(rows.cif[0]) // 3])
    return folder


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def assert_user_error(result, *words: str) -> None:
    """Exit code 2 and one line on stderr that names `words`; never a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_featurize_folder_accepts_good_rejects_bad_and_exits_zero(cif_folder, tmp_path):
    out = tmp_path / "ds"
    result = run("featurize", str(cif_folder), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert "5 featurised" in result.output and "1 rejected" in result.output
    assert sorted(read_dataset(out, ["id"])["id"].to_pylist()) == sorted(
        p.stem for p in cif_folder.glob("mp-*.cif")
    )
    rejects = read_rejects(out).to_pylist()
    assert [(r["id"], r["stage"]) for r in rejects] == [("broken", "parse")]

    again = run("featurize", str(cif_folder), "--out", str(out), "--quiet")
    assert again.exit_code == 0
    assert "0 featurised, 5 unchanged" in again.output


def test_featurize_exits_nonzero_when_nothing_could_be_read(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.cif").write_text("")
    (folder / "b.vasp").write_text("not a poscar")
    result = run("featurize", str(folder), "--out", str(tmp_path / "ds"), "--quiet")
    assert result.exit_code == 1
    assert len(read_rejects(tmp_path / "ds")) == 2


def test_featurize_unknown_source_is_a_usage_error(tmp_path):
    result = run("featurize", "no-such-thing", "--out", str(tmp_path))
    assert_user_error(result, "'no-such-thing' is neither a file, a folder, nor a dataset")


def test_keep_cell_keeps_the_input_supercell(tmp_path):
    row = pd.read_csv(SNAPSHOTS / "mp_20_biternary" / "val.csv.gz", nrows=1).iloc[0]
    from pymatgen.core import Structure

    structure = Structure.from_str(row.cif, fmt="cif")
    structure.make_supercell([2, 1, 1])
    path = tmp_path / "super.cif"
    path.write_text(structure.to(fmt="cif"))
    run("featurize", str(path), "--out", str(tmp_path / "prim"), "--quiet")
    run("featurize", str(path), "--out", str(tmp_path / "kept"), "--quiet", "--keep-cell")
    primitive = read_dataset(tmp_path / "prim", ["n_atoms"])["n_atoms"][0].as_py()
    kept = read_dataset(tmp_path / "kept", ["n_atoms"])["n_atoms"][0].as_py()
    assert kept == len(structure) == 2 * primitive


def test_fetch_materials_project_then_featurize_the_records(
    api,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv("MP_API_KEY", FAKE_KEY)
    records = tmp_path / "materials_project"
    fetched = run("fetch", "materials_project", "--out", str(records))
    assert fetched.exit_code == 0, fetched.output
    assert "5 new or changed" in fetched.output
    assert FAKE_KEY not in fetched.output

    out = tmp_path / "ds"
    result = run("featurize", str(records), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    table = read_dataset(out)
    assert table.num_rows == 5
    assert set(table["source"].to_pylist()) == {"materials_project"}
    assert table["formation_energy_per_atom"].null_count == 0


def test_fetch_materials_project_without_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["fetch", "materials_project", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "MP_API_KEY" in result.output


def test_config_error_names_the_bad_key(tmp_path):
    bad = tmp_path / "featurize.yaml"
    bad.write_text("margin: 0.05\nshard_sise: 100\nsymprec: -1\n")
    with pytest.raises(ConfigError) as raised:
        load_yaml(bad, FeaturizeConfig)
    message = str(raised.value)
    assert "shard_sise" in message and "symprec" in message and str(bad) in message


def test_config_error_for_unreadable_yaml(tmp_path):
    bad = tmp_path / "featurize.yaml"
    bad.write_bytes(gzip.compress(b"margin: 1"))
    with pytest.raises(ConfigError, match="not valid YAML|featurize.yaml"):
        load_yaml(bad, FeaturizeConfig)


def test_model_config_file_holds_the_paper_defaults():
    from crystalformer.conf import model_config, runtime_config
    from crystalformer.model import CrystalformerConfig, Runtime

    assert model_config() == CrystalformerConfig()
    assert abs(model_config().r_cut - 3.5 * 1.4 / 0.5**0.5) < 1e-12
    # compiled kernels: a speed switch of how models run, not a hyperparameter; on as shipped
    assert runtime_config() == Runtime(compiled=True)


def test_a_model_config_with_run_time_keys_says_where_they_moved(tmp_path):
    from crystalformer.conf import model_config

    old = tmp_path / "old.yaml"
    old.write_text("encoder: crystalformer\nn_layers: 2\ncompile_kernels: false\ndevice: cpu\n")
    with pytest.raises(ConfigError, match=r"compile_kernels, device: how a model runs.*runtime"):
        model_config(name=old)


def test_model_config_error_names_unknown_and_mistyped_keys(tmp_path):
    from crystalformer.model.config import CrystalformerConfig

    bad = tmp_path / "crystalformer.yaml"
    bad.write_text("n_layers: 4\nn_head: 8\n")
    with pytest.raises(ConfigError, match="n_head: unknown key"):
        load_yaml(bad, CrystalformerConfig)
    bad.write_text("dim: wide\n")
    with pytest.raises(ConfigError, match="dim: Input should be a valid integer"):
        load_yaml(bad, CrystalformerConfig)


def test_generate_writes_a_candidates_table_that_featurize_reads(tmp_path):
    table = tmp_path / "candidates.parquet"
    result = run(
        "generate", "--out", str(table), "--elements", "Li,Na,K,F,Cl", "--threshold", "0.01"
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(table)
    assert len(frame) > 0 and f"{len(frame)} candidates" in result.output
    assert set(frame.columns) == {"id", "parent", "substitution", "probability", "structure"}
    assert (frame["probability"] >= 0.01).all()
    out = tmp_path / "ds"
    assert run("featurize", str(table), "--out", str(out), "--quiet").exit_code == 0
    assert sorted(read_dataset(out)["id"].to_pylist()) == sorted(frame["id"])


def test_generate_from_cifs_and_a_dataset_writes_candidates_featurize_reads(cif_folder, tmp_path):
    table = tmp_path / "known.parquet"
    result = run(
        "generate", "--from", str(cif_folder), "--from", "jarvis_sample", "--out", str(table),
        "--max-candidates", "40", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(table)
    assert len(frame) == 40 and "40 candidates" in result.output
    assert list(frame.columns) == ["id", "parent", "substitution", "probability", "structure"]
    # Zn3N2 (mp-754553) is the one CIF with oxidation states; the rest come from JARVIS
    assert frame["parent"].iloc[0] == "mp-754553"
    assert frame["parent"].iloc[-1].startswith("JVASP-")
    assert (frame["id"] == frame["parent"] + ":" + frame["substitution"].str.replace(" ", "")).all()
    assert "unreadable 1," in result.output
    rejects = pd.read_csv(tmp_path / "known.rejects.csv").set_index("id")
    assert f"{len(rejects)} parents skipped, each with its reason" in result.output
    assert rejects.loc["broken", "stage"] == "parse"
    assert "unreadable CIF" in rejects.loc["broken", "reason"]
    # every parent read before the 40th candidate: a candidate's or a reject's
    assert set(rejects.index).isdisjoint(frame["parent"])
    others = {f.stem for f in cif_folder.glob("mp-*.cif")} - {"mp-754553"}
    assert len(others) == 4 and others <= set(rejects.index)
    assert rejects.loc[sorted(others), "reason"].str.contains("no oxidation states of").all()
    out = tmp_path / "ds"
    assert run("featurize", str(table), "--out", str(out), "--quiet").exit_code == 0
    assert sorted(read_dataset(out)["id"].to_pylist()) == sorted(frame["id"])


def test_generate_from_an_unknown_dataset_is_a_user_error(tmp_path):
    result = run("generate", "--from", "no-such-set", "--out", str(tmp_path / "x.parquet"))
    assert_user_error(result, "'no-such-set' is neither a file, a folder, nor a dataset")
    assert not (tmp_path / "x.parquet").exists()


def test_generate_names_an_unknown_element():
    result = CliRunner().invoke(app, ["generate", "--out", "x.parquet", "--elements", "Li,Qq"])
    assert result.exit_code == 2 and "Qq" in result.output


# --- user errors: one line, exit code 2, and nobody's files touched (issue 14) -----------------


def test_featurize_into_the_inputs_folder_refuses_and_keeps_the_input(tmp_path):
    """The reproduction, run as a user runs it: `mkdir u; cp x.parquet u/in.parquet;
    crystalformer featurize u/in.parquet --out u` deleted the input before reading it."""
    frame = pd.read_csv(SNAPSHOTS / "mp_20_biternary" / "val.csv.gz", nrows=5)
    (tmp_path / "u").mkdir()
    frame[["material_id", "cif"]].to_parquet(tmp_path / "u" / "in.parquet")
    before = (tmp_path / "u" / "in.parquet").read_bytes()
    script = Path(sys.executable).with_name("crystalformer")
    done = subprocess.run(
        [str(script), "featurize", "u/in.parquet", "--out", "u", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: u is not empty and is not a dataset folder (no manifest.json; it holds "
        "in.parquet): choose an empty or new --out\n"
    )
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["in.parquet"]
    assert (tmp_path / "u" / "in.parquet").read_bytes() == before


def test_featurize_into_a_folder_another_run_writes_is_refused(cif_folder, tmp_path, settings):
    busy = DatasetFolder(tmp_path / "ds", settings, {})
    try:
        result = run("featurize", str(cif_folder), "--out", str(tmp_path / "ds"), "--quiet")
    finally:
        busy.close()
    assert_user_error(result, "another run is writing to", "ds")


def test_featurize_with_another_r_cut_than_the_folders_is_refused(cif_folder, tmp_path):
    out = str(tmp_path / "ds")
    assert run("featurize", str(cif_folder), "--out", out, "--quiet").exit_code == 0
    result = run("featurize", str(cif_folder), "--out", out, "--quiet", "--r-cut", "5.0")
    assert_user_error(result, "was featurised with", "r_cut=5.0", "new --out")


def test_featurize_into_a_path_nobody_may_write(cif_folder):
    """/sys refuses new entries even to root, who ignores file permissions."""
    result = run("featurize", str(cif_folder), "--out", "/sys/crystalformer-test/ds", "--quiet")
    assert_user_error(result, "/sys/crystalformer-test", "not permitted")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_featurize_into_a_read_only_folder(cif_folder, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run("featurize", str(cif_folder), "--out", str(locked / "ds"), "--quiet")
    finally:
        locked.chmod(0o755)
    assert_user_error(result, "Permission denied")


def test_featurize_into_a_file_is_refused(cif_folder, tmp_path):
    table = tmp_path / "table.csv"
    table.write_text("id,cif\n")
    result = run("featurize", str(cif_folder), "--out", str(table), "--quiet")
    assert_user_error(result, "table.csv is a file")
    assert table.read_text() == "id,cif\n"


def test_a_full_disk_is_one_line_not_a_traceback(cif_folder, tmp_path, monkeypatch):
    def full(table, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(shards, "_write_parquet", full)
    result = run("featurize", str(cif_folder), "--out", str(tmp_path / "ds"), "--quiet")
    assert_user_error(result, "No space left on device", ".tmp")


# Libraries that take seconds to import: the verbs import them in their bodies, so that
# `crystalformer --help` and a verb's --help answer at once (README "Command line").
HEAVY = ("torch", "mlflow", "pymatgen", "prefect", "pandas", "pyarrow", "dask", "scipy")
VERBS = ("featurize", "fetch", "train", "predict", "generate", "screen", "report")
FLAGS = {
    "featurize": ["--keep-cell", "--quiet"],
    "generate": ["--quiet"],
    "train": ["--promote", "--quiet"],
    "predict": ["--keep-cell"],
    "screen": ["--compile / --no-compile", "--quiet"],
}


@pytest.mark.parametrize("args", [[], ["screen"], ["predict"], ["train"]], ids=" ".join)
def test_help_imports_no_heavy_library(args):
    """In a fresh interpreter, as the installed script runs: which modules --help loaded."""
    script = (
        "import sys\n"
        "from crystalformer.cli import main\n"
        "sys.argv = ['crystalformer', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args, "--help"], capture_output=True, text=True, check=True
    )
    assert "Usage: crystalformer" in done.stdout, done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("verb", VERBS)
def test_help_shows_booleans_as_plain_flags(verb):
    shown = run(verb, "--help")
    assert shown.exit_code == 0
    assert "<bool>" not in shown.output and "--help " in shown.output
    for flag in FLAGS.get(verb, []):
        assert f"  {flag}  " in shown.output, (flag, shown.output)


def test_help_shows_the_defaults_screening_runs_with():
    from crystalformer.screen_run import ScreenOptions

    shown = " ".join(run("screen", "--help").output.split())
    assert f"Rows in the report's top table. [default: {ScreenOptions.top}]" in shown
    assert "[default: compile]" in shown
    assert "Default: the lowest predicted e_above_hull first (ties: the smaller " in shown


def test_train_help_names_every_preset():
    from crystalformer.conf import CONF_DIR

    shown = re.sub(r"-\s+", "-", " ".join(run("train", "--help").output.split()))  # unwrapped
    listed = shown.split("A preset of conf/train/ (")[1].split(")")[0]
    assert listed.split(", ") == sorted(p.stem for p in (CONF_DIR / "train").glob("*.yaml"))


def test_fetch_help_names_every_registered_source():
    """The help is written out (importing the sources takes seconds): it must not go stale."""
    from crystalformer.sources.base import REGISTRY

    shown = " ".join(run("fetch", "--help").output.split())
    listed = shown.split("The remote source: ")[1].split(" (those registered")[0]
    assert sorted(listed.replace(" or ", ", ").split(", ")) == sorted(REGISTRY)
