"""The filter and ranking language: what it computes, and everything it refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crystalformer.expressions import ExpressionError, parse
from crystalformer.screen import rank

COLUMNS = {
    "band_gap": np.array([0.5, 2.0, np.nan, 3.0]),
    "band_gap_std": np.array([0.1, 0.2, 0.3, 0.4]),
    "e_above_hull": np.array([0.0, 0.01, 0.2, 0.08]),
    "in_training": np.array([True, False, False, False]),
}
B, S, E = COLUMNS["band_gap"], COLUMNS["band_gap_std"], COLUMNS["e_above_hull"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the README's and the main job's expressions
        ("e_above_hull < 0.05 and band_gap > 1.5", (E < 0.05) & (B > 1.5)),
        ("e_above_hull < 0.1 and band_gap > 0.5", (E < 0.1) & (B > 0.5)),
        ("band_gap - 2 * band_gap_std", B - 2 * S),
        ("-e_above_hull", -E),
        # the rest of the language
        ("0.5 < band_gap <= 2", (B > 0.5) & (B <= 2)),
        ("not in_training and (band_gap >= 3 or e_above_hull == 0)", [False, False, False, True]),
        ("band_gap != 2", [True, False, True, True]),
        ("(band_gap + 1) / band_gap_std ** 2 * -1", -(B + 1) / S**2),
        ("abs(-band_gap) + sqrt(band_gap) + exp(-e_above_hull)", B + np.sqrt(B) + np.exp(-E)),
        ("log(band_gap) - log10(band_gap)", np.log(B) - np.log10(B)),
        (
            "minimum(band_gap, 1) + maximum(e_above_hull, 0.05)",
            np.minimum(B, 1) + np.maximum(E, 0.05),
        ),
        ("clip(band_gap, 1, 2.5)", np.clip(B, 1, 2.5)),
    ],
)
def test_expression_values_match_numpy(text, expected):
    np.testing.assert_array_equal(parse(text, "filter", list(COLUMNS)).evaluate(COLUMNS), expected)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("band_gap.__class__", "Attribute"),
        ("band_gap['x'] > 1", "Subscript"),
        ("open('pwned')", "calling open()"),
        ("band_gap.sum() > 1", "calling band_gap.sum()"),
        ("__import__('os').system('true')", "calling"),
        ("'text' == band_gap", "the literal 'text'"),
        ("True", "the literal True"),
        ("lambda: band_gap", "Lambda"),
        ("[x for x in band_gap]", "ListComp"),
        ("band_gap if band_gap else 0", "IfExp"),
        ("band_gap @ band_gap", "the operator"),
        ("band_gap & (e_above_hull < 1)", "the operator"),
        ("band_gap in band_gap", "the comparison"),
        ("abs(band_gap, 2)", "abs takes 1"),
        ("clip(band_gap, a_min=0, a_max=1)", "clip takes 3"),
        ("@band_gap > 1", "not an expression"),
        ("`band_gap` > 1", "not an expression"),
        ("density > 1", "no column density"),
        ("band_gap > 1" + "0" * 30, "too large"),
    ],
)
def test_everything_outside_the_language_is_refused_with_the_columns(text, named):
    with pytest.raises(ExpressionError) as refused:
        parse(text, "filter", list(COLUMNS))
    assert named in str(refused.value)
    assert "columns: band_gap, band_gap_std, e_above_hull, in_training" in str(refused.value)


def test_huge_powers_are_floats_not_hour_long_integers():
    value = parse("band_gap + 9 ** 9 ** 9", "rank-by", list(COLUMNS)).scores(COLUMNS)
    assert np.isinf(value[~np.isnan(B)]).all()


def test_a_filter_must_read_a_column_and_give_true_or_false():
    with pytest.raises(ExpressionError, match="one value for every row"):
        parse("1 > 0", "filter", list(COLUMNS)).mask(COLUMNS)
    with pytest.raises(ExpressionError, match="not true/false"):
        parse("band_gap * 2", "filter", list(COLUMNS)).mask(COLUMNS)


def test_the_shell_command_of_the_report_does_not_run(tmp_path):
    """The exploit of issue 14 through the ranking step (it ran `touch` before)."""
    pwned = tmp_path / "pwned"
    frame = pd.DataFrame({"id": ["a", "b"], "formation_energy_per_atom": [-1.0, 0.5]})
    exploit = (
        "formation_energy_per_atom.__class__.__init__.__globals__['sys'].modules['os']"
        f".system('touch {pwned}') == 0"
    )
    for option in ("filter_expr", "rank_by"):
        with pytest.raises(ExpressionError, match="not allowed"):
            rank(frame, **{option: exploit})
    assert not pwned.exists()


def test_ranking_uses_the_filter_and_the_score():
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], **COLUMNS})
    ranked = rank(frame, filter_expr="e_above_hull < 0.1", rank_by="band_gap - 2 * band_gap_std")
    assert ranked["id"].tolist() == ["d", "b", "a", "c"]
    assert ranked["rank"].tolist()[:3] == [1, 2, 3] and pd.isna(ranked["rank"].iloc[3])
