"""Screening candidates from pymatgen's AFLOW prototypes and ICSD substitution probabilities.

Every prototype and probability here is pymatgen's shipped data; configs are kept small
(few elements, small cells) so each generation takes well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import R_CUT
from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY
from pymatgen.analysis.structure_prediction.substitution_probability import (
    SubstitutionPredictor,
    SubstitutionProbability,
)
from pymatgen.core import Element, Species

from crystalformer.conf import ConfigError
from crystalformer.featurize import FeaturizeSettings, featurize_chunk, reduced_formula
from crystalformer.records import RawInput
from crystalformer.sources.candidates import (
    GenerateConfig,
    GenerationCounts,
    candidates_to_raw_inputs,
    generate_candidates,
    generate_config,
    write_candidates_table,
)
from crystalformer.sources.files import iter_path
from crystalformer.structures import crystal_from_structure, load, structure_hash

SMALL = GenerateConfig(
    elements=["Li", "Na", "K", "Mg", "Ca", "Zn", "Al", "Ti", "O", "S", "Cl", "F"], max_atoms=8
)
ROCKSALT = "AB_cF8_225_a_b-ClNa"  # NaCl, 2 sites
INFINITE_LAYER = "ABC2_tP4_123_d_a_f-CaCuO2"


def ids(config: GenerateConfig) -> list[str]:
    return [candidate.id for candidate in generate_candidates(config)]


@pytest.fixture(scope="module")
def small():
    return list(generate_candidates(SMALL))


def test_generation_is_the_same_in_another_process_with_another_hash_seed(small):
    script = (
        "import json, sys\n"
        "from crystalformer.sources.candidates import GenerateConfig, generate_candidates\n"
        "config = GenerateConfig.model_validate_json(sys.argv[1])\n"
        "print(json.dumps([(c.id, c.probability) for c in generate_candidates(config)]))"
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    result = subprocess.run(
        [sys.executable, "-c", script, SMALL.model_dump_json()],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    other = [tuple(row) for row in json.loads(result.stdout)]
    assert other == [(c.id, c.probability) for c in small]
    assert ids(SMALL) == [c.id for c in small]
    assert len(small) > 50


def test_ids_are_unique_file_stems_naming_parent_and_substitution(small):
    labels = {entry["tags"]["aflow"] for entry in AFLOW_PROTOTYPE_LIBRARY}
    assert len({c.id for c in small}) == len(small)
    for candidate in small:
        assert "/" not in candidate.id
        assert candidate.id == f"{candidate.parent}:{candidate.substitution.replace(' ', '')}"
        assert candidate.parent.split("-")[0] in labels
        assert "→" in candidate.substitution


def test_substitution_text_says_what_changed_in_the_structure():
    candidates = {c.substitution: c for c in generate_candidates(SMALL) if c.parent == ROCKSALT}
    assert reduced_formula(crystal_from_structure(candidates["Na→K"].structure)) == "ClK"
    assert reduced_formula(crystal_from_structure(candidates["Cl→F, Na→Li"].structure)) == "FLi"
    for candidate in candidates.values():
        assert all(isinstance(site.specie, Element) for site in candidate.structure)


def test_probabilities_are_pymatgens_list_prediction_for_rocksalt():
    """Every charge-balanced substitution pymatgen's predictor finds for NaCl, and no other."""
    sodium, chlorine = Species("Na", 1), Species("Cl", -1)
    expected: dict[str, float] = {}
    for prediction in SubstitutionPredictor(threshold=1e-3).list_prediction([chlorine, sodium]):
        new = {old: sp for sp, old in prediction["substitutions"].items()}
        if new[sodium].oxi_state + new[chlorine].oxi_state != 0:
            continue
        changes = [(o.symbol, n.symbol) for o, n in new.items() if o.symbol != n.symbol]
        text = ", ".join(f"{o}→{n}" for o, n in sorted(changes))
        if text:
            expected[text] = max(expected.get(text, 0.0), prediction["probability"])
    config = GenerateConfig(threshold=1e-3, max_atoms=2)
    found = {
        c.substitution: c.probability for c in generate_candidates(config) if c.parent == ROCKSALT
    }
    assert sorted(found) == sorted(expected)
    for text, probability in expected.items():
        assert found[text] == pytest.approx(probability, rel=1e-12)


