"""Shared fixtures: real crystals from the bundled snapshots (data/README.md), never made up.

Structures and labels come from data/snapshots; the only hand-made inputs are the broken
copies of real files under fixtures/bad (see fixtures/make_bad_inputs.py).
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from crystalformer.conf import datasets_config
from crystalformer.featurize import FeaturizeSettings
from crystalformer.records import Crystal, RawInput
from crystalformer.sources.files import TableSpec, iter_path, iter_table
from crystalformer.sources.snapshots import table_spec
from crystalformer.structures import load

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "data" / "snapshots"
BAD = Path(__file__).resolve().parent / "fixtures" / "bad"

# 3.5·σ_max + margin for the default model geometry (docs/model.md §3): r0 = 1.4 Å, b = 0.5.
R_CUT = 6.98

MP2018_SPEC = table_spec(datasets_config().datasets["mp2018"])
BITERNARY_SPEC = table_spec(datasets_config().datasets["mp20_biternary"])
# MP crystals of 2 to 14 atoms on which the encoders' invariances are tested
INVARIANCE_IDS = ["mp-1009019", "mp-1008813", "mp-1013526", "mp-10068", "mp-1001024"]

# The other encoders, small enough to train in seconds (conf/model/<encoder>.yaml syntax)
TINY_ENCODERS = {
    "crystalframer": "encoder: crystalframer\nn_layers: 1\ndim: 16\nn_heads: 2\nffn_dim: 32\n"
    "n_rbf: 8\nn_angle_rbf: 8\n",
    "sitenet": "encoder: sitenet\nmax_supercell_atoms: 16\nn_layers: 2\ndim: 16\nn_heads: 2\n"
    "interaction_dim: 8\nattention_hidden: 8\nn_rbf: 8\n",
}


def snapshot_rows(relative: str, spec: TableSpec, n: int | None = None) -> list[RawInput]:
    """The first n rows of a snapshot table as raw inputs (no Rejects expected there)."""
    rows = list(itertools.islice(iter_table(SNAPSHOTS / relative, spec), n))
    assert all(isinstance(row, RawInput) for row in rows)
    return rows


@pytest.fixture(scope="session")
def settings() -> FeaturizeSettings:
    return FeaturizeSettings(r_cut=R_CUT)


@pytest.fixture(scope="session")
def mp_raws() -> list[RawInput]:
    """300 MP crystals (CIF) with MP 2018.6.1 labels and the MEGNet split."""
    return snapshot_rows("mp2018_cgcnn/val.csv.gz", MP2018_SPEC, 300)


@pytest.fixture(scope="session")
def mp_crystals(mp_raws) -> dict[str, Crystal]:
    return {raw.id: load(raw) for raw in mp_raws}


@pytest.fixture(scope="session")
def mp_cifs() -> pd.Series:
    """Every CIF of mp2018_cgcnn/val.csv.gz by material_id."""
    frame = pd.read_csv(SNAPSHOTS / "mp2018_cgcnn/val.csv.gz", usecols=["material_id", "cif"])
    return frame.set_index("material_id")["cif"]


def structure_of(mp_cifs, material_id: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(mp_cifs[material_id], fmt="cif")


@pytest.fixture(scope="module")
def structures(mp_cifs) -> list[Structure]:
    """The invariance crystals, plus FeN with its Fe site shared 1:1 by Fe and Co."""
    chosen = [structure_of(mp_cifs, material_id) for material_id in INVARIANCE_IDS]
    disordered = chosen[0].copy()
    fe_site = next(k for k, site in enumerate(disordered) if site.specie.symbol == "Fe")
    disordered.replace(fe_site, {"Fe": 0.5, "Co": 0.5})
    return [*chosen, disordered]


@pytest.fixture(scope="session")
def biternary_raws() -> list[RawInput]:
    """200 binary and ternary MP-20 crystals (CIF) with their three labels."""
    return snapshot_rows("mp_20_biternary/val.csv.gz", BITERNARY_SPEC, 200)


@pytest.fixture(scope="session")
def jarvis_raws() -> list[RawInput]:
    """The 63 JARVIS dft_3d POSCARs of the ALIGNN sample."""
    spec = TableSpec(source="jarvis_dft_3d", id_column="jid", structure_column="poscar")
    return snapshot_rows("jarvis_dft3d_alignn_sample/sample.csv.gz", spec)


@pytest.fixture(scope="session")
def phonon_raws() -> list[RawInput]:
    """60 matbench_phonons crystals as pymatgen Structure dicts (a pandas split JSON)."""
    path = SNAPSHOTS / "matbench_phonons/matbench_phonons.json.gz"
    rows = list(itertools.islice(iter_path(path), 60))
    assert all(isinstance(row, RawInput) for row in rows)
    return rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one intra-op thread. With two, any other job on a 2-core machine makes
    the threads spin-wait for each other and a model test file runs ~8× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flow_run_logs(state) -> list[str]:
    """The messages a flow run (and its tasks) logged to the Prefect API; they are sent in
    the background, so the queue is drained first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=run))]
