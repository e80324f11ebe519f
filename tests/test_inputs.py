"""Readers: files, folders and tables become raw inputs (one per crystal) or read rejects.

Every table and structure here is a real snapshot row; the registered datasets must hand on
their labels exactly as the source CSV has them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import BAD, SNAPSHOTS
from pymatgen.core import Structure
from pymatgen.io.vasp import Poscar

from crystalformer.datasets import featurize_inputs
from crystalformer.featurize import featurize_chunk
from crystalformer.records import RawInput, Reject
from crystalformer.shards import read_dataset, read_rejects
from crystalformer.sources import files, resolve
from crystalformer.sources.files import TableSpec, TargetColumn, iter_path, iter_table
from crystalformer.sources.snapshots import registered_dataset, snapshot_inputs
from crystalformer.structures import load, structure_hash

VAL = SNAPSHOTS / "mp2018_cgcnn/val.csv.gz"
JARVIS = SNAPSHOTS / "jarvis_dft3d_alignn_sample/sample.csv.gz"
PHONONS = SNAPSHOTS / "matbench_phonons/matbench_phonons.json.gz"


def split(items) -> tuple[list[RawInput], list[Reject]]:
    items = list(items)
    raws = [item for item in items if isinstance(item, RawInput)]
    rejects = [item for item in items if isinstance(item, Reject)]
    assert len(raws) + len(rejects) == len(items)
    return raws, rejects


@pytest.fixture(scope="module")
def val_head() -> pd.DataFrame:
    """20 real MP rows with their CIFs and labels."""
    return pd.read_csv(VAL, nrows=20)


@pytest.fixture(scope="module")
def jarvis_frame() -> pd.DataFrame:
    return pd.read_csv(JARVIS)


# --- single files and folders -------------------------------------------------------------------


def test_structure_files_become_inputs_named_by_their_stem(tmp_path, val_head, jarvis_frame):
    cif_id, cif = val_head.material_id[0], val_head.cif[0]
    poscar = jarvis_frame.poscar[0]
    structure = Poscar.from_str(poscar).structure
    (tmp_path / f"{cif_id}.cif").write_text(cif)
    (tmp_path / "JVASP-10.vasp").write_text(poscar)
    (tmp_path / "relaxed").mkdir()
    (tmp_path / "relaxed" / "CONTCAR").write_text(poscar)
    (tmp_path / "JVASP-10b.poscar").write_text(poscar)
    (tmp_path / "JVASP-10c.json").write_text(json.dumps(structure.as_dict()))

    raws, rejects = split(iter_path(tmp_path))
    assert rejects == []
    found = {raw.id: raw for raw in raws}
    assert {k: v.format for k, v in found.items()} == {
        cif_id: "cif",
        "JVASP-10": "poscar",
        "CONTCAR": "poscar",
        "JVASP-10b": "poscar",
        "JVASP-10c": "structure",
    }
    assert found["CONTCAR"].origin == str(tmp_path / "relaxed" / "CONTCAR")
    assert {raw.source for raw in raws} == {tmp_path.name}
    assert found[cif_id].payload == cif
    same = {structure_hash(load(found[k])) for k in ("JVASP-10", "CONTCAR", "JVASP-10c")}
    assert len(same) == 1


def test_unknown_and_hidden_files_in_a_folder(tmp_path, val_head):
    (tmp_path / "a.cif").write_text(val_head.cif[0])
    (tmp_path / "notes.txt").write_text("measured at 300 K")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / ".hidden.cif").write_text("not read")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "b.cif").write_text("not read")

    raws, rejects = split(iter_path(tmp_path))
    assert [raw.id for raw in raws] == ["a"]
    assert sorted((r.id, r.stage) for r in rejects) == [("notes", "read"), ("picture", "read")]
    assert all("not a crystal input (unknown file type)" in r.reason for r in rejects)


def test_every_folder_entry_ends_in_a_shard_or_a_reject(tmp_path, val_head, settings):
    """Links that lead nowhere, links to folders and pipes are rejects with their reason,
    never silently skipped (nor read: a pipe would block the run)."""
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.cif").write_text(val_head.cif[0])
    (folder / "dangling.cif").symlink_to(folder / "gone.cif")
    (folder / "loop_a.cif").symlink_to(folder / "loop_b.cif")
    (folder / "loop_b.cif").symlink_to(folder / "loop_a.cif")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "linked.cif").symlink_to(folder / "good.cif")
    os.mkfifo(folder / "pipe.cif")
    inputs, _ = resolve(str(folder))
    summary = featurize_inputs(inputs, tmp_path / "out", settings, progress=False)
    assert sorted(read_dataset(tmp_path / "out", columns=["id"])["id"].to_pylist()) == [
        "good",
        "linked",
    ]
    rejects = {
        r["id"]: (r["stage"], r["reason"], r["origin"])
        for r in read_rejects(tmp_path / "out").to_pylist()
    }
    assert rejects == {
        "dangling": (
            "read",
            f"dangling symbolic link (to {folder / 'gone.cif'}, which does not exist)",
            str(folder / "dangling.cif"),
        ),
        "loop_a": ("read", "symbolic link loop", str(folder / "loop_a.cif")),
        "loop_b": ("read", "symbolic link loop", str(folder / "loop_b.cif")),
        "up": (
            "read",
            "symbolic link to a folder (not followed: links to folders can loop)",
            str(folder / "sub" / "up"),
        ),
        "pipe": ("read", "not a regular file (a pipe, socket or device)", str(folder / "pipe.cif")),
    }
    assert (summary.accepted, summary.rejected) == (2, 5)


def test_bad_fixture_folder_gives_one_item_per_file_and_never_raises(settings):
    raws, rejects = split(iter_path(BAD))
    assert [(r.id, r.stage) for r in rejects] == [("README", "read")]
    assert len(raws) == len(list(BAD.iterdir())) - 1
    result = featurize_chunk(raws, settings)
    assert result.rows == []
    assert sorted(r.id for r in result.rejects) == sorted(raw.id for raw in raws)


def test_cgcnn_style_folder_reads_the_cifs_and_rejects_the_side_files(tmp_path, val_head, settings):
    """The CGCNN layout: <id>.cif files, a header-less id_prop.csv and a labels JSON beside
    them. Neither side file may stop the run; both come back as rejects with a reason."""
    for material_id, cif in zip(val_head.material_id[:3], val_head.cif[:3], strict=True):
        (tmp_path / f"{material_id}.cif").write_text(cif)
    labels = val_head[["material_id", "formation_energy_per_atom_cgcnn"]].head(3)
    labels.to_csv(tmp_path / "id_prop.csv", header=False, index=False)
    shutil.copy(
        SNAPSHOTS / "leaderboard_labels/megnet_e_form.train_val.json.gz",
        tmp_path / "labels.json.gz",
    )

    raws, rejects = split(iter_path(tmp_path))
    assert [r.id for r in rejects] == ["id_prop"]
    assert rejects[0].stage == "read"
    assert "unreadable table" in rejects[0].reason
    assert "no id column" in rejects[0].reason
    ids = sorted(raw.id for raw in raws)
    assert ids == sorted([*val_head.material_id[:3], "labels"])
    labels_input = next(raw for raw in raws if raw.id == "labels")
    result = featurize_chunk([labels_input], settings)
    assert result.rejects[0].stage == "parse"
    assert "unreadable structure dict" in result.rejects[0].reason


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(iter_path(tmp_path / "nowhere"))


# --- tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_table_files_give_one_input_per_row_with_their_labels(tmp_path, val_head, suffix):
    path = tmp_path / f"mp_sample{suffix}"
    frame = val_head[["material_id", "formation_energy_per_atom_mp2018", "band_gap_mp2018", "cif"]]
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    raws, rejects = split(iter_path(path))
    assert rejects == []
    assert [raw.id for raw in raws] == frame.material_id.tolist()
    assert [raw.payload for raw in raws] == frame.cif.tolist()
    assert {raw.format for raw in raws} == {"cif"}
    assert {raw.source for raw in raws} == {"mp_sample"}
    for raw, (_, row) in zip(raws, frame.iterrows(), strict=True):
        assert raw.targets == {
            "formation_energy_per_atom_mp2018": row.formation_energy_per_atom_mp2018,
            "band_gap_mp2018": row.band_gap_mp2018,
        }
        assert raw.origin.startswith(f"{path}:row ")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_large_table_is_read_a_few_rows_at_a_time(tmp_path, val_head, suffix, monkeypatch):
    """A table is never held whole, even a Parquet file written as one row group: rows
    come in reads of ROWS_PER_READ, numbered across reads."""
    monkeypatch.setattr(files, "ROWS_PER_READ", 7)
    path = tmp_path / f"mp_sample{suffix}"
    frame = val_head[["material_id", "cif"]]
    if suffix == ".parquet":
        frame.to_parquet(path, row_group_size=len(frame))
    else:
        frame.to_csv(path, index=False)
    assert [len(read) for read in files._read_frames(path)] == [7, 7, 6]
    raws, rejects = split(iter_path(path))
    assert rejects == []
    assert [raw.id for raw in raws] == frame.material_id.tolist()
    assert [raw.origin for raw in raws] == [f"{path}:row {k}" for k in range(len(frame))]


def test_poscar_table_keeps_missing_labels_missing(jarvis_frame):
    raws, rejects = split(iter_path(JARVIS))
    assert rejects == []
    assert [raw.id for raw in raws] == jarvis_frame.jid.tolist()
    assert {raw.format for raw in raws} == {"poscar"}
    assert {raw.source for raw in raws} == {"sample"}
    numeric = [c for c in jarvis_frame.columns if jarvis_frame[c].dtype.kind == "f"]
    for raw, (_, row) in zip(raws, jarvis_frame.iterrows(), strict=True):
        assert set(raw.targets) == set(numeric)
        for name in numeric:
            expected = None if math.isnan(row[name]) else row[name]
            assert raw.targets[name] == expected


def test_structure_column_table_in_parquet(tmp_path, phonon_raws):
    frame = pd.DataFrame(
        {
            "id": [f"phonon-{raw.id}" for raw in phonon_raws[:10]],
            "structure": [json.dumps(raw.payload) for raw in phonon_raws[:10]],
            "last phdos peak": [raw.targets["last phdos peak"] for raw in phonon_raws[:10]],
        }
    )
    frame.to_parquet(tmp_path / "phonons.parquet")
    raws, rejects = split(iter_path(tmp_path / "phonons.parquet"))
    assert rejects == [] and len(raws) == 10
    for raw, original in zip(raws, phonon_raws, strict=False):
        assert raw.format == "structure"
        assert raw.targets == original.targets
        assert structure_hash(load(raw)) == structure_hash(load(original))


def test_pandas_split_json_of_matbench_phonons():
    with gzip.open(PHONONS, "rt") as handle:
        table = json.load(handle)
    raws, rejects = split(iter_path(PHONONS))
    assert rejects == []
    assert len(raws) == len(table["data"]) == 1265
    assert [raw.id for raw in raws] == [str(i) for i in table["index"]]
    assert {raw.format for raw in raws} == {"structure"}
    assert {raw.source for raw in raws} == {"matbench_phonons"}
    peak = table["columns"].index("last phdos peak")
    expected = [{"last phdos peak": row[peak]} for row in table["data"]]
    assert [raw.targets for raw in raws] == expected
    first = Structure.from_dict(table["data"][0][0])
    crystal = load(raws[0])
    assert np.allclose(crystal.lattice, first.lattice.matrix)


def test_split_json_with_an_id_column(tmp_path, phonon_raws):
    frame = pd.DataFrame(
        {
            "id": [f"mb-{raw.id}" for raw in phonon_raws[:5]],
            "structure": [raw.payload for raw in phonon_raws[:5]],
        }
    )
    frame.to_json(tmp_path / "few.json", orient="split", index=False)
    raws, rejects = split(iter_path(tmp_path / "few.json"))
    assert rejects == []
    assert [raw.id for raw in raws] == frame.id.tolist()
    assert all(load(raw).n_atoms > 0 for raw in raws)


def test_rows_without_id_or_structure_are_rejected_with_reason(tmp_path, val_head):
    frame = val_head[["material_id", "cif"]].head(4).copy()
    frame.loc[1, "material_id"] = None
    frame.loc[2, "cif"] = "   "
    frame.to_csv(tmp_path / "holes.csv", index=False)
    raws, rejects = split(iter_path(tmp_path / "holes.csv"))
    assert [raw.id for raw in raws] == [frame.material_id[0], frame.material_id[3]]
    assert [(r.id, r.stage, r.reason) for r in rejects] == [
        ("holes.csv#1", "read", "no id"),
        (frame.material_id[2], "read", "no structure in column 'cif'"),
    ]


def test_table_without_a_structure_column_is_rejected_in_a_folder(tmp_path, val_head):
    val_head[["material_id", "band_gap_mp2018"]].to_csv(tmp_path / "gaps.csv", index=False)
    raws, rejects = split(iter_path(tmp_path))
    assert raws == []
    assert len(rejects) == 1 and rejects[0].id == "gaps"
    assert "no structure column; expected one of cif, poscar, structure" in rejects[0].reason
    # Read directly with a spec (the registered datasets' way), a wrong table is an error.
    with pytest.raises(ValueError, match="no structure column"):
        list(iter_table(tmp_path / "gaps.csv", TableSpec(source="gaps")))


def test_log10_target_is_none_for_missing_or_non_positive_values():
    column = TargetColumn("bulk_modulus_vrh", "log10 GPa", "log10")
    assert column.value(100) == pytest.approx(2.0)
    assert column.value(0) is None
    assert column.value(-3.0) is None
    assert column.value(float("nan")) is None
    assert column.value("na") is None


# --- registered snapshot datasets (conf/datasets.yaml) --------------------------------------------

REGISTERED = {
    # name: (files, id column, split column, {target: (column, log10?)})
    "mp2018": (
        ["mp2018_cgcnn/train.csv.gz", "mp2018_cgcnn/val.csv.gz"],
        "material_id",
        "megnet_split",
        {
            "formation_energy_per_atom": ("formation_energy_per_atom_mp2018", False),
            "band_gap": ("band_gap_mp2018", False),
        },
    ),
    "mp_elastic": (
        ["mp_elastic_cgcnn/elastic.csv.gz"],
        "material_id",
        None,
        {
            "bulk_modulus_vrh": ("bulk_modulus_vrh", False),
            "shear_modulus_vrh": ("shear_modulus_vrh", False),
            "log10_bulk_modulus_vrh": ("bulk_modulus_vrh", True),
            "log10_shear_modulus_vrh": ("shear_modulus_vrh", True),
        },
    ),
    "mpts52": (
        ["mpts_52/val.csv.gz"],
        "material_id",
        None,
        {
            "e_above_hull": ("energy_above_hull", False),
            "formation_energy_per_atom": ("formation_energy_per_atom", False),
        },
    ),
    "mp20_biternary": (
        ["mp_20_biternary/val.csv.gz"],
        "material_id",
        None,
        {
            "e_above_hull": ("e_above_hull", False),
            "formation_energy_per_atom": ("formation_energy_per_atom", False),
            "band_gap": ("band_gap", False),
        },
    ),
    "jarvis_sample": (
        ["jarvis_dft3d_alignn_sample/sample.csv.gz"],
        "jid",
        None,
        {
            "formation_energy_per_atom": ("formation_energy_peratom", False),
            "optb88vdw_bandgap": ("optb88vdw_bandgap", False),
            "mbj_bandgap": ("mbj_bandgap", False),
            "e_above_hull": ("ehull", False),
            "optb88vdw_total_energy": ("optb88vdw_total_energy", False),
            "bulk_modulus_kv": ("bulk_modulus_kv", False),
            "shear_modulus_gv": ("shear_modulus_gv", False),
        },
    ),
}


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registered_dataset_targets_equal_the_raw_columns(name):
    files, id_column, split_column, targets = REGISTERED[name]
    dataset = registered_dataset(name)
    assert dataset is not None
    frame = pd.concat([pd.read_csv(SNAPSHOTS / f) for f in files], ignore_index=True)
    raws, rejects = split(snapshot_inputs(dataset))
    assert rejects == []
    assert [raw.id for raw in raws] == frame[id_column].astype(str).tolist()
    assert {raw.format for raw in raws} == {dataset.structure_column}
    assert [raw.payload for raw in raws[:50]] == frame[dataset.structure_column][:50].tolist()
    assert set(raws[0].targets) == set(targets)
    for target, (column, log10) in targets.items():
        raw_values = frame[column].to_numpy(dtype=float)
        expected = np.log10(np.where(raw_values > 0, raw_values, np.nan)) if log10 else raw_values
        got = np.array([np.nan if r.targets[target] is None else r.targets[target] for r in raws])
        assert np.array_equal(np.isnan(got), np.isnan(expected)), target
        assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=0, atol=1e-12)
    if split_column is None:
        assert {raw.split for raw in raws} == {None}


def test_mp2018_not_in_mp2018_split_maps_to_null():
    frame = pd.concat(
        [
            pd.read_csv(SNAPSHOTS / f, usecols=["material_id", "megnet_split"])
            for f in ("mp2018_cgcnn/train.csv.gz", "mp2018_cgcnn/val.csv.gz")
        ],
        ignore_index=True,
    )
    raws, _ = split(snapshot_inputs(registered_dataset("mp2018")))
    splits = [raw.split for raw in raws]
    expected = frame.megnet_split.replace({"not_in_mp2018": None}).tolist()
    assert splits == expected
    assert splits.count(None) == (frame.megnet_split == "not_in_mp2018").sum() == 236
    assert {"train", "val"} <= set(splits)
    orphans = [raw for raw in raws if raw.split is None]
    assert {raw.targets["formation_energy_per_atom"] for raw in orphans} == {None}
