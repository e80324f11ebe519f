"""Ranking a screening run in bounded memory: the streamed ranked.parquet is the table that
sorting every row with pandas gives, column for column, on a real run with ties and NaNs.

The run: 30 MP-20 crystals in shards of 7 through the shipped e_above_hull model twice (an
ensemble whose spread is 0 for every crystal: the tie-break ties everywhere) and the shipped
formation-energy model (one model: its spread is NaN).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SNAPSHOTS

from crystalformer import ranking
from crystalformer.expressions import parse
from crystalformer.ranking import (
    pareto_front,
    parse_objectives,
    passing_head,
    report_sample,
    rows_with_ids,
    write_ranked,
)
from crystalformer.screen import screen
from crystalformer.screen_run import RANKED, RESULTS, ScreenOptions

MODELS = [
    "pretrained:e_above_hull",
    "pretrained:e_above_hull",
    "pretrained:formation_energy_per_atom",
]
PARETO = "formation_energy_per_atom:min,e_above_hull:min"


def reference_rank(frame, filter_expr=None, rank_by=None, tie_break=None, pareto=None):
    """The ranking as it was before it streamed: the whole table in pandas, sorted at once."""
    frame = frame.copy()
    columns = {
        name: frame[name].to_numpy()
        for name in frame.columns
        if pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name])
    }
    passes = np.ones(len(frame), bool)
    if filter_expr:
        passes = parse(filter_expr, "filter", list(columns)).mask(columns)
    frame["passes_filter"] = passes
    frame["score"] = parse(rank_by, "rank-by", list(columns)).scores(columns) if rank_by else np.nan
    keys = ["score", *([tie_break] if tie_break else []), "id"]
    ascending = [False] + [True] * (len(keys) - 1)
    order = frame.loc[passes].sort_values(keys, ascending=ascending, na_position="last").index
    frame["rank"] = pd.array([pd.NA] * len(frame), dtype="Int64")
    frame.loc[order, "rank"] = np.arange(1, len(order) + 1)
    if pareto:
        objectives = parse_objectives(pareto)
        values = np.stack([frame[c].to_numpy(np.float64) * s for c, s in objectives], axis=1)
        eligible = passes & np.isfinite(values).all(axis=1)
        front = np.zeros(len(frame), bool)
        front[np.flatnonzero(eligible)] = pareto_front(values[eligible])
        frame["pareto_front"] = front
    return frame.sort_values(["rank", "id"], na_position="last").reset_index(drop=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ranking")
    frame = pd.read_csv(SNAPSHOTS / "mp_20_biternary" / "val.csv.gz", nrows=30)
    frame[["material_id", "cif"]].to_csv(folder / "table.csv", index=False)
    summary = screen(ScreenOptions(
        [str(folder / "table.csv")], MODELS, folder / "out", filter_expr="e_above_hull < 0.3",
        pareto=PARETO, shard_size=7, progress=False, compiled=False, root=folder,
    ))  # fmt: skip
    assert summary.screened == 30
    return folder / "out"


def results_of(run: Path) -> list[Path]:
    return sorted((run / RESULTS).glob("*.parquet"))


def whole_table(run: Path) -> pd.DataFrame:
    return pa.concat_tables([pq.read_table(f) for f in results_of(run)]).to_pandas()


def written(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def test_the_run_has_ties_and_nans(run):
    results = whole_table(run)
    assert (results["e_above_hull_std"] == 0).all()  # one model twice
    assert results["formation_energy_per_atom_std"].isna().all()
    assert len(results_of(run)) == 5


def test_screen_writes_what_sorting_the_whole_table_gives(run):
    """The default ranking (lowest e_above_hull, ties by its spread: all 0, so by id), the
    run's filter and Pareto front; types, pandas metadata and row order alike."""
    expected = reference_rank(
        whole_table(run), filter_expr="e_above_hull < 0.3", rank_by="-e_above_hull",
        tie_break="e_above_hull_std", pareto=PARETO,
    )  # fmt: skip
    assert pq.read_table(run / RANKED).equals(written(expected), check_metadata=True)


