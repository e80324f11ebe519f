"""The refresh-data flow on a real (temporary) Prefect API, with MP and JARVIS offline."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import requests
from conftest import SNAPSHOTS, flow_run_logs
from prefect.testing.utilities import prefect_test_harness
from test_sources_mp import FAKE_KEY, api  # noqa: F401  (the recorded MP API fixture)

from crystalformer.shards import read_dataset
from crystalformer.sources.jarvis import figshare_file

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def by_dataset(results: list[dict]) -> dict[str, dict]:
    return {result["dataset"]: result for result in results}


def test_refresh_data_skips_missing_sources_and_second_run_does_no_work(
    api,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from flows.refresh import refresh_data

    monkeypatch.setenv("MP_API_KEY", FAKE_KEY)
    url, _ = figshare_file("dft_3d")
    api.rsps.get(url, body=requests.ConnectionError("no network in this test"))
    run = dict(
        sources=["snapshots", "materials_project", "jarvis"],
        datasets=["jarvis_sample"],
        data_root=str(tmp_path),
    )

    first = by_dataset(refresh_data(**run))
    assert set(first) == {"jarvis_sample", "materials_project"}  # jarvis skipped: no network
    assert first["jarvis_sample"]["accepted"] == 63
    assert first["materials_project"]["accepted"] == 5
    mp_rows = read_dataset(tmp_path / "datasets" / "materials_project")
    assert mp_rows.num_rows == 5
    assert mp_rows["e_above_hull"].null_count == 0

    calls_before = len(api.rsps.calls)
    second = by_dataset(refresh_data(**run))
    assert second["jarvis_sample"]["accepted"] == 0
    assert second["jarvis_sample"]["skipped"] == 63
    assert second["materials_project"]["accepted"] == 0
    assert second["materials_project"]["skipped"] == 5
    assert second["materials_project"]["version"] == first["materials_project"]["version"]
    full_document_calls = [
        c for c in api.rsps.calls[calls_before:] if "material_ids=" in c.request.url
    ]
    assert full_document_calls == []


def test_refresh_data_without_mp_key_skips_materials_project(tmp_path, monkeypatch):
    from flows.refresh import refresh_data

    monkeypatch.delenv("MP_API_KEY", raising=False)
    results = refresh_data(sources=["materials_project"], datasets=[], data_root=str(tmp_path))
    assert results == []
    assert not (tmp_path / "datasets" / "materials_project").exists()


def test_featurize_flow_featurises_a_registered_dataset(tmp_path):
    from flows.featurize import featurize

    result = featurize(sources=["jarvis_sample"], out=str(tmp_path / "ds"))
    assert (result["accepted"], result["rejected"]) == (63, 0)
    table = read_dataset(tmp_path / "ds", ["id", "formation_energy_per_atom"])
    assert table.num_rows == 63
    assert table["formation_energy_per_atom"].null_count == 20  # the sample's unlabelled rows


def test_train_all_trains_one_registered_model_per_property(tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.train import train_all

    properties = ["e_above_hull", "log10_bulk_modulus_vrh"]
    state = train_all(
        properties=properties, epochs=1, max_crystals=60, data_root=str(tmp_path),
        return_state=True,
    )  # fmt: skip
    rows = state.result()
    assert [row["property"] for row in rows] == properties
    assert [row["dataset"] for row in rows] == ["mpts52", "mp_elastic"]
    assert all(row["val_mae"] > 0 and "test_mae" in row for row in rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with get_client(sync_client=True) as prefect:
        artifacts = {a.key: a for a in prefect.read_latest_artifacts()}
    assert "train-all-summary" in artifacts
    for row in rows:
        experiment = client.get_experiment_by_name(row["dataset"])
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.params["target"] == row["property"]
        ui = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
        assert row["MLflow run"] == f"{ui}/runs/{run.info.run_id}"
        assert f"]({row['MLflow run']})" in artifacts["train-all-runs"].data  # a link
        name = f"crystalformer-{row['property']}"
        version = client.get_model_version_by_alias(name, "champion").version
        assert f"(http://127.0.0.1:5000/#/models/{name}/versions/{version})" in (
            artifacts["train-all-runs"].data
        )
    # Each missing dataset is featurised once, first, saying so in the flow's log.
    logs = flow_run_logs(state)
    for dataset, snapshot in (("mpts52", "mpts_52/val.csv.gz"),
                              ("mp_elastic", "mp_elastic_cgcnn/elastic.csv.gz")):  # fmt: skip
        inputs = len(pd.read_csv(SNAPSHOTS / snapshot))
        folder = tmp_path / "datasets" / dataset
        assert f"featurising {dataset} ({inputs} inputs) into {folder}" in logs, logs
        assert f"featurising: {inputs}/{inputs} inputs done (100%)" in " ".join(logs)