def test_same_crystal_from_two_oxidation_assignments_is_kept_once_at_its_best():
    """CaCuO2 → FeCuO2 as Fe2+/Cu2+ and as Fe3+/Cu+: one crystal, the more probable kept."""
    config = GenerateConfig(threshold=1e-4, elements=["Ca", "Cu", "Fe", "O"], max_atoms=4)
    counts = GenerationCounts()
    candidates = list(generate_candidates(config, counts))
    assert counts.duplicates >= 1
    hashes = [structure_hash(crystal_from_structure(c.structure)) for c in candidates]
    assert len(set(hashes)) == len(hashes)
    iron = [c for c in candidates if c.id == f"{INFINITE_LAYER}:Ca→Fe"]
    assert len(iron) == 1
    table = SubstitutionProbability()
    best = (
        table.cond_prob(Species("Fe", 2), Species("Ca", 2))
        * table.cond_prob(Species("Cu", 2), Species("Cu", 2))
        * table.cond_prob(Species("O", -2), Species("O", -2))
    )
    assert iron[0].probability == pytest.approx(best, rel=1e-12)


def test_a_higher_threshold_keeps_a_subset_all_above_it(small):
    assert all(c.probability >= SMALL.threshold for c in small)
    strict = list(generate_candidates(SMALL.model_copy(update={"threshold": 1e-2})))
    assert 0 < len(strict) < len(small)
    assert all(c.probability >= 1e-2 for c in strict)
    assert {c.id for c in strict} <= {c.id for c in small}


def test_element_allow_list_gives_exactly_the_candidates_made_of_those_elements(small):
    elements = {"Na", "K", "Mg", "O", "Cl"}
    narrow = list(generate_candidates(SMALL.model_copy(update={"elements": sorted(elements)})))
    assert narrow
    assert [c.id for c in narrow] == [
        c.id for c in small if {el.symbol for el in c.structure.composition} <= elements
    ]


def test_caps_keep_the_first_candidates_in_order(small):
    capped = ids(SMALL.model_copy(update={"max_candidates": 7}))
    assert capped == [c.id for c in small[:7]]
    per_parent = ids(SMALL.model_copy(update={"max_substitutions_per_prototype": 2}))
    first_two: dict[str, list[str]] = {}
    for c in small:
        if len(first_two.setdefault(c.parent, [])) < 2:
            first_two[c.parent].append(c.id)
    assert per_parent == [i for group in first_two.values() for i in group]


def test_too_large_and_uncharged_prototypes_are_counted():
    counts = GenerationCounts()
    list(generate_candidates(SMALL, counts))
    assert counts.prototypes == len(AFLOW_PROTOTYPE_LIBRARY)
    assert counts.too_large > 0 and counts.no_oxidation_states > 0
    assert counts.candidates == counts.substitutions - counts.unchanged - counts.duplicates


def test_candidates_featurise_with_no_rejects(small):
    one_per_parent = list({c.parent: c for c in reversed(small)}.values())
    raws = list(candidates_to_raw_inputs(one_per_parent))
    assert all(isinstance(raw, RawInput) and raw.source == "generated" for raw in raws)
    result = featurize_chunk(raws, FeaturizeSettings(r_cut=R_CUT))
    assert result.rejects == []
    assert [row.crystal.id for row in result.rows] == [c.id for c in one_per_parent]
    for row, candidate in zip(result.rows, one_per_parent, strict=True):
        assert row.structure_hash == structure_hash(crystal_from_structure(candidate.structure))


def test_table_round_trips_through_iter_path(small, tmp_path):
    path = tmp_path / "candidates.parquet"
    assert write_candidates_table(iter(small), path) == len(small)
    raws = list(iter_path(path))
    assert [raw.id for raw in raws] == [c.id for c in small]
    for raw, candidate in zip(raws, small, strict=True):
        assert raw.format == "structure" and raw.source == "candidates"
        assert raw.targets == {"probability": candidate.probability}  # a numeric column
        crystal = load(raw)
        assert structure_hash(crystal) == structure_hash(
            crystal_from_structure(candidate.structure)
        )


def test_config_file_holds_the_defaults_and_bad_elements_are_named(tmp_path):
    assert generate_config() == GenerateConfig()
    (tmp_path / "generate.yaml").write_text("elements: [Na, Xx]\n")
    with pytest.raises(ConfigError, match="elements.*Xx"):
        generate_config(tmp_path)
