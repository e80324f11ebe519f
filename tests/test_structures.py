"""Parsing and validation: every input is accepted, or rejected with a reason a person reads.

The bad inputs are real snapshot crystals broken in one way each (fixtures/make_bad_inputs.py);
the good ones are the snapshots themselves, disordered versions of them, 1-atom cells and
supercells.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from conftest import BAD, R_CUT
from pymatgen.core import Structure
from pymatgen.io.cif import CifParser
from pymatgen.io.vasp import Poscar

from crystalformer import featurize as featurize_module
from crystalformer import structures
from crystalformer.conf import ConfigError, default_settings, featurize_config
from crystalformer.featurize import FeaturizeSettings, featurize, featurize_chunk
from crystalformer.lattice import expected_image_count
from crystalformer.records import Crystal, InputRejected, RawInput
from crystalformer.sources.files import iter_path
from crystalformer.structures import (
    crystal_from_structure,
    load,
    parse,
    site_types,
    structure_hash,
    validate,
)

# file in fixtures/bad -> (stage that rejects it, what the reason must say)
BAD_CASES = {
    "truncated.cif": ("parse", r"CIF syntax error at line 19: Wrong number of values in loop"),
    "truncated.vasp": ("parse", r"unreadable POSCAR: the file ends early \(truncated\?\)"),
    "empty.vasp": ("parse", r"empty poscar input"),
    "not_a_cif.cif": ("parse", r"CIF syntax error at line 1: expected block header"),
    "no_cell.cif": ("parse", r"missing or invalid cell parameters"),
    "flat_angles.cif": ("validate", r"degenerate lattice: cell volume .* nearly coplanar"),
    "zero_volume.cif": ("parse", r"degenerate lattice: volume \d\.\d+e-0[6-9] Å³ \(a, b, c, "),
    "zero_length.cif": (
        "parse",
        r"degenerate lattice: volume 0 Å³ \(a, b, c, alpha, beta, gamma: 0\.",
    ),
    "huge_lattice.vasp": (
        "validate",
        r"lattice vector length 1e\+300 Å is too large \(the maximum is 10000 Å\)",
    ),
    "nan_coordinate.cif": ("validate", r"non-finite number in the coordinates"),
    "nan_coordinate.vasp": ("validate", r"non-finite number in the coordinates"),
    "nan_coordinate.json": ("validate", r"non-finite number in the coordinates"),
    "inf_lattice.vasp": ("validate", r"non-finite number in the lattice"),
    "parallel_vectors.vasp": ("validate", r"degenerate lattice: cell volume 0 Å³"),
    "near_coplanar.vasp": ("validate", r"degenerate lattice: cell volume 0\.00975 Å³"),
    "dummy_element.cif": ("parse", r"dummy or unknown element X$"),
    "unknown_element.vasp": ("parse", r"dummy or unknown element Xx$"),
    "einsteinium.cif": ("validate", r"element Z=99 is not supported \(Z must be 1 to 98\)"),
    "close_atoms.cif": ("validate", r"atoms \d+ and \d+ are 0\.300 Å apart"),
    "self_image.vasp": (
        "validate",
        r"each atom is 0\.3 Å from its own periodic image",
    ),
    "overfull_site.cif": ("validate", r"occupancies of site \d+ sum to 1\.3 > 1$"),
    "shared_site.json": (
        "validate",
        r"occupancies of site 0 sum to 1\.5 > 1 \(atoms 0 and \d share it, 0\.000 Å apart\)",
    ),
    "negative_occupancy.cif": ("parse", r"occupancy -0\.5 of site Fe0: occupancies must be > 0"),
    "zero_occupancy.cif": ("parse", r"occupancy 0 of site Fe0: occupancies must be > 0"),
    "dense_grid.vasp": (
        "featurize",
        r"about 42,064,291 lattice images within r_cut = 6\.98 Å for 4913 atoms, above the cap "
        r"of 2,000,000 per crystal \(max_images in conf/featurize\.yaml\)",
    ),
}

FEN = "mp-1009019"  # rock-salt FeN, 2 atoms: the base of the disordered variants below
FE_ROW = "  Fe  Fe0  1  0.00000000  0.00000000  0.00000000  1\n"
N_ROW = "  N  N1  1  0.50000000  0.50000000  0.50000000  1\n"


def with_rows(cif: str, old: str, *rows: str) -> str:
    assert cif.count(old) == 1
    return cif.replace(old, "".join(rows))


def occupied(row: str, element: str, occupancy: float) -> str:
    symbol, label = row.split()[:2]
    row = row.replace(f"{symbol}  {label}", f"{element}  {element}{label[len(symbol) :]}")
    return row.replace(" 1\n", f" {occupancy}\n")


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_broken_real_file_is_rejected_with_its_reason(name, settings):
    items = list(iter_path(BAD / name))
    assert len(items) == 1 and isinstance(items[0], RawInput)
    result = featurize_chunk(items, settings)
    assert result.rows == [] and len(result.rejects) == 1
    reject = result.rejects[0]
    stage, pattern = BAD_CASES[name]
    assert reject.stage == stage, reject.reason
    assert re.search(pattern, reject.reason), reject.reason
    assert reject.id == name.split(".")[0]
    assert reject.origin == str(BAD / name)


def test_every_bad_fixture_has_an_expected_reason():
    assert {p.name for p in BAD.iterdir()} == set(BAD_CASES) | {"README.txt"}


def test_originals_of_the_bad_fixtures_are_accepted(mp_cifs, jarvis_raws, phonon_raws, settings):
    """Each bad file differs from an accepted real file only by its one defect."""
    originals = [
        RawInput(m, "mp2018", "cif", mp_cifs[m])
        for m in ("mp-1009019", "mp-1004532", "mp-1001024", "mp-81")
    ]
    originals += [r for r in jarvis_raws if r.id == "JVASP-10"] + phonon_raws[:1]
    assert len(originals) == 6
    result = featurize_chunk(originals, settings)
    assert result.rejects == []
    assert len(result.rows) == 6


def test_real_snapshot_crystals_are_all_accepted(
    mp_raws, biternary_raws, jarvis_raws, phonon_raws, settings
):
    """No false rejects on real data: CIF (MP), POSCAR (JARVIS) and structure dicts."""
    raws = mp_raws + biternary_raws + jarvis_raws + phonon_raws
    result = featurize_chunk(raws, settings)
    assert [(r.id, r.reason) for r in result.rejects] == []
    assert [row.crystal.id for row in result.rows] == [raw.id for raw in raws]


def test_empty_and_whitespace_payloads_are_rejected():
    for fmt in ("cif", "poscar", "structure"):
        for payload in ("", "  \n\t", None):
            with pytest.raises(InputRejected, match=f"empty {fmt} input") as caught:
                parse(RawInput("x", "test", fmt, payload))
            assert caught.value.stage == "parse"


def test_unknown_input_format_is_rejected():
    with pytest.raises(InputRejected, match="unknown input format 'xyz'"):
        parse(RawInput("x", "test", "xyz", "3\n\nH 0 0 0"))


# --- the readers agree ---------------------------------------------------------------------------


def assert_same_crystal(a: Crystal, b: Crystal, atol: float = 1e-6) -> None:
    """Same lattice up to orientation (Gram matrix), same sites in any order."""
    assert np.allclose(a.lattice @ a.lattice.T, b.lattice @ b.lattice.T, atol=atol)

    def sites(c: Crystal) -> tuple[np.ndarray, np.ndarray]:
        frac = np.round(c.frac_coords % 1.0, 6) % 1.0
        order = np.lexsort((frac[:, 2], frac[:, 1], frac[:, 0], c.numbers))
        return c.numbers[order], frac[order]

    (za, fa), (zb, fb) = sites(a), sites(b)
    assert np.array_equal(za, zb)
    assert np.allclose(fa, fb, atol=atol)


def pymatgen_cif(text: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CifParser.from_str(text).parse_structures(primitive=False)[0]


def test_fast_cif_reader_agrees_with_pymatgen(mp_raws, biternary_raws):
    for raw in mp_raws[:100] + biternary_raws[:50]:
        assert_same_crystal(parse(raw), crystal_from_structure(pymatgen_cif(raw.payload)))


def test_poscar_and_structure_dict_of_one_crystal_agree(jarvis_raws):
    for raw in jarvis_raws:
        structure = Poscar.from_str(raw.payload).structure
        from_poscar = parse(raw)
        for payload in (structure.as_dict(), json.dumps(structure.as_dict())):
            from_dict = parse(RawInput(raw.id, raw.source, "structure", payload))
            assert np.array_equal(from_dict.numbers, from_poscar.numbers)
            assert np.allclose(from_dict.lattice, from_poscar.lattice, atol=1e-12)
            assert np.allclose(from_dict.frac_coords, from_poscar.frac_coords, atol=1e-12)


def test_cif_written_from_a_structure_dict_reads_back_the_same(phonon_raws):
    for raw in phonon_raws[:20]:
        structure = Structure.from_dict(raw.payload)
        cif = RawInput(raw.id, raw.source, "cif", structure.to(fmt="cif"))
        assert_same_crystal(parse(raw), parse(cif), atol=1e-5)


def test_arrays_input_reads_a_real_crystal(mp_crystals):
    crystal = next(iter(mp_crystals.values()))
    payload = {
        "lattice": crystal.lattice.tolist(),
        "frac_coords": crystal.frac_coords.tolist(),
        "numbers": crystal.numbers.tolist(),
    }
    again = load(RawInput(crystal.id, "arrays", "arrays", payload))
    assert np.array_equal(again.numbers, crystal.numbers)
    assert np.array_equal(again.frac_coords, crystal.frac_coords)
    assert structure_hash(again) == structure_hash(crystal)


@pytest.mark.parametrize(
    ("change", "stage", "pattern"),
    [
        ({"numbers": None}, "parse", "malformed arrays input"),
        ({"lattice": [1.0, 2.0]}, "parse", "malformed arrays input"),
        ({"numbers": "drop-one"}, "parse", r"\d+ species for \d+ coordinates"),
        ({"numbers": "float"}, "parse", "atomic numbers must be integers"),
        ({"numbers": "zero"}, "validate", r"element Z=0 is not supported"),
        ({"numbers": "oganesson"}, "validate", r"element Z=118 is not supported"),
        ({"frac_coords": [], "numbers": []}, "validate", "structure has no atoms"),
        ({"lattice": np.diag([1e300] * 3).tolist()}, "validate", r"length 1e\+300 Å is too large"),
    ],
)
def test_malformed_arrays_input_is_rejected(mp_crystals, change, stage, pattern):
    crystal = next(c for c in mp_crystals.values() if c.n_atoms > 2)
    payload = {
        "lattice": crystal.lattice.tolist(),
        "frac_coords": crystal.frac_coords.tolist(),
        "numbers": crystal.numbers.tolist(),
    }
    numbers = {
        "drop-one": payload["numbers"][:-1],
        "float": [float(z) + 0.5 for z in payload["numbers"]],
        "zero": [0, *payload["numbers"][1:]],
        "oganesson": [118, *payload["numbers"][1:]],
    }
    for key, value in change.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = numbers.get(value, value) if isinstance(value, str) else value
    with pytest.raises(InputRejected, match=pattern) as caught:
        load(RawInput(crystal.id, "arrays", "arrays", payload))
    assert caught.value.stage == stage


# --- what must be accepted -----------------------------------------------------------------------


def test_disordered_site_is_accepted_with_its_full_composition(mp_cifs, settings):
    """A real FeN CIF with the Fe site shared 1:1 by Fe and Co, and N at 90 % occupancy."""
    cif = with_rows(mp_cifs[FEN], FE_ROW, occupied(FE_ROW, "Fe", 0.5), occupied(FE_ROW, "Co", 0.5))
    cif = with_rows(cif, N_ROW, occupied(N_ROW, "N", 0.9))
    crystal = load(RawInput(FEN, "mp2018", "cif", cif))
    assert crystal.n_atoms == 2
    d = crystal.disorder
    assert d is not None
    composition = sorted(zip(d.site.tolist(), d.z.tolist(), d.occupancy.tolist(), strict=True))
    metal = crystal.numbers.tolist().index(26)  # the largest share names the site (Fe: tie)
    nitrogen = 1 - metal
    assert composition == sorted([(metal, 26, 0.5), (metal, 27, 0.5), (nitrogen, 7, 0.9)])
    row = featurize(crystal, settings)
    assert row.formula == "Co0.5Fe0.5N0.9"
    assert row.crystal.disorder is not None
    # Occupancy-weighted one-hot: each site's weights are its composition, summing to <= 1.
    weights = np.zeros((crystal.n_atoms, 99))
    np.add.at(weights, (d.site, d.z), d.occupancy)
    assert weights[metal, [26, 27]].tolist() == [0.5, 0.5]
    assert weights[nitrogen, 7] == 0.9 and weights.sum() == pytest.approx(1.9)
    # Disorder is part of the structure's identity
    ordered = load(RawInput(FEN, "mp2018", "cif", mp_cifs[FEN]))
    assert structure_hash(crystal) != structure_hash(ordered)
    other = with_rows(
        mp_cifs[FEN], FE_ROW, occupied(FE_ROW, "Fe", 0.6), occupied(FE_ROW, "Co", 0.4)
    )
    assert structure_hash(load(RawInput(FEN, "mp2018", "cif", other))) != structure_hash(crystal)


def test_disordered_supercell_reduces_to_the_disordered_cell(mp_cifs, settings):
    cif = with_rows(mp_cifs[FEN], FE_ROW, occupied(FE_ROW, "Fe", 0.5), occupied(FE_ROW, "Co", 0.5))
    crystal = load(RawInput(FEN, "mp2018", "cif", cif))
    structure = pymatgen_cif(cif)
    big = crystal_from_structure(structure * (2, 2, 2), id=FEN)
    validate(big)
    assert big.n_atoms == 16
    reduced = featurize(big, settings)
    reference = featurize(crystal, settings)
    assert reduced.crystal.n_atoms == 2
    assert reduced.formula == reference.formula == "Co0.5Fe0.5N"
    d = reduced.crystal.disorder
    assert sorted(zip(d.z.tolist(), d.occupancy.tolist(), strict=True)) == [(26, 0.5), (27, 0.5)]
    assert sorted(site_types(reduced.crystal).tolist()) == [7, 1000]
    assert np.allclose(np.sort(reduced.images.dist), np.sort(reference.images.dist), atol=1e-6)


@pytest.mark.parametrize(("cobalt", "accepted"), [(0.5005, True), (0.502, False)])
def test_occupancy_sum_above_one_only_by_rounding_is_accepted(mp_cifs, cobalt, accepted):
    """Fe 0.5 + Co 0.5005 is a rounding slip (within 1e-3); Fe 0.5 + Co 0.502 is an error."""
    rows = occupied(FE_ROW, "Fe", 0.5), occupied(FE_ROW, "Co", cobalt)
    raw = RawInput(FEN, "mp2018", "cif", with_rows(mp_cifs[FEN], FE_ROW, *rows))
    if accepted:
        assert load(raw).disorder.occupancy.sum() == pytest.approx(0.5 + cobalt)
    else:
        with pytest.raises(InputRejected, match=r"sum to 1\.002 > 1"):
            load(raw)


@pytest.mark.parametrize("material_id", ["mp-81", "mp-8638", "mp-754382"])
def test_single_atom_cell_is_accepted(mp_cifs, settings, material_id):
    """fcc Au, hcp Tc and He: one atom, whose nearest neighbours are its own images."""
    crystal = load(RawInput(material_id, "mp2018", "cif", mp_cifs[material_id]))
    assert crystal.n_atoms == 1
    row = featurize(crystal, settings)
    assert row.crystal.n_atoms == 1
    assert set(row.images.pair.tolist()) == {0}
    nearest = np.sort(row.images.dist)[1]
    assert nearest == pytest.approx(np.linalg.norm(row.crystal.lattice, axis=1).min(), abs=1e-9)


def test_structure_hash_ignores_id_labels_and_split(mp_raws):
    raw = mp_raws[0]
    relabelled = RawInput("other-id", "elsewhere", "cif", raw.payload, {"band_gap": 9.9}, "test")
    assert structure_hash(load(raw)) == structure_hash(load(relabelled))


# --- symmetry, occupancies, lattice size and image cap -------------------------------------------

ROCK_SALT = """data_NaCl
_symmetry_space_group_name_H-M   '{symbol}'
_cell_length_a   5.64
_cell_length_b   5.64
_cell_length_c   5.64
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Na  Na1  0.0  0.0  0.0  1
  Cl  Cl1  0.5  0.5  0.5  1
