"""Materials Project fetch through the real MPRester against a recorded, offline summary API.

The documents in fixtures/mp are real MP rows (see fixtures/make_source_payloads.py). A small
fake server answers mp-api's requests the way the API does ({"data": [...], "meta": {...}},
`_fields` projection, `material_ids` lookup, `_limit`/`_skip` pagination); any request to a URL
that is not mocked fails, so nothing reaches the network.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
import traceback
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import emmet.core
import pytest
import requests
import responses
from mp_api.client.core.client import _Rester
from mp_api.client.core.settings import MAPI_CLIENT_SETTINGS
from pymatgen.core import Structure

from crystalformer.records import RawInput
from crystalformer.sources.errors import SourceUnavailable
from crystalformer.sources.materials_project import (
    CREDENTIAL,
    fetch_materials_project,
    summary_record,
)

DOCS = json.loads(
    gzip.decompress((Path(__file__).parent / "fixtures/mp/summary_docs.json.gz").read_bytes())
)
ENDPOINT = MAPI_CLIENT_SETTINGS.ENDPOINT  # https://api.materialsproject.org/ unless overridden
SUMMARY_URL = ENDPOINT + "materials/summary/"
FAKE_KEY = "not-a-real-key-0123456789abcdefg"  # mp-api insists on 32 characters
QUERY = {"energy_above_hull": (0, 0.1), "num_sites": (1, 50)}
# Set by the test: what the heartbeat answers. mp-api compares `version` with its minimum emmet.
HEARTBEAT = {
    "status": "OK",
    "version": emmet.core.__version__,
    "db_version": "test-db",
    "access_controlled_batch_ids": [],
}


class FakeSummaryAPI:
    """Answers GET materials/summary/ like the MP API, from `docs` keyed by material_id."""

    def __init__(self, docs: list[dict]):
        self.docs = {doc["material_id"]: copy.deepcopy(doc) for doc in docs}
        self.hidden: set[str] = set()  # listed by searches but missing from id lookups
        self.rsps: responses.RequestsMock | None = None  # set by the fixture; holds the calls

    def __call__(self, request: requests.PreparedRequest):
        params = {k: v[0] for k, v in parse_qs(urlparse(request.url).query).items()}
        if "material_ids" in params:
            ids = params["material_ids"].split(",")
            matched = [self.docs[i] for i in ids if i in self.docs and i not in self.hidden]
        else:
            matched = list(self.docs.values())
        if "_fields" in params:
            fields = params["_fields"].split(",")
            matched = [{f: doc[f] for f in fields if f in doc} for doc in matched]
        skip = int(params.get("_skip", 0))
        page = matched[skip : skip + int(params["_limit"])]
        body = {"data": page, "meta": {"total_doc": len(matched), "max_limit": 1000}}
        return 200, {}, json.dumps(body)


@pytest.fixture
def api():
    """The fake API, with every mp-api request recorded in `api.rsps.calls`."""
    _Rester._get_heartbeat_info.cache_clear()  # mp-api caches the heartbeat per process
    fake = FakeSummaryAPI(DOCS)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(ENDPOINT + "heartbeat", json=HEARTBEAT)
        rsps.add_callback(responses.GET, SUMMARY_URL, callback=fake)
        fake.rsps = rsps
        yield fake
    _Rester._get_heartbeat_info.cache_clear()


def summary_params(api: FakeSummaryAPI) -> list[dict[str, str]]:
    """Query parameters of every summary request made so far."""
    return [
        {k: v[0] for k, v in parse_qs(urlparse(call.request.url).query).items()}
        for call in api.rsps.calls
        if call.request.url.startswith(SUMMARY_URL)
    ]


def test_full_fetch_returns_records_with_canonical_targets(api):
    fetch = fetch_materials_project(FAKE_KEY, query=QUERY, chunk_size=2)

    assert [r.id for r in fetch.records] == [doc["material_id"] for doc in DOCS]
    assert fetch.rejects == [] and fetch.unchanged == 0
    assert fetch.state == {doc["material_id"]: "2024-11-12T08:00:00+00:00" for doc in DOCS}
    for record, doc in zip(fetch.records, DOCS, strict=True):
        assert (record.source, record.format, record.split) == (
            "materials_project",
            "structure",
            None,
        )
        assert record.payload == doc["structure"]
        structure = Structure.from_dict(record.payload)
        assert structure.composition.reduced_formula == doc["formula_pretty"]
        t = record.targets
        assert t["formation_energy_per_atom"] == doc["formation_energy_per_atom"]
        assert t["band_gap"] == doc["band_gap"]
        assert t["e_above_hull"] == doc["energy_above_hull"]
    zn3n2 = fetch.records[0].targets  # mp-754553: K_VRH 132 GPa, G_VRH 57 GPa
    assert (zn3n2["bulk_modulus_vrh"], zn3n2["shear_modulus_vrh"]) == (132.0, 57.0)
    assert zn3n2["log10_bulk_modulus_vrh"] == pytest.approx(math.log10(132.0))
    assert zn3n2["log10_shear_modulus_vrh"] == pytest.approx(math.log10(57.0))
    no_moduli = fetch.records[2].targets  # mp-865981 has no elastic data
    assert no_moduli["bulk_modulus_vrh"] is None and no_moduli["log10_shear_modulus_vrh"] is None

    params = summary_params(api)
    listing = [p for p in params if p.get("_fields") == "material_id,last_updated"]
    lookups = [p for p in params if "material_ids" in p]
    assert len(listing) == 3 and len(lookups) == 3  # 5 ids in pages/chunks of 2
    assert listing[0]["energy_above_hull_min"] == "0" and listing[0]["nsites_max"] == "50"
    assert [p.get("_skip") for p in listing] == [None, "2", "4"]
    assert all(p["_all_fields"] == "True" for p in lookups)
    summary_calls = [c for c in api.rsps.calls if c.request.url.startswith(SUMMARY_URL)]
    assert all(c.request.headers["x-api-key"] == FAKE_KEY for c in summary_calls)


def test_second_fetch_with_returned_state_requests_no_documents(api):
    first = fetch_materials_project(FAKE_KEY, query=QUERY)
    api.rsps.calls.reset()

    second = fetch_materials_project(FAKE_KEY, query=QUERY, known=first.state)

    assert second.records == [] and second.rejects == []
    assert second.unchanged == len(DOCS) and second.state == first.state
    params = summary_params(api)
    assert len(params) == 1 and "material_ids" not in params[0]


def test_changed_last_updated_refetches_just_that_id(api):
    first = fetch_materials_project(FAKE_KEY, query=QUERY)
    api.docs["mp-20332"]["last_updated"] = "2025-03-01T10:30:00"  # naive text: read as UTC
    api.rsps.calls.reset()

    second = fetch_materials_project(FAKE_KEY, query=QUERY, known=first.state)

    assert [r.id for r in second.records] == ["mp-20332"] and second.unchanged == len(DOCS) - 1
    assert second.state["mp-20332"] == "2025-03-01T10:30:00+00:00"
    assert [p["material_ids"] for p in summary_params(api) if "material_ids" in p] == ["mp-20332"]


def test_document_without_structure_or_missing_document_is_rejected(api):
    api.docs["mp-865981"]["structure"] = None
    api.hidden.add("mp-20332")

    fetch = fetch_materials_project(FAKE_KEY, query=QUERY)

    assert len(fetch.records) == len(DOCS) - 2
    assert {(r.id, r.stage) for r in fetch.rejects} == {("mp-865981", "read"), ("mp-20332", "read")}
    assert "no structure" in next(r.reason for r in fetch.rejects if r.id == "mp-865981")
    assert "mp-20332" not in fetch.state  # so the next run asks again
    assert "mp-865981" in fetch.state


@pytest.mark.parametrize("query", [{}, {"band_gap": None}, {"include_gnome": True}])
def test_query_without_filter_is_refused(api, query):
    with pytest.raises(ValueError, match="empty Materials Project query"):
        fetch_materials_project(FAKE_KEY, query=query)
    assert len(api.rsps.calls) == 0


def test_unknown_or_reserved_query_keys_are_refused(api):
    with pytest.raises(ValueError, match="unknown Materials Project summary filter"):
        fetch_materials_project(FAKE_KEY, query={"e_above_hull": (0, 0.1)})
    with pytest.raises(ValueError, match="may not set"):
        fetch_materials_project(FAKE_KEY, query={**QUERY, "fields": ["band_gap"]})
    assert len(api.rsps.calls) == 0


def test_api_key_never_appears_in_logs_or_errors(api, caplog):
    caplog.set_level(logging.DEBUG)
    fetch_materials_project(FAKE_KEY, query=QUERY)
    api.rsps.replace(
        responses.GET, SUMMARY_URL, status=401, json={"detail": f"Invalid key {FAKE_KEY}"}
    )
    with pytest.raises(SourceUnavailable) as server_error:
        fetch_materials_project(FAKE_KEY, query=QUERY)
    api.rsps.replace(responses.GET, ENDPOINT + "heartbeat", body=requests.ConnectionError("down"))
    with pytest.raises(SourceUnavailable) as network_error:
        fetch_materials_project(FAKE_KEY, query=QUERY)

    assert "401" in str(server_error.value) and "<MP_API_KEY>" in str(server_error.value)
    for error in (server_error.value, network_error.value):
        assert FAKE_KEY not in "".join(traceback.format_exception(error))
    assert caplog.records and FAKE_KEY not in caplog.text
    assert all(FAKE_KEY not in str(record.args) for record in caplog.records)


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    assert CREDENTIAL.from_env() is None
    with pytest.raises(ValueError, match="MP_API_KEY"):
        fetch_materials_project(CREDENTIAL.from_env(), query=QUERY)
    monkeypatch.setenv("MP_API_KEY", FAKE_KEY)
    assert CREDENTIAL.from_env() == FAKE_KEY


def test_summary_record_reads_flat_moduli_and_pymatgen_structures():
    doc = {**DOCS[0], "structure": Structure.from_dict(DOCS[0]["structure"])}
    doc.update(bulk_modulus=None, shear_modulus={"vrh": None}, k_vrh=132.0, g_vrh="na")

    record = summary_record(doc)

    assert isinstance(record, RawInput) and record.payload["sites"]
    assert record.targets["bulk_modulus_vrh"] == 132.0
    assert record.targets["shear_modulus_vrh"] is None
