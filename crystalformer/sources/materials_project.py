"""Materials Project through mp-api: an incremental fetch of summary documents into RawInputs.

A refresh runs in two phases so that it costs little when little changed: a light search lists
every id that matches the query with its `last_updated`, then full documents are requested only
for ids that are new or changed since the state the previous run returned. mp-api is imported
inside the fetch (it takes seconds to import), so turning documents into records needs only dicts.
The module registers `MaterialsProject` as the remote source `materials_project`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from crystalformer.records import RawInput, Reject
from crystalformer.sources.base import Credential, Fetched, RemoteSettings, register
from crystalformer.sources.errors import SourceUnavailable
from crystalformer.targets import clean_label, log10_positive

log = logging.getLogger(__name__)

SOURCE = "materials_project"
ORIGIN = "mp-api summary"
API_KEY_ENV = "MP_API_KEY"
CREDENTIAL = Credential(API_KEY_ENV, secret_block="mp-api-key")

# search() arguments the fetch sets itself: a query may not override them.
_RESERVED = frozenset(
    {"material_ids", "fields", "all_fields", "chunk_size", "num_chunks", "_page", "_sort_fields"}
)
# search() arguments that do not filter: a query of only these would be a whole-database download.
_NOT_FILTERS = frozenset({"include_gnome"})


class MaterialsProjectSettings(RemoteSettings):
    """conf/sources.yaml `materials_project`: the summary search to keep fetched."""

    dataset: str = SOURCE
    query: dict[str, Any] = Field(min_length=1)
    chunk_size: int = Field(1000, ge=1)


class MaterialsProject:
    """The remote source `materials_project`: incremental, needs MP_API_KEY."""

    name = SOURCE
    settings = MaterialsProjectSettings
    credential = CREDENTIAL

    def fetch(
        self,
        settings: MaterialsProjectSettings,
        folder: Path,
        known: Mapping[str, str],
        secret: str | None,
    ) -> Fetched:
        """The ids of the configured query that are new or changed since `known`."""
        query = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.query.items()}
        return fetch_materials_project(
            secret, query=query, known=dict(known), chunk_size=settings.chunk_size
        )


def fetch_materials_project(
    api_key: str | None,
    *,
    query: dict[str, Any],
    known: dict[str, str] | None = None,
    chunk_size: int = 1000,
) -> Fetched:
    """Fetch summary documents matching `query` that are not already in `known`.

    The result's `state` maps every id the query matched to its `last_updated` (UTC ISO
    text); pass it back as `known` next time. `unchanged` counts ids skipped because `known`
    already had that version.

    `query` holds keyword filters of mp-api's `summary.search`, e.g.
    `{"energy_above_hull": (0, 0.1), "num_sites": (1, 50)}`. It must filter something: without a
    filter mp-api downloads the whole database from S3. Network and server failures raise
    `SourceUnavailable`; no message or log line contains the key.
    """
    _check_query(query)
    if not api_key:
        raise ValueError(f"no Materials Project API key: set {API_KEY_ENV} or pass api_key")
    known = known or {}

    from mp_api.client import MPRester
    from mp_api.client.core import MPRestError
    from requests import RequestException

    _check_filter_names(query)
    try:
        # Plain dicts, not emmet document models: one malformed document then becomes one
        # reject instead of a validation error for its whole page.
        with MPRester(api_key, use_document_model=False, mute_progress_bars=True) as mpr:
            summary = mpr.materials.summary
            listing = summary.search(
                **query, fields=["material_id", "last_updated"], chunk_size=chunk_size
            )
            listed = {str(doc["material_id"]): _stamp(doc.get("last_updated")) for doc in listing}
            todo = [mid for mid, stamp in listed.items() if not stamp or known.get(mid) != stamp]
            log.info(
                "Materials Project: %d ids match the query, %d new or changed, %d unchanged",
                len(listed),
                len(todo),
                len(listed) - len(todo),
            )
            docs: list[Mapping[str, Any]] = []
            for start in range(0, len(todo), chunk_size):
                ids = todo[start : start + chunk_size]
                docs += summary.search(material_ids=ids, chunk_size=chunk_size)
    except (MPRestError, RequestException) as error:
        message = str(error).replace(api_key, "<MP_API_KEY>")
        raise SourceUnavailable(f"Materials Project request failed: {message}") from None

    refetch = set(todo)
    state = {mid: stamp for mid, stamp in listed.items() if mid not in refetch}
    result = Fetched(unchanged=len(listed) - len(todo), state=state)
    fetched = {str(doc.get("material_id")): doc for doc in docs}
    for mid in todo:
        doc = fetched.get(mid)
        if doc is None:
            reason = "matched the search but was missing when fetched; it is retried next run"
            result.rejects.append(Reject(mid, SOURCE, "read", reason, ORIGIN))
            continue
        item = summary_record(doc)
        (result.records if isinstance(item, RawInput) else result.rejects).append(item)
        state[mid] = _stamp(doc.get("last_updated")) or listed[mid]
    log.info("Materials Project: %d records, %d rejects", len(result.records), len(result.rejects))
    return result


def summary_record(doc: Mapping[str, Any]) -> RawInput | Reject:
    """One summary document as a RawInput with canonical target names, or a read-stage Reject."""
    mid = str(doc.get("material_id"))
    structure = doc.get("structure")
    if hasattr(structure, "as_dict"):  # a pymatgen Structure (mp-api document models)
        structure = structure.as_dict()
    if not isinstance(structure, Mapping) or "sites" not in structure:
        return Reject(mid, SOURCE, "read", "summary document has no structure", ORIGIN)
    bulk = _vrh(doc, "bulk_modulus", "k_vrh")
    shear = _vrh(doc, "shear_modulus", "g_vrh")
    targets = {
        "formation_energy_per_atom": clean_label(doc.get("formation_energy_per_atom")),
        "band_gap": clean_label(doc.get("band_gap")),
        "e_above_hull": clean_label(doc.get("energy_above_hull")),
        "bulk_modulus_vrh": bulk,
        "shear_modulus_vrh": shear,
        "log10_bulk_modulus_vrh": log10_positive(bulk),
        "log10_shear_modulus_vrh": log10_positive(shear),
    }
    return RawInput(mid, SOURCE, "structure", dict(structure), targets, None, ORIGIN)


def _vrh(doc: Mapping[str, Any], name: str, flat_name: str) -> float | None:
    """The Voigt-Reuss-Hill modulus in GPa: `{name: {"vrh": ...}}`, or the older flat field."""
    moduli = doc.get(name)
    value = moduli.get("vrh") if isinstance(moduli, Mapping) else None
    return clean_label(value if value is not None else doc.get(flat_name))


def _stamp(value: Any) -> str:
    """`last_updated` as UTC ISO text, whatever form it came in; "" when missing.

    The API sends ISO text, Mongo-style `{"$date": ...}` or monty `{"string": ...}`; comparing
    normalised text keeps a format change from looking like an update of every document.
    """
    if isinstance(value, Mapping):
        value = value.get("$date") or value.get("string")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(value, datetime):
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _check_query(query: Mapping[str, Any]) -> None:
    """Refuse queries that would not filter (mp-api then downloads everything) or clash."""
    clash = sorted(_RESERVED.intersection(query))
    if clash:
        raise ValueError(f"query may not set {clash}: fetch_materials_project sets them itself")
    if not any(v is not None for k, v in query.items() if k not in _NOT_FILTERS):
        raise ValueError(
            "empty Materials Project query: give at least one summary filter, e.g. "
            '{"energy_above_hull": (0, 0.1)}; without one mp-api downloads the whole database'
        )


def _check_filter_names(query: Mapping[str, Any]) -> None:
    """Name unknown filters here; mp-api would report them in a long colour-coded error."""
    from mp_api.client.routes.materials.summary import SummaryRester

    params = inspect.signature(SummaryRester.search).parameters
    known = {name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(
            f"unknown Materials Project summary filter(s) {unknown}: use keyword arguments of "
            "mp_api SummaryRester.search such as energy_above_hull, band_gap, num_sites, elements"
        )


register(MaterialsProject())