"""


def nearest_other_atom(row) -> float:
    i, j = np.divmod(row.images.pair, row.crystal.n_atoms)
    return float(row.images.dist[i != j].min())


def test_cif_with_only_a_space_group_symbol_is_expanded(settings):
    """Rock salt given by its H-M symbol alone: 8 atoms in the conventional cell, 2 in the
    primitive one, Na-Cl 2.82 Å (read as P1 it was its asymmetric unit, Na-Cl 4.88 Å)."""
    crystal = load(RawInput("NaCl", "test", "cif", ROCK_SALT.format(symbol="F m -3 m")))
    assert crystal.n_atoms == 8
    row = featurize(crystal, settings)
    assert row.crystal.n_atoms == 2 and row.formula == "ClNa"
    assert nearest_other_atom(row) == pytest.approx(5.64 / 2, abs=1e-9)
    # The same sites under 'P 1' are the CsCl-like crystal written there.
    p1 = featurize(load(RawInput("NaCl", "test", "cif", ROCK_SALT.format(symbol="P 1"))), settings)
    assert p1.crystal.n_atoms == 2
    assert nearest_other_atom(p1) == pytest.approx(5.64 * np.sqrt(3) / 2, abs=1e-9)


def test_only_cifs_that_say_p1_take_the_fast_reader(mp_raws, monkeypatch):
    """MP's CIFs (symbol 'P 1', number 1, operation x,y,z) never reach pymatgen's reader; a
    CIF with a space-group symbol alone always does."""
    monkeypatch.setattr(structures, "CifParser", None)  # pymatgen's reader now fails
    for raw in mp_raws[:50]:
        assert parse(raw).n_atoms > 0
    with pytest.raises(InputRejected, match="unreadable CIF"):
        parse(RawInput("NaCl", "test", "cif", ROCK_SALT.format(symbol="F m -3 m")))


@pytest.mark.parametrize("occupancy", [-0.5, 0])
def test_structure_dict_with_an_occupancy_not_above_zero_is_rejected(phonon_raws, occupancy):
    data = json.loads(json.dumps(phonon_raws[0].payload))
    data["sites"][1]["species"][0]["occu"] = occupancy
    label = data["sites"][1]["label"]
    pattern = rf"occupancy {occupancy} of site {label}: occupancies must be > 0"
    with pytest.raises(InputRejected, match=pattern) as caught:
        load(RawInput("x", "test", "structure", data))
    assert caught.value.stage == "parse"


def test_unknown_cif_occupancy_still_reads_as_one(mp_cifs):
    """'?' is CIF's unknown, not an occupancy <= 0: pymatgen reads it as 1."""
    cif = with_rows(mp_cifs[FEN], FE_ROW, FE_ROW.replace(" 1\n", " ?\n"))
    crystal = load(RawInput(FEN, "mp2018", "cif", cif))
    assert crystal.n_atoms == 2 and crystal.disorder is None