@pytest.mark.parametrize(
    "options",
    [
        # every score ties: the tie-break ties too, then the id decides
        {"rank_by": "e_above_hull_n_models", "tie_break": "e_above_hull_std"},
        # true/false scores, a NaN tie-break, and a Pareto front of many equal points
        {"rank_by": "formation_energy_per_atom < -1", "tie_break": "formation_energy_per_atom_std",
         "pareto": "e_above_hull_n_models:max,formation_energy_per_atom_n_models:min"},
        # NaN scores (log of negatives) go last among the rows that pass
        {"filter_expr": "e_above_hull < 0.5", "rank_by": "log(e_above_hull - 0.05)",
         "tie_break": "n_atoms", "pareto": PARETO},
        # unranked: by id
        {"filter_expr": "not in_training and formation_energy_per_atom < -0.5"},
        {},
    ],
)  # fmt: skip
def test_merged_runs_give_the_whole_table_sorted(run, tmp_path, monkeypatch, options):
    """Runs of 4 rows read 3 at a time, merged 2 at once in rounds, row groups of 5."""
    for name, value in {
        "RUN_ROWS": 4,
        "READ_ROWS": 3,
        "MERGE_FAN_IN": 2,
        "ROW_GROUP_ROWS": 5,
    }.items():
        monkeypatch.setattr(ranking, name, value)
    out = tmp_path / RANKED
    ranked = write_ranked(results_of(run), out, **options)
    expected = reference_rank(whole_table(run), **options)
    assert pq.read_table(out).equals(written(expected), check_metadata=True)
    assert pq.ParquetFile(out).num_row_groups == 6  # written as it streamed
    assert (ranked.rows, ranked.passed) == (30, expected["passes_filter"].sum())
    assert [p.name for p in tmp_path.iterdir()] == [RANKED]  # no scratch left


def test_the_report_gets_the_top_the_front_and_every_nth_row(run, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "SAMPLE_ROWS", 10)  # every 3rd of 30 rows
    ranked = write_ranked(results_of(run), tmp_path / RANKED, rank_by="-e_above_hull",
                          pareto=PARETO, top=4)  # fmt: skip
    whole = pd.read_parquet(tmp_path / RANKED)
    kept = (whole.index % 3 == 0) | (whole["rank"] <= 4).fillna(False) | whole["pareto_front"]
    pd.testing.assert_frame_equal(ranked.sample, whole[kept].reset_index(drop=True))
    assert len(ranked.sample) < len(whole)
    assert list(ranked.sample["rank"][:4]) == [1, 2, 3, 4]
    # `crystalformer report` reads the same sample back, a row group at a time
    monkeypatch.setattr(ranking, "ROW_GROUP_ROWS", 4)
    ranked = write_ranked(results_of(run), tmp_path / RANKED, rank_by="-e_above_hull",
                          pareto=PARETO, top=4)  # fmt: skip
    assert pq.ParquetFile(tmp_path / RANKED).num_row_groups > 1
    pd.testing.assert_frame_equal(report_sample(tmp_path / RANKED, top=4), ranked.sample)


def test_rows_with_ids_are_the_labelled_rows_in_rank_order(run, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "ROW_GROUP_ROWS", 4)
    write_ranked(results_of(run), tmp_path / RANKED, rank_by="-e_above_hull")
    whole = pd.read_parquet(tmp_path / RANKED)
    ids = [*whole["id"].sample(9, random_state=0), "not-a-candidate"]
    expected = whole[whole["id"].isin(ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows_with_ids(tmp_path / RANKED, ids), expected)
    assert rows_with_ids(tmp_path / RANKED, []).columns.equals(whole.columns)


def test_a_killed_runs_scratch_is_removed(run, tmp_path):
    stale = tmp_path / f"{ranking.SCRATCH}k3x_9qa0"  # named as tempfile names ours
    stale.mkdir()
    (stale / "run.arrow").write_bytes(b"half")
    foreign = tmp_path / f"{ranking.SCRATCH}notes"  # a user's, not ours: kept
    foreign.mkdir()
    write_ranked(results_of(run), tmp_path / RANKED)
    assert not stale.exists()
    assert foreign.is_dir()


@pytest.mark.parametrize("top", [1, 4, 30])
def test_the_passing_head_is_read_from_the_first_row_groups(run, tmp_path, monkeypatch, top):
    monkeypatch.setattr(ranking, "ROW_GROUP_ROWS", 5)
    write_ranked(results_of(run), tmp_path / RANKED, filter_expr="e_above_hull < 0.03")
    whole = pd.read_parquet(tmp_path / RANKED)
    expected = whole[whole["passes_filter"]].head(top)
    assert 1 < whole["passes_filter"].sum() < 30  # some pass, some do not
    head = passing_head(tmp_path / RANKED, top)
    pd.testing.assert_frame_equal(head.reset_index(drop=True), expected.reset_index(drop=True))
