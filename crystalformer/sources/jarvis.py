"""JARVIS-DFT through jarvis-tools: a download that fails cleanly, and records from its documents.

jarvis-tools downloads its figshare zips with no timeout and writes straight to the final path,
so an interrupted download leaves a broken zip that it will then trust forever. Here the file is
downloaded with a timeout to a temporary name, checked, and renamed into place; after that
jarvis-tools reads it without a request. The module registers `Jarvis` as the remote source
`jarvis`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydantic import Field
from pymatgen.core import Element

from crystalformer.records import RawInput, Reject
from crystalformer.sources.base import Fetched, RemoteSettings, register
from crystalformer.sources.errors import SourceUnavailable
from crystalformer.targets import clean_label

log = logging.getLogger(__name__)

# canonical target name -> key in a JARVIS dft_3d document (missing values are "na")
DFT3D_TARGETS = {
    "formation_energy_per_atom": "formation_energy_peratom",
    "optb88vdw_bandgap": "optb88vdw_bandgap",
    "mbj_bandgap": "mbj_bandgap",
    "e_above_hull": "ehull",
    "optb88vdw_total_energy": "optb88vdw_total_energy",
    "bulk_modulus_kv": "bulk_modulus_kv",
    "shear_modulus_gv": "shear_modulus_gv",
}


class JarvisSettings(RemoteSettings):
    """conf/sources.yaml `jarvis`: which figshare dataset, and how long to wait for data."""

    dataset: str = "jarvis_dft_3d"
    figshare_dataset: str = "dft_3d"
    timeout: float = Field(60, gt=0)


class Jarvis:
    """The remote source `jarvis`: a whole figshare dataset, downloaded once."""

    name = "jarvis"
    settings = JarvisSettings
    credential = None

    def fetch(
        self, settings: JarvisSettings, folder: Path, known: Mapping[str, str], secret: str | None
    ) -> Fetched:
        """Every document of the dataset; its zip is kept in `folder`/download."""
        dataset = settings.figshare_dataset
        docs = load_jarvis(dataset, Path(folder) / "download", timeout=settings.timeout)
        records, rejects = jarvis_records(docs, dataset=dataset)
        return Fetched(records, rejects)


def figshare_file(dataset: str) -> tuple[str, str]:
    """(download URL, JSON name inside the zip) of a dataset, as jarvis-tools knows them."""
    from jarvis.db.figshare import get_db_info

    info = get_db_info()
    if dataset not in info:
        raise ValueError(f"unknown JARVIS dataset {dataset!r}; jarvis-tools knows {sorted(info)}")
    url, json_name = info[dataset][:2]
    return url, json_name


def download_jarvis(dataset: str, store_dir: Path, timeout: float = 60) -> Path:
    """The dataset's zip in `store_dir`, downloaded only if it is not there yet.

    `timeout` bounds the connection and each wait for data, not the whole transfer. Network
    errors, HTTP errors and a download that is not a complete zip raise `SourceUnavailable`.
    """
    url, json_name = figshare_file(dataset)
    store_dir = Path(store_dir)
    target = store_dir / f"{json_name}.zip"  # the name jarvis.db.figshare looks for
    if target.is_file():
        return target
    store_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading JARVIS %s from %s", dataset, url)
    fd, tmp_name = tempfile.mkstemp(dir=store_dir, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, requests.get(url, timeout=timeout, stream=True) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_content(chunk_size=1 << 20):
                out.write(chunk)
        _check_zip(tmp, json_name)
        os.replace(tmp, target)
    except (requests.RequestException, zipfile.BadZipFile) as error:
        raise SourceUnavailable(
            f"JARVIS {dataset}: download from {url} failed ({error}); try again later, or put "
            f"{target.name} into {store_dir} by hand"
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_jarvis(dataset: str, store_dir: Path, timeout: float = 60) -> list[dict]:
    """The dataset's documents; downloads first if needed (jarvis-tools then makes no request)."""
    from jarvis.db.figshare import data

    download_jarvis(dataset, store_dir, timeout)
    return data(dataset, store_dir=str(store_dir))


def jarvis_records(
    docs: Iterable[Mapping[str, Any]], dataset: str = "dft_3d"
) -> tuple[list[RawInput], list[Reject]]:
    """JARVIS documents as "arrays" RawInputs with canonical targets; unreadable atoms → Reject."""
    source = f"jarvis_{dataset}"
    records: list[RawInput] = []
    rejects: list[Reject] = []
    for row, doc in enumerate(docs):
        jid = str(doc.get("jid", f"row-{row}"))
        origin = f"jarvis-tools {dataset} row {row}"
        try:
            payload = atoms_to_arrays(doc["atoms"])
        except (KeyError, TypeError, ValueError) as error:
            reason = f"atoms could not be read: {type(error).__name__}: {error}"
            rejects.append(Reject(jid, source, "read", reason, origin))
            continue
        targets = {name: clean_label(doc.get(key)) for name, key in DFT3D_TARGETS.items()}
        records.append(RawInput(jid, source, "arrays", payload, targets, None, origin))
    return records, rejects


def atoms_to_arrays(atoms: Mapping[str, Any]) -> dict[str, list]:
    """A jarvis `Atoms.to_dict()` as {lattice (rows = vectors, Å), frac_coords, numbers}."""
    lattice = np.asarray(atoms["lattice_mat"], dtype=float).reshape(3, 3)
    coords = np.asarray(atoms["coords"], dtype=float).reshape(-1, 3)
    elements = list(atoms["elements"])
    if len(elements) != len(coords):
        raise ValueError(f"{len(elements)} elements but {len(coords)} coordinates")
    numbers = [Element(symbol).Z for symbol in elements]
    if atoms.get("cartesian"):
        coords = np.linalg.solve(lattice.T, coords.T).T  # cart = frac @ lattice
    return {"lattice": lattice.tolist(), "frac_coords": coords.tolist(), "numbers": numbers}


def _check_zip(path: Path, json_name: str) -> None:
    """Raise BadZipFile unless `path` is a complete zip holding `json_name`."""
    with zipfile.ZipFile(path) as archive:
        if json_name not in archive.namelist():
            raise zipfile.BadZipFile(f"{json_name} is not in the downloaded zip")
        damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"{damaged} in the downloaded zip fails its CRC check")


register(Jarvis())
