"""Screening on real candidates with real trained models (SQLite MLflow under a temp root).

Three briefly trained models (two seeds of e_above_hull, one band_gap) screen MP-20 crystals
given as a CSV plus a broken CIF: every id ends once in the results or the rejects, ensembles
give a spread, filters, ranks and the Pareto front are checked against brute force, training
crystals are flagged, a SIGKILLed run resumes, Dask gives the same numbers, and the report
and label metrics are written.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import BAD, SNAPSHOTS, TINY_ENCODERS, flow_run_logs
from mlflow.tracking import MlflowClient

from crystalformer.conf import datasets_config
from crystalformer.datasets import featurize_inputs
from crystalformer.predict import predict_table, size_batches
from crystalformer.report import column_units, format_value, label_metrics
from crystalformer.screen import (
    describe_model,
    pareto_front,
    rank,
    screen,
    screen_shard,
)
from crystalformer.screen_run import (
    FEATURES,
    RANKED,
    RESULTS,
    Ranking,
    ScreenOptions,
    default_ranking,
)
from crystalformer.shards import read_dataset, read_rejects
from crystalformer.tracking import download_model, train_property
from crystalformer.train import load_model

ROOT = Path(__file__).resolve().parents[1]
BITERNARY = SNAPSHOTS / "mp_20_biternary" / "val.csv.gz"
N_CANDIDATES = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, biternary_raws, settings) -> dict:
    """Models trained one epoch on 60 MP-20 crystals, registered in a temp MLflow store."""
    root = tmp_path_factory.mktemp("root")
    folder = root / "biternary"
    units = datasets_config().datasets["mp20_biternary"].units()
    featurize_inputs(biternary_raws[:80], folder, settings, units, progress=False)
    previous = os.environ.get("CRYSTALFORMER_DATA_ROOT")
    os.environ["CRYSTALFORMER_DATA_ROOT"] = str(root)
    runs = {}
    quick = {"epochs": 1, "max_crystals": 60}
    for name, target, seed in [("hull_a", "e_above_hull", 1), ("hull_b", "e_above_hull", 2),
                               ("gap", "band_gap", 1)]:  # fmt: skip
        outcome = train_property(str(folder), target, overrides={**quick, "seed": seed}, root=root)
        runs[name] = f"runs:/{outcome.run_id}"
    yield {"root": root, "runs": runs, "folder": folder}
    if previous is None:
        os.environ.pop("CRYSTALFORMER_DATA_ROOT", None)
    else:
        os.environ["CRYSTALFORMER_DATA_ROOT"] = previous


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """40 MP-20 crystals as a CSV (the first 80 rows trained the models), and a broken CIF."""
    folder = tmp_path_factory.mktemp("candidates")
    frame = pd.read_csv(BITERNARY, nrows=N_CANDIDATES + 40).iloc[40:]
    frame[["material_id", "cif"]].to_csv(folder / "table.csv", index=False)
    (folder / "cifs").mkdir()
    (folder / "cifs" / "broken.cif").write_text((BAD / "close_atoms.cif").read_text())
    return folder


def all_models(trained) -> list[str]:
    return list(trained["runs"].values())


FILTER = "e_above_hull < 0.2 and band_gap > 0.1"
RANK_BY = "band_gap - e_above_hull_std"
PARETO = "band_gap:max,e_above_hull:min"


@pytest.fixture(scope="module")
def screened(trained, candidates, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("screen")
    sources = [str(candidates / "table.csv"), str(candidates / "cifs")]
    summary = screen(ScreenOptions(
        sources, all_models(trained), out, filter_expr=FILTER, rank_by=RANK_BY,
        pareto=PARETO, top=5, shard_size=15, progress=False, root=trained["root"],
    ))  # fmt: skip
    assert summary.screened == N_CANDIDATES and summary.rejected == 1
    return out


def test_every_candidate_is_screened_or_rejected_exactly_once(screened, candidates):
    ranked = pd.read_parquet(screened / RANKED)
    rejects = read_rejects(screened / FEATURES).to_pandas()
    expected = list(pd.read_csv(candidates / "table.csv")["material_id"]) + ["broken"]
    assert sorted(list(ranked["id"]) + list(rejects["id"])) == sorted(expected)
    assert ranked["id"].is_unique
    assert "0.5" in rejects.set_index("id").loc["broken", "reason"]


def test_ensemble_gives_mean_spread_and_count(screened):
    ranked = pd.read_parquet(screened / RANKED)
    assert (ranked["e_above_hull_n_models"] == 2).all()
    assert (ranked["e_above_hull_std"] > 0).all()  # two seeds disagree somewhat
    assert (ranked["band_gap_n_models"] == 1).all() and ranked["band_gap_std"].isna().all()
    results = pd.concat(pd.read_parquet(p) for p in sorted((screened / RESULTS).glob("*")))
    assert len(results) == len(ranked)


def test_filter_rank_and_pareto_agree_with_brute_force(screened):
    ranked = pd.read_parquet(screened / RANKED)
    passes = (ranked["e_above_hull"] < 0.2) & (ranked["band_gap"] > 0.1)
    assert (ranked["passes_filter"] == passes).all()
    score = ranked["band_gap"] - ranked["e_above_hull_std"]
    np.testing.assert_allclose(ranked["score"], score)
    ranked_rows = ranked[passes].sort_values("rank")
    assert list(ranked_rows["rank"]) == list(range(1, passes.sum() + 1))
    assert ranked_rows["score"].is_monotonic_decreasing
    assert ranked.loc[~passes, "rank"].isna().all()
    # Pareto: a passing row is on the front iff no passing row is at least as good in both
    # objectives and better in one
    good = ranked[passes]
    gap, hull = good["band_gap"].to_numpy(), good["e_above_hull"].to_numpy()
    dominated = [
        bool(np.any((gap >= g) & (hull <= h) & ((gap > g) | (hull < h))))
        for g, h in zip(gap, hull, strict=True)
    ]
    assert list(good["pareto_front"]) == [not d for d in dominated]
    assert not ranked.loc[~passes, "pareto_front"].any()


def test_candidates_a_model_was_trained_on_are_flagged(screened, trained):
    ranked = pd.read_parquet(screened / RANKED)
    client = MlflowClient(f"sqlite:///{trained['root'] / 'mlflow.db'}")
    hashes = set()
    for uri in all_models(trained):
        local = client.download_artifacts(uri.removeprefix("runs:/"), "split.parquet")
        split = pq.read_table(local).to_pandas()
        hashes |= set(split.loc[split["split"] == "train", "structure_hash"])
    assert list(ranked["in_training"]) == [h in hashes for h in ranked["structure_hash"]]
    assert not ranked["in_training"].all()  # rows 40..80: some trained on, some not


def test_report_page_and_run_metadata_are_written(screened, trained):
    page = (screened / "report.html").read_text()
    assert "Top 5" in page and page.count("data:image/png;base64,") == 2
    metadata = json.loads((screened / "screen.json").read_text())
    assert metadata["filter"] == FILTER and len(metadata["models"]) == 3
    assert metadata["screened"] == N_CANDIDATES
    assert metadata["models"][0]["units"] == {"e_above_hull": "eV/atom"}
    passing = int(pd.read_parquet(screened / RANKED)["passes_filter"].sum())
    assert metadata["passed_filter"] == passing

    # A run summary a person reads, not JSON (which stays, folded, at the end).
    summary = page[page.index("<h2>Run") : page.index("<h2>Top 5")]
    assert "<th>Models</th>" in summary and "<th>Filter</th>" in summary
    assert html.escape(FILTER) in summary and all(uri in summary for uri in all_models(trained))
    assert f"{N_CANDIDATES} screened, {passing} pass the filter, 1 rejected" in summary
    assert "{" not in summary and page.index("<details>") > page.index("<h2>Property map")

    # The top table: units in the headers, numbers rounded to their unit's meaning.
    table = page[page.index("<h2>Top 5") : page.index("<h2>Predicted properties")]
    assert "band_gap (eV)" in table and "e_above_hull_std (eV/atom)" in table
    header, *rows = (re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in table_rows(table))
    columns = {name: [row[k] for row in rows] for k, name in enumerate(header)}
    assert len(rows) == 5 and "-0.000" not in table
    for name in ("e_above_hull (eV/atom)", "e_above_hull_std (eV/atom)"):
        assert all(re.fullmatch(r"-?\d+\.\d{3}", text) for text in columns[name]), name
    assert all(re.fullmatch(r"-?\d+\.\d{2}", text) for text in columns["band_gap (eV)"])


def table_rows(page: str) -> list[str]:
    return re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S)


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [(-0.0004, "eV/atom", "0.000"), (1.23456, "eV", "1.23"), (2.34567, "log10 GPa", "2.346"),
     (float("nan"), "eV", "–"), (123456.0, None, "1.235e+05"), (7, "eV", "7"),
     (True, None, "yes"), (pd.NA, None, "–")],
)  # fmt: skip
def test_report_rounds_each_number_to_its_unit(value, unit, text):
    assert format_value(value, unit) == text


def test_report_score_has_a_unit_only_when_it_is_one_property():
    models = [{"targets": ["e_above_hull"], "units": {"e_above_hull": "eV/atom"}}]
    default = {"models": models, "ranking": {"rank_by": "-e_above_hull", "default": True}}
    assert column_units(default)["score"] == "eV/atom"
    assert column_units(default)["e_above_hull_std"] == "eV/atom"
    mixed = {"models": models, "ranking": {"rank_by": "band_gap - e_above_hull"}}
    assert "score" not in column_units(mixed)
    assert column_units({"models": [{"targets": ["e_above_hull"]}]}) == {}  # an older run


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_page_renders_in_a_headless_browser(screened, tmp_path):
    """Chromium draws the page: the screenshot is not blank, and the histograms' orange
    bars are on it (the inlined images decoded and painted)."""
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,3000", f"--screenshot={shot}",
         (screened / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3000, 1280)
    inked = (pixels < 200).any(axis=2).mean()  # text, table rules, plots
    assert 0.01 < inked < 0.9
    orange = (abs(pixels - [255, 127, 14]).max(axis=2) < 40).sum()  # matplotlib's C1
    assert orange > 500


KILL_SHARD_SIZE = 2  # many small shards: a compiled model predicts one in a few ms, so the
# kill must land between shards, not after the last (with 5 shards all could finish in 0.2 s)


def test_killed_run_resumes_without_redoing_or_duplicating(trained, candidates, tmp_path):
    out = tmp_path / "screen"
    models = [arg for uri in all_models(trained) for arg in ("--models", uri)]
    command = [
        str(Path(sys.executable).with_name("crystalformer")), "screen",
        str(candidates / "table.csv"), *models, "--out", str(out),
        "--shard-size", str(KILL_SHARD_SIZE), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "CRYSTALFORMER_DATA_ROOT": str(trained["root"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / RESULTS).glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list((out / RESULTS).glob("*.parquet")))
    assert 1 <= done_before < N_CANDIDATES // KILL_SHARD_SIZE and not (out / RANKED).exists()

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} already done" in resumed.stdout
    ranked = pd.read_parquet(out / RANKED)
    assert sorted(ranked["id"]) == sorted(pd.read_csv(candidates / "table.csv")["material_id"])


def test_dask_workers_give_the_serial_numbers(screened, trained, candidates, tmp_path):
    summary = screen(ScreenOptions(
        [str(candidates / "table.csv")], all_models(trained), tmp_path, filter_expr=FILTER,
        rank_by=RANK_BY, shard_size=15, workers=2, progress=False, root=trained["root"],
    ))  # fmt: skip
    assert summary.screened == N_CANDIDATES
    serial = pd.read_parquet(screened / RANKED).set_index("id").sort_index()
    parallel = pd.read_parquet(tmp_path / RANKED).set_index("id").sort_index()
    # Other shard sizes batch other crystals together: float32 sums agree to round-off only.
    for column in ("e_above_hull", "e_above_hull_std", "band_gap"):
        np.testing.assert_allclose(parallel[column], serial[column], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(parallel["rank"], serial["rank"])


def test_every_encoder_screens_in_one_ensemble(trained, candidates, tmp_path):
    """CrystalFramer and Site-Net band-gap models beside a Crystalformer one: one ensemble over
    the same feature shards, each member predicting what it predicts alone."""
    runs = [trained["runs"]["gap"]]
    for encoder, text in TINY_ENCODERS.items():
        model_yaml = tmp_path / f"{encoder}.yaml"
        model_yaml.write_text(text)
        outcome = train_property(
            str(trained["folder"]), "band_gap", model=model_yaml,
            overrides={"epochs": 1, "max_crystals": 60}, root=trained["root"],
        )  # fmt: skip
        runs.append(f"runs:/{outcome.run_id}")
    out = tmp_path / "screen"
    summary = screen(ScreenOptions(
        [str(candidates / "table.csv")], runs, out, shard_size=15, progress=False,
        root=trained["root"],
    ))  # fmt: skip
    assert summary.screened == N_CANDIDATES
    ranked = pd.read_parquet(out / RANKED).set_index("id").sort_index()
    assert (ranked["band_gap_n_models"] == len(runs)).all()
    features = read_dataset(out / FEATURES)
    alone = [
        predict_table(load_model(download_model(uri, trained["root"]))[0], features)[:, 0]
        for uri in runs
    ]
    assert np.ptp(alone, axis=0).min() > 0  # three different models
    expected = pd.DataFrame(
        {"band_gap": np.mean(alone, axis=0), "band_gap_std": np.std(alone, axis=0, ddof=1)},
        index=features["id"].to_pylist(),
    ).sort_index()
    assert list(ranked.index) == list(expected.index)
    np.testing.assert_allclose(ranked["band_gap"], expected["band_gap"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ranked["band_gap_std"], expected["band_gap_std"], rtol=1e-4, atol=1e-6
    )


def headings(out: Path) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", (out / "report.html").read_text())


def test_featurised_dataset_folders_are_screened_as_they_are(trained, tmp_path):
    summary = screen(ScreenOptions(
        [str(trained["folder"])], [trained["runs"]["gap"]], tmp_path, progress=False,
        root=trained["root"],
    ))  # fmt: skip
    assert summary.screened == 80 and not (tmp_path / FEATURES).exists()
    ranked = pd.read_parquet(tmp_path / RANKED)
    assert ranked["in_training"].sum() == 48  # 80% of 60
    # no --rank-by and no e_above_hull model: nothing ranks the rows, so none is a "top"
    assert not summary.ranking.ranked and ranked["score"].isna().all()
    assert list(ranked["id"]) == sorted(ranked["id"])
    assert "Candidates that pass the filter (unranked, by id; the first 50)" in headings(tmp_path)
    assert not [h for h in headings(tmp_path) if "top" in h.lower()]


def test_default_ranking_is_lowest_e_above_hull_then_the_surer_ensemble(trained, tmp_path):
    """No --rank-by, an e_above_hull ensemble among the models: the most stable first."""
    summary = screen(ScreenOptions(
        [str(trained["folder"])], all_models(trained), tmp_path, top=7, progress=False,
        root=trained["root"], compiled=False,
    ))  # fmt: skip
    ranked = pd.read_parquet(tmp_path / RANKED)
    expected = ranked.sort_values(["e_above_hull", "e_above_hull_std", "id"])
    assert list(ranked["id"]) == list(expected["id"])
    assert ranked["e_above_hull"].is_monotonic_increasing and ranked["e_above_hull"].nunique() > 1
    assert list(ranked["rank"]) == list(range(1, 81))
    np.testing.assert_array_equal(ranked["score"], -ranked["e_above_hull"])
    assert summary.ranking == Ranking("-e_above_hull", "e_above_hull_std", default=True)
    metadata = json.loads((tmp_path / "screen.json").read_text())
    assert metadata["rank_by"] is None and Ranking.of_run(metadata) == summary.ranking
    title = (
        "Top 7 candidates that pass the filter (lowest predicted e_above_hull first, ties: "
        "smaller e_above_hull_std first; the default)"
    )
    assert title in headings(tmp_path)

    # equal e_above_hull: the smaller spread first, whichever id comes first
    first, second = ranked.iloc[0], ranked.iloc[1]
    surer, less_sure = sorted([first, second], key=lambda row: row["e_above_hull_std"])
    tied = ranked.drop(columns=["passes_filter", "score", "rank"])
    tied.loc[tied["id"].isin([surer["id"], less_sure["id"]]), "e_above_hull"] = -1.0
    tied.loc[tied["id"] == surer["id"], "id"] = "zz-surer"  # last by id
    again = rank(tied, rank_by=summary.ranking.rank_by, tie_break=summary.ranking.tie_break)
    assert list(again["id"][:2]) == ["zz-surer", less_sure["id"]]
    assert list(rank(tied, rank_by="-e_above_hull")["id"][:2]) == [less_sure["id"], "zz-surer"]


def test_an_explicit_rank_by_is_used_exactly_as_given():
    assert default_ranking("band_gap", ["e_above_hull"]) == Ranking("band_gap")
    assert default_ranking(None, ["band_gap"]) == Ranking()
    assert Ranking("band_gap").table_title(5) == (
        "Top 5 candidates that pass the filter (by band_gap, highest first)"
    )
    assert not Ranking().ranked and "top" not in Ranking().table_title(50).lower()


def test_other_models_into_the_same_out_recompute_and_are_described(trained, tmp_path):
    """Results are keyed by the models' weights: a moved alias or other --models never
    leaves old predictions under the new models' names (issue 14.3)."""
    data = [str(trained["folder"])]
    hull_a, hull_b = trained["runs"]["hull_a"], trained["runs"]["hull_b"]
    options = {"progress": False, "root": trained["root"], "compiled": False}
    first = screen(ScreenOptions(data, [hull_a], tmp_path, **options))
    before = pd.read_parquet(tmp_path / RANKED).set_index("id")["e_above_hull"]
    second = screen(ScreenOptions(data, [hull_b], tmp_path, **options))
    after = pd.read_parquet(tmp_path / RANKED).set_index("id")["e_above_hull"]
    assert first.shards_done == second.shards_done > 0 and second.shards_skipped == 0
    assert not np.allclose(before, after.loc[before.index])  # two seeds, two models
    fresh = screen(ScreenOptions(data, [hull_b], tmp_path / "fresh", **options))
    assert fresh.screened == second.screened
    expected = pd.read_parquet(tmp_path / "fresh" / RANKED).set_index("id")["e_above_hull"]
    np.testing.assert_array_equal(after.loc[expected.index], expected)
    described = json.loads((tmp_path / "screen.json").read_text())["models"]
    assert [m["uri"] for m in described] == [hull_b]
    assert (
        described[0]["weights_sha256"]
        == describe_model(hull_b, download_model(hull_b, trained["root"])).weights_sha256
    )
    again = screen(ScreenOptions(data, [hull_b], tmp_path, **options))
    assert again.shards_done == 0 and again.shards_skipped == second.shards_done


