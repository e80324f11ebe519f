"""JARVIS download (through `responses`, never the network) and dft_3d documents → RawInputs.

fixtures/jarvis holds real dft_3d documents (see fixtures/make_source_payloads.py); the tests zip
them under the JSON name jarvis-tools expects, which is what figshare serves.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import responses
from pymatgen.io.vasp import Poscar

from crystalformer.sources.errors import SourceUnavailable
from crystalformer.sources.jarvis import (
    download_jarvis,
    figshare_file,
    jarvis_records,
    load_jarvis,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = json.loads(
    gzip.decompress((ROOT / "tests/fixtures/jarvis/dft_3d_docs.json.gz").read_bytes())
)
SAMPLE = ROOT / "data/snapshots/jarvis_dft3d_alignn_sample/sample.csv.gz"
URL, JSON_NAME = figshare_file("dft_3d")


def dft3d_zip(docs: list[dict] = DOCS) -> bytes:
    """The documents as figshare serves dft_3d: one JSON list in a zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(JSON_NAME, json.dumps(docs))
    return buffer.getvalue()


@responses.activate
def test_download_writes_the_zip_once(tmp_path):
    responses.get(URL, body=dft3d_zip(), content_type="application/zip")

    path = download_jarvis("dft_3d", tmp_path / "store", timeout=5)
    again = download_jarvis("dft_3d", tmp_path / "store", timeout=5)

    assert path == again == tmp_path / "store" / f"{JSON_NAME}.zip"
    assert json.loads(zipfile.ZipFile(path).read(JSON_NAME)) == DOCS
    assert len(responses.calls) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@responses.activate
def test_load_reads_the_download_through_jarvis_tools(tmp_path):
    responses.get(URL, body=dft3d_zip(), content_type="application/zip")

    assert load_jarvis("dft_3d", tmp_path, timeout=5) == DOCS
    assert load_jarvis("dft_3d", tmp_path, timeout=5) == DOCS
    assert len(responses.calls) == 1


@pytest.mark.parametrize(
    "failure",
    [
        {"body": requests.Timeout("read timed out")},
        {"body": requests.ConnectionError("connection refused")},
        {"status": 503, "body": "Service Unavailable"},
        {"body": b"<html>not a zip</html>"},
        {"body": dft3d_zip()[:-200]},  # truncated transfer
        {"body": b"PK\x05\x06" + bytes(18)},  # an empty zip
    ],
    ids=["timeout", "connection", "http-503", "not-zip", "truncated", "no-json-inside"],
)
@responses.activate
def test_failed_download_raises_source_unavailable_and_leaves_nothing(tmp_path, failure):
    responses.get(URL, **failure)

    with pytest.raises(SourceUnavailable, match="JARVIS dft_3d"):
        download_jarvis("dft_3d", tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown JARVIS dataset 'dft_4d'"):
        download_jarvis("dft_4d", tmp_path)


def test_records_carry_canonical_targets_and_na_becomes_none():
    records, rejects = jarvis_records(DOCS)

    assert rejects == []
    assert [r.id for r in records] == [doc["jid"] for doc in DOCS]
    by_id = {r.id: r for r in records}
    vse2 = by_id["JVASP-10"]
    assert (vse2.source, vse2.format, vse2.split) == ("jarvis_dft_3d", "arrays", None)
    assert vse2.targets == {
        "formation_energy_per_atom": -0.71026,
        "optb88vdw_bandgap": 0.0,
        "mbj_bandgap": 0.0,
        "e_above_hull": 1.875230311111111,
        "optb88vdw_total_energy": -3.87823,
        "bulk_modulus_kv": 48.79,
        "shear_modulus_gv": 33.05,
    }
    partial = by_id["JVASP-107772"].targets  # no elastic data in dft_3d: "na"
    assert partial["bulk_modulus_kv"] is None and partial["shear_modulus_gv"] is None
    assert partial["formation_energy_per_atom"] == -0.00064
    assert all(v is None for v in by_id["JVASP-13526"].targets.values())


def test_arrays_payload_matches_pymatgen_reading_the_same_poscar():
    records, _ = jarvis_records(DOCS)
    poscars = pd.read_csv(SAMPLE).set_index("jid")["poscar"]

    for record in records:
        structure = Poscar.from_str(poscars[record.id]).structure
        payload = record.payload
        np.testing.assert_allclose(payload["lattice"], structure.lattice.matrix, atol=1e-9)
        np.testing.assert_allclose(payload["frac_coords"], structure.frac_coords, atol=1e-9)
        assert payload["numbers"] == list(structure.atomic_numbers)


def test_cartesian_coordinates_are_made_fractional():
    doc = copy.deepcopy(DOCS[0])
    atoms = doc["atoms"]
    atoms["coords"] = (np.array(atoms["coords"]) @ np.array(atoms["lattice_mat"])).tolist()
    atoms["cartesian"] = True

    (record,), _ = jarvis_records([doc])

    np.testing.assert_allclose(
        record.payload["frac_coords"], DOCS[0]["atoms"]["coords"], atol=1e-12
    )


def test_unreadable_atoms_become_read_rejects():
    unknown = copy.deepcopy(DOCS[0])
    unknown["atoms"]["elements"][0] = "Xx"
    short = copy.deepcopy(DOCS[1])
    short["atoms"]["elements"] = short["atoms"]["elements"][:-1]
    no_atoms = {k: v for k, v in DOCS[2].items() if k != "atoms"}

    records, rejects = jarvis_records([unknown, short, no_atoms, DOCS[3]])

    assert [r.id for r in records] == [DOCS[3]["jid"]]
    assert [(r.id, r.source, r.stage) for r in rejects] == [
        (DOCS[0]["jid"], "jarvis_dft_3d", "read"),
        (DOCS[1]["jid"], "jarvis_dft_3d", "read"),
        (DOCS[2]["jid"], "jarvis_dft_3d", "read"),
    ]
    assert "'Xx' is not a valid Element" in rejects[0].reason
    assert "elements but" in rejects[1].reason
    assert "atoms" in rejects[2].reason
