"""prefect.yaml as a new user runs it: real server on loopback, deploy, worker, flow run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    # MLflow exports the tracking URI of any earlier in-process test: flows here use their own
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env = {
        **inherited,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "CRYSTALFORMER_HOME": str(ROOT),
    }
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("prefect server did not become healthy") from None
                time.sleep(1)
        yield env
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def prefect(env, *args, timeout=180) -> str:
    done = subprocess.run(
        [PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_refresh_data_deploys_with_cron_and_runs_on_a_worker(server, tmp_path):
    prefect(server, "work-pool", "create", "crystalformer", "--type", "process")
    prefect(server, "--no-prompt", "deploy", "--all")
    inspected = prefect(server, "deployment", "inspect", "refresh-data/refresh-data")
    assert "'cron': '0 3 * * 1'" in inspected

    data_root = tmp_path / "root"
    prefect(
        server,
        "deployment",
        "run",
        "refresh-data/refresh-data",
        "--param",
        'sources=["snapshots"]',
        "--param",
        'datasets=["jarvis_sample"]',
        "--param",
        f"data_root={data_root}",
    )
    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", "crystalformer", "--run-once"],
        env=server,
        cwd=tmp_path,  # the pull step must move the run into CRYSTALFORMER_HOME
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "Finished in state Completed()" in worker.stdout + worker.stderr
    manifest = json.loads((data_root / "datasets" / "jarvis_sample" / "manifest.json").read_text())
    assert sum(shard["rows"] for shard in manifest["shards"]) == 63


def test_train_all_runs_as_a_deployment_on_a_worker(server, tmp_path):
    """`prefect deployment run 'train-all/train-all'` as the README says, on a tiny budget."""
    from mlflow.tracking import MlflowClient

    prefect(server, "work-pool", "create", "crystalformer", "--type", "process", "--overwrite")
    prefect(server, "--no-prompt", "deploy", "--all")
    data_root = tmp_path / "root"
    properties = ["e_above_hull", "log10_shear_modulus_vrh"]
    prefect(
        server, "deployment", "run", "train-all/train-all",
        "--param", f"properties={json.dumps(properties)}",
        "--param", "epochs=1", "--param", "max_crystals=60",
        "--param", f"data_root={data_root}",
    )  # fmt: skip
    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", "crystalformer", "--run-once"],
        env=server,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "Finished in state Completed()" in worker.stdout + worker.stderr
    client = MlflowClient(f"sqlite:///{data_root / 'mlflow.db'}")
    targets = sorted(
        run.data.params["target"]
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    )
    assert targets == sorted(properties)
