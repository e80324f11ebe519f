"""Screening candidates: AFLOW prototypes or known crystals × ICSD substitution probabilities.

Every prototype and probability here is pymatgen's shipped data, and every known crystal a
real MP crystal from data/snapshots; configs are kept small (few elements, small cells, a
dozen parents) so each generation takes about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
from conftest import R_CUT, SNAPSHOTS
from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY
from pymatgen.analysis.structure_prediction.substitution_probability import (
    SubstitutionPredictor,
    SubstitutionProbability,
)
from pymatgen.core import Element, Species, Structure

from crystalformer.conf import ConfigError
from crystalformer.datasets import featurize_inputs
from crystalformer.featurize import (
    ELEMENT_SYMBOLS,
    FeaturizeSettings,
    featurize_chunk,
    reduced_formula,
)
from crystalformer.records import RawInput, Reject
from crystalformer.sources.candidates import (
    GenerateConfig,
    GenerationCounts,
    InputParents,
    Parent,
    aflow_prototypes,
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
    assert counts.parents == len(AFLOW_PROTOTYPE_LIBRARY)
    assert counts.too_large > 0 and counts.no_oxidation_states > 0
    dropped = counts.unchanged + counts.duplicates + counts.equal_to_parent
    assert counts.candidates == counts.substitutions - dropped


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


# --- candidates from known crystals (`generate --from`) ----------------------------------------

MP2018_VAL = SNAPSHOTS / "mp2018_cgcnn" / "val.csv.gz"
# Of the first 12 rows: MgS4Y2 (14 atoms) and B3CsF12Pb (17) have oxidation states, CCl4 has
# 80 atoms (over max_atoms), the other nine are intermetallics.
ROWS = 12
DEFAULT = GenerateConfig()


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """Twelve real MP CIFs (id = file stem), a truncated copy of one (not a crystal), and one
    of them as pymatgen JSON with half its Mg replaced by Ca (a disordered site)."""
    folder = tmp_path_factory.mktemp("known")
    rows = pd.read_csv(MP2018_VAL, nrows=ROWS)
    for row in rows.itertuples():
        (folder / f"{row.material_id}.cif").write_text(row.cif)
    (folder / "broken.cif").write_text(rows.cif[0][: len(rows.cif[0]) // 3])
    structure = Structure.from_str(rows.cif[0], fmt="cif")
    magnesium = next(i for i, site in enumerate(structure) if site.specie.symbol == "Mg")
    structure.replace(magnesium, {"Mg": 0.5, "Ca": 0.5})
    (folder / "mixed.json").write_text(json.dumps(structure.as_dict()))
    return folder


@pytest.fixture(scope="module")
def from_known(known):
    skipped: list[Reject] = []
    counts = GenerationCounts(on_skip=skipped.append)
    candidates = list(generate_candidates(DEFAULT, counts, InputParents((str(known),))))
    return candidates, counts, skipped


def parent_crystals(folder) -> dict:
    """The parents in `folder` that can be read, by id."""
    raws = [raw for raw in iter_path(folder) if isinstance(raw, RawInput)]
    return {raw.id: load(raw) for raw in raws if raw.id != "broken"}


def test_known_crystals_give_the_same_candidates_twice_with_unique_structures(known, from_known):
    candidates, counts, _ = from_known
    again = list(generate_candidates(DEFAULT, None, InputParents((str(known),))))
    assert [(c.id, c.probability, c.as_dict()) for c in again] == [
        (c.id, c.probability, c.as_dict()) for c in candidates
    ]
    assert {c.parent for c in candidates} == {"mp-1001024", "mp-1004528"}
    assert counts.candidates == len(candidates) > 30
    hashes = [structure_hash(crystal_from_structure(c.structure)) for c in candidates]
    assert len(set(hashes)) == len(hashes)
    assert not set(hashes) & {structure_hash(c) for c in parent_crystals(known).values()}


def test_skipped_parents_are_counted_with_their_reasons(from_known):
    candidates, counts, skipped = from_known
    assert counts.parents == ROWS + 2
    assert (counts.unreadable, counts.disordered, counts.too_large) == (1, 1, 1)
    assert counts.no_oxidation_states == ROWS - 3
    why = {reject.id: (reject.stage, reject.reason) for reject in skipped}
    assert len(why) == len(skipped) == counts.skipped() == ROWS
    assert set(why).isdisjoint(c.parent for c in candidates)  # a parent is one or the other
    assert why["broken"][0] == "parse" and "CIF" in why["broken"][1]
    assert "partially occupied" in why["mixed"][1]
    assert sum("more than max_atoms" in reason for _, reason in why.values()) == 1
    assert sum("no oxidation states of" in reason for _, reason in why.values()) == ROWS - 3


def test_every_candidate_from_known_crystals_is_charge_balanced_with_table_states(from_known):
    """Checked with pymatgen's table directly: some state of each element that the table
    knows makes the cell's charge zero."""
    states: dict[str, set[int]] = {}
    for species in SubstitutionProbability().species:
        states.setdefault(species.symbol, set()).add(int(species.oxi_state))
    candidates, _, _ = from_known
    for candidate in candidates:
        amounts = candidate.structure.composition.get_el_amt_dict()
        charges = {0}
        for element, amount in amounts.items():
            charges = {c + int(amount) * q for c in charges for q in states[element]}
        assert 0 in charges, candidate.id
        assert candidate.probability >= DEFAULT.threshold