def test_screening_never_removes_or_reads_a_users_files(trained, tmp_path):
    data, options = [str(trained["folder"])], {"progress": False, "root": trained["root"]}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a screening run's folder"):
        screen(ScreenOptions(data, [trained["runs"]["gap"]], foreign, **options))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "run"
    screen(ScreenOptions(data, [trained["runs"]["gap"]], out, **options))
    users = out / RESULTS / "mine.parquet"
    users.write_bytes(next((out / RESULTS).glob("*.parquet")).read_bytes())
    # stale results go
    summary = screen(ScreenOptions(data, [trained["runs"]["hull_a"]], out, **options))
    assert users.exists() and summary.screened == 80
    assert len(pd.read_parquet(out / RANKED)) == 80  # the user's copy is not read


def test_bad_expression_names_the_columns(screened):
    ranked = pd.read_parquet(screened / RANKED)
    with pytest.raises(ValueError, match="e_above_hull_std"):
        rank(ranked, filter_expr="no_such_column > 1")


def test_shard_screened_row_group_by_row_group_gives_the_whole_shard_results(
    screened, trained, tmp_path
):
    """screen_shard reads one row group at a time (bounded images each): the result is the
    same rows, in order, with the numbers of the shard screened as one group."""
    shard = sorted((screened / FEATURES).glob("shard-*.parquet"))[0]
    table = pq.read_table(shard)
    whole, grouped = tmp_path / "whole.parquet", tmp_path / "grouped.parquet"
    pq.write_table(table, whole)
    pq.write_table(table, grouped, row_group_size=4)
    assert pq.ParquetFile(whole).num_row_groups == 1
    assert pq.ParquetFile(grouped).num_row_groups == -(-table.num_rows // 4)
    models = [
        describe_model(uri, download_model(uri, trained["root"])) for uri in all_models(trained)
    ]
    for path in (whole, grouped):
        screen_shard(str(path), models, str(path.with_suffix(".result")))
    expected = pd.read_parquet(whole.with_suffix(".result"))
    got = pd.read_parquet(grouped.with_suffix(".result"))
    assert list(got.columns) == list(expected.columns)
    assert list(got["id"]) == table["id"].to_pylist() == list(expected["id"])
    numbers = [c for c in expected.columns if expected[c].dtype.kind == "f"]
    assert {"e_above_hull", "e_above_hull_std", "band_gap"} <= set(numbers)
    np.testing.assert_allclose(got[numbers], expected[numbers], rtol=1e-5, atol=1e-7)
    others = [c for c in expected.columns if c not in numbers]
    pd.testing.assert_frame_equal(got[others], expected[others])


def test_size_batches_hold_at_most_the_image_budget():
    sizes = np.array([50, 10, 300, 20, 90, 40, 10])
    batches = size_batches(sizes, max_images=100)
    assert sorted(np.concatenate(batches)) == list(range(len(sizes)))
    for batch in batches:
        assert sizes[batch].sum() <= 100 or len(batch) == 1
    firsts = [sizes[b].max() for b in batches]
    assert firsts == sorted(firsts)  # similar sizes together, small first
    capped = size_batches(sizes, max_images=100, max_rows=2)  # training's evaluation batches
    assert max(len(batch) for batch in capped) == 2 and len(capped) > len(batches)


def test_pareto_front_of_random_points_matches_brute_force():
    values = np.random.default_rng(0).normal(size=(300, 2))
    front = pareto_front(values)
    for row, on_front in enumerate(front):
        better = np.all(values >= values[row], axis=1) & np.any(values > values[row], axis=1)
        assert on_front == (not better.any())


def test_report_cli_scores_the_run_against_dft_labels(screened, trained, tmp_path):
    from typer.testing import CliRunner

    from crystalformer.cli import app

    labels = pd.read_csv(BITERNARY, nrows=N_CANDIDATES + 40).iloc[40:]
    labels = labels.rename(columns={"material_id": "id"})[["id", "e_above_hull", "band_gap"]]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    result = CliRunner().invoke(
        app,
        ["report", "--results", str(screened), "--labels", str(tmp_path / "labels.csv"),
         "--threshold", "0.05", "--top", "10"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((screened / "label_metrics.json").read_text())
    ranked = pd.read_parquet(screened / RANKED).merge(labels, on="id", suffixes=("", "_dft"))
    mae = (ranked["band_gap"] - ranked["band_gap_dft"]).abs().mean()
    assert metrics["mae_band_gap"] == pytest.approx(mae)
    truly = ranked["e_above_hull_dft"] <= 0.05
    assert metrics["stable_fraction"] == pytest.approx(truly.mean())
    assert "Against DFT labels" in (screened / "report.html").read_text()
    client = MlflowClient(f"sqlite:///{trained['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("screening")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["mae_band_gap"] == pytest.approx(mae)
    assert run.info.run_name == f"labels-{screened.name}"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert metrics["top_k"] == 10  # a ranked run (--rank-by) has a top K


def test_label_metrics_count_hits_as_defined():
    """4 candidates, 2 truly stable; the model calls 2 stable, 1 of them right."""
    ranked = pd.DataFrame(
        {"id": list("abcd"), "e_above_hull": [0.0, 0.3, 0.01, 0.5],
         "e_above_hull_n_models": 1, "rank": pd.array([1, 2, 3, 4], dtype="Int64")}
    )  # fmt: skip
    labels = pd.DataFrame({"id": list("abcd"), "e_above_hull": [0.02, 0.0, 0.4, 0.6]})
    metrics = label_metrics(ranked, labels, threshold=0.05, top=2)
    assert metrics["precision"] == 0.5 and metrics["recall"] == 0.5
    assert metrics["stable_fraction"] == 0.5 and metrics["daf"] == 1.0
    assert metrics["top_k_precision"] == 1.0 and metrics["top_k_daf"] == 2.0
    assert metrics["mae_e_above_hull"] == pytest.approx((0.02 + 0.3 + 0.39 + 0.1) / 4)
    unranked = label_metrics(ranked, labels, threshold=0.05, top=0)  # no order: no top K
    assert "precision" in unranked and not any(k.startswith("top_k") for k in unranked)
    assert not any(k.startswith("unseen_") for k in metrics)  # no in_training column

    ranked["in_training"] = [True, False, False, False]  # "a" was trained on
    seen = label_metrics(ranked, labels, threshold=0.05, top=2)
    assert seen["precision"] == 0.5 and seen["unseen_labelled"] == 3
    assert seen["unseen_precision"] == 0.0 and seen["unseen_stable_fraction"] == 1 / 3
    assert seen["unseen_mae_e_above_hull"] == pytest.approx((0.3 + 0.39 + 0.1) / 3)
    assert seen["unseen_top_k_precision"] == 0.5  # b (stable) and c (not), ranked 2 and 3


def test_screen_flow_publishes_the_top_table_and_summary(trained, candidates, tmp_path):
    """The `screen` deployment passes no rank_by: the default ranking names the table."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.screen import screen_flow

    with prefect_test_harness(server_startup_timeout=90):
        state = screen_flow(
            candidates=[str(candidates / "table.csv")], models=all_models(trained),
            out=str(tmp_path), filter_expr=FILTER, top=3, return_state=True,
        )  # fmt: skip
        result = state.result()
        with get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in client.read_latest_artifacts()}
        logs = flow_run_logs(state)
    # Each stage says what it does, with its total, and how far it got.
    table = candidates / "table.csv"
    assert f"featurising {table} ({N_CANDIDATES} inputs) into {tmp_path / FEATURES}" in logs
    assert f"featurising: {N_CANDIDATES}/{N_CANDIDATES} inputs done (100%)" in " ".join(logs)
    n = len(list((tmp_path / FEATURES).glob("shard-*.parquet")))
    shards = f"{n} shard" if n == 1 else f"{n} shards"
    assert f"screening {shards} with {len(all_models(trained))} models (0 already done)" in logs
    assert f"screening: {n}/{shards} done (100%)" in " ".join(logs)
    assert result["screened"] == N_CANDIDATES and result["ranking"]["default"]
    top = artifacts["screen-top"]
    ranked = pd.read_parquet(tmp_path / RANKED)
    best = ranked[ranked["passes_filter"]].head(3)
    assert best["e_above_hull"].is_monotonic_increasing
    assert [row["id"] for row in json.loads(top.data)] == list(best["id"])
    assert top.description.startswith("Top 3 candidates that pass the filter (lowest predicted")
    assert "screened" in artifacts["screen-summary"].data
    assert "e_above_hull_std" in artifacts["screen-summary"].data  # the ranking, as applied
    client = MlflowClient()
    for uri in all_models(trained):  # each model a link to its run in the MLflow UI
        run_id = uri.removeprefix("runs:/")
        experiment = client.get_run(run_id).info.experiment_id
        link = f"[{uri}](http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id})"
        assert link in artifacts["screen-summary"].data
    assert f"]({(tmp_path / 'report.html').resolve().as_uri()})" in artifacts["screen-summary"].data
    assert "e_above_hull (eV/atom)" in json.loads(top.data)[0]  # units in the headers