def test_two_fully_occupied_cif_rows_on_one_site_name_the_site(mp_cifs, settings):
    """Fe and Co each at occupancy 1 at one position are one site of occupancy 2."""
    cif = with_rows(mp_cifs[FEN], FE_ROW, FE_ROW, FE_ROW.replace("Fe  Fe0", "Co  Co0"))
    result = featurize_chunk([RawInput(FEN, "mp2018", "cif", cif)], settings)
    assert [r.reason for r in result.rejects] == [
        "occupancies of site 0 sum to 2 > 1 (atoms 0 and 1 share it, 0.000 Å apart)"
    ]


def dense_grid() -> Crystal:
    return load(next(iter_path(BAD / "dense_grid.vasp")))


def test_crystal_over_the_image_cap_is_refused_before_anything_is_built(monkeypatch):
    """4913 carbon atoms 0.55 Å apart would list ~42 million images (81 s, 4 GB): the
    estimate refuses them before the cell is reduced or an image enumerated."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the crystal reached the reduction or the enumeration")

    monkeypatch.setattr(featurize_module, "reduce_cell", must_not_run)
    monkeypatch.setattr(featurize_module, "enumerate_images", must_not_run)
    crystal = dense_grid()
    for primitive in (True, False):
        with pytest.raises(InputRejected, match=r"about 42,064,291 lattice images") as caught:
            featurize(crystal, FeaturizeSettings(R_CUT, primitive=primitive))
        assert caught.value.stage == "featurize"
        assert "above the cap of 2,000,000 per crystal (max_images in" in caught.value.reason
    with pytest.raises(InputRejected, match=r"above the cap of 1,000 per crystal"):
        featurize(crystal, FeaturizeSettings(R_CUT, max_images=1000))


def test_image_cap_counts_the_exact_list_too(mp_crystals, settings):
    """The estimate is the mean count; a list a little longer than it is still capped."""
    for crystal in mp_crystals.values():
        exact = len(featurize(crystal, settings).images.dist)
        if expected_image_count(crystal.lattice, crystal.n_atoms, R_CUT) < exact - 1:
            break
    capped = FeaturizeSettings(R_CUT, max_images=exact - 1)
    with pytest.raises(InputRejected, match=rf"^{exact:,} lattice images within r_cut"):
        featurize(crystal, capped)


def test_image_cap_is_a_validated_setting_that_is_no_part_of_a_dataset(tmp_path):
    assert default_settings().max_images == 2_000_000
    assert FeaturizeSettings(R_CUT, max_images=10) == FeaturizeSettings(R_CUT)
    (tmp_path / "featurize.yaml").write_text("max_images: 0\n")
    with pytest.raises(ConfigError, match="max_images"):
        featurize_config(tmp_path)