def test_known_crystal_ids_name_parent_and_substitution(known, from_known):
    candidates, _, _ = from_known
    parents = parent_crystals(known)
    for candidate in candidates:
        assert candidate.id == f"{candidate.parent}:{candidate.substitution.replace(' ', '')}"
        changes = dict(pair.split("→") for pair in candidate.substitution.split(", "))
        old = [Element.from_Z(int(z)).symbol for z in parents[candidate.parent].numbers]
        new = [site.specie.symbol for site in candidate.structure]
        assert new == [changes.get(symbol, symbol) for symbol in old], candidate.id


def test_max_candidates_keeps_the_first_from_known_crystals(known, from_known):
    candidates, _, _ = from_known
    capped = GenerateConfig(max_candidates=5)
    counts = GenerationCounts()
    first = list(generate_candidates(capped, counts, InputParents((str(known),))))
    assert [c.id for c in first] == [c.id for c in candidates[:5]]
    assert counts.candidates == 5


def test_a_candidate_equal_to_any_parent_is_dropped_whichever_comes_first():
    """NaCl and the same cell with K for Na: each is the other's Na↔K substitution."""
    rocksalt = next(p for p in aflow_prototypes() if p.name == ROCKSALT)
    numbers = rocksalt.crystal.numbers.copy()
    numbers[numbers == 11] = 19
    potassium = Parent("KCl-on-NaCl-cell", replace(rocksalt.crystal, numbers=numbers))
    config = GenerateConfig(elements=["Na", "K", "Cl", "Br"], max_atoms=2)
    # NaBr and KBr from the first parent; from the second they are duplicates
    for parents, expected in [
        ([rocksalt, potassium], [f"{ROCKSALT}:Cl→Br", f"{ROCKSALT}:Cl→Br,Na→K"]),
        ([potassium, rocksalt], ["KCl-on-NaCl-cell:Cl→Br", "KCl-on-NaCl-cell:Cl→Br,K→Na"]),
    ]:
        counts = GenerationCounts()
        ids = [c.id for c in generate_candidates(config, counts, parents)]
        assert sorted(ids) == expected
        assert (counts.equal_to_parent, counts.duplicates) == (2, 2)


def test_a_parent_read_twice_is_skipped_not_substituted_again(known, from_known):
    candidates, _, _ = from_known
    counts = GenerationCounts()
    twice = list(generate_candidates(DEFAULT, counts, InputParents((str(known), str(known)))))
    assert [c.id for c in twice] == [c.id for c in candidates]
    # the second time, every parent read the first time (all but broken.cif) is a repeat
    assert (counts.repeated_ids, counts.unreadable, counts.disordered) == (ROWS + 1, 2, 1)
    assert counts.duplicates == 0


def test_featurised_dataset_folder_gives_the_candidates_of_its_crystals(known, from_known):
    candidates, _, _ = from_known
    dataset = known.parent / "known-dataset"
    featurize_inputs(iter_path(known), dataset, FeaturizeSettings(r_cut=R_CUT), progress=False)
    parents = InputParents((str(dataset),))
    assert parents.count() == sum(1 for _ in parents) == ROWS + 1  # broken.cif rejected
    from_dataset = list(generate_candidates(DEFAULT, None, parents))
    assert [c.id for c in from_dataset] == [c.id for c in candidates]


def test_progress_is_called_once_per_parent_and_the_count_is_known_first(known):
    parents = InputParents((str(known), "jarvis_sample"))
    ticks = []
    counts = GenerationCounts()
    list(generate_candidates(DEFAULT, counts, parents, lambda: ticks.append(1)))
    assert len(ticks) == counts.parents == parents.count() == ROWS + 2 + 63


def test_naming_nothing_is_refused_before_any_input_is_read(known):
    with pytest.raises(FileNotFoundError, match="'no-such-set' is neither a file"):
        InputParents((str(known), "no-such-set"))


def test_candidate_json_is_pymatgens_for_the_substituted_parent(known, from_known):
    candidates, _, _ = from_known
    parents = parent_crystals(known)
    for candidate in candidates[::7]:
        crystal = parents[candidate.parent]
        symbols = [ELEMENT_SYMBOLS[z - 1] for z in crystal.numbers.tolist()]
        parent = Structure(crystal.lattice, symbols, crystal.frac_coords)
        expected = parent.replace_species(dict(candidate.changes), in_place=False).as_dict()
        assert json.loads(candidate.structure_json()) == json.loads(json.dumps(expected))
