"""The featurize pipeline: every input ends once, in a shard or in the rejects; re-runs skip what
is done, pick up what changed, and resume after a kill; Dask gives what the serial path gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import BAD, MP2018_SPEC, R_CUT, SNAPSHOTS, snapshot_rows

from crystalformer.datasets import (
    WORKER_MALLOC,
    dask_client,
    featurize_inputs,
    featurize_sources,
)
from crystalformer.featurize import FeaturizeSettings
from crystalformer.records import RawInput, Reject
from crystalformer.shards import (
    DUPLICATE,
    LOCK,
    MANIFEST,
    REJECTS,
    DatasetMismatch,
    Manifest,
    read_dataset,
    read_rejects,
    sha256_of,
)
from crystalformer.sources import count_all, resolve_all
from crystalformer.sources.files import iter_path

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def good(mp_raws) -> list[RawInput]:
    return mp_raws[:60]


@pytest.fixture(scope="module")
def mixed(good) -> list[RawInput | Reject]:
    """60 real MP crystals, every broken fixture file (one is an unknown file: a read
    reject), and a second copy of one id read from another place."""
    broken = list(iter_path(BAD))
    duplicate = dataclasses.replace(good[3], origin="second copy")
    return good[:30] + broken + [duplicate] + good[30:]


def dataset_ids(out: Path) -> list[str]:
    return read_dataset(out, columns=["id"])["id"].to_pylist()


def folder_files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def assert_every_input_once(inputs: list[RawInput | Reject], out: Path) -> None:
    """Each input item is one shard row or one reject; a second copy of an id is a
    'duplicate' reject; no id is both a row and a (non-duplicate) reject."""
    ids = dataset_ids(out)
    rejects = read_rejects(out).to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the shards twice"
    assert len(ids) + len(rejects) == len(inputs)
    assert Counter(ids) + Counter(r["id"] for r in rejects) == Counter(i.id for i in inputs)
    assert not set(ids) & {r["id"] for r in rejects if r["stage"] != DUPLICATE}
    repeated = {k for k, n in Counter(i.id for i in inputs).items() if n > 1}
    assert {r["id"] for r in rejects if r["stage"] == DUPLICATE} == repeated
    manifest = Manifest.load(out)
    assert sum(s.rows for s in manifest.shards) == len(ids)
    assert manifest.rejects == len(rejects)


def test_every_input_ends_in_a_shard_or_the_rejects(mixed, good, settings, tmp_path):
    summary = featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    assert_every_input_once(mixed, tmp_path)
    assert sorted(dataset_ids(tmp_path)) == sorted(raw.id for raw in good)
    assert summary.accepted == len(good)
    assert summary.rejected == len(mixed) - len(good)
    rejects = {r["id"]: r for r in read_rejects(tmp_path).to_pylist()}
    assert rejects["README"]["stage"] == "read"
    assert rejects[good[3].id]["stage"] == DUPLICATE
    assert rejects[good[3].id]["origin"] == "second copy"
    assert "already read from" in rejects[good[3].id]["reason"]
    assert rejects["close_atoms"]["stage"] == "validate"


def test_rerun_skips_everything_already_featurised(mixed, good, settings, tmp_path):
    featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    before = folder_files(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    again = featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    assert again.accepted == 0
    assert again.skipped == len(good)
    assert again.shards == 0
    assert folder_files(tmp_path) == before
    after = json.loads((tmp_path / MANIFEST).read_text())
    assert after["version"] == manifest["version"] == 1
    assert after["shards"] == manifest["shards"]
    assert_every_input_once(mixed, tmp_path)


def test_changed_label_refeaturises_only_that_row(good, settings, tmp_path, mp_cgcnn_labels):
    featurize_inputs(good, tmp_path, settings, shard_size=16, progress=False)
    # The source revises one label: the CGCNN-era value of the same crystal replaces MP 2018's.
    target = next(
        raw
        for raw in good
        if abs(mp_cgcnn_labels[raw.id] - raw.targets["formation_energy_per_atom"]) > 1e-3
    )
    revised = dataclasses.replace(
        target,
        targets={**target.targets, "formation_energy_per_atom": mp_cgcnn_labels[target.id]},
    )
    inputs = [revised if raw is target else raw for raw in good]
    summary = featurize_inputs(inputs, tmp_path, settings, shard_size=16, progress=False)
    assert (summary.accepted, summary.skipped, summary.rejected) == (1, len(good) - 1, 0)
    assert summary.version == 2
    table = read_dataset(tmp_path, columns=["id", "formation_energy_per_atom"]).to_pylist()
    assert len(table) == len(good)
    values = {row["id"]: row["formation_energy_per_atom"] for row in table}
    assert values[target.id] == mp_cgcnn_labels[target.id]
    for raw in good:
        if raw is not target:
            assert values[raw.id] == raw.targets["formation_energy_per_atom"]
    assert_every_input_once(inputs, tmp_path)
    listed = {s.file for s in Manifest.load(tmp_path).shards}
    assert {p.name for p in tmp_path.glob("*.parquet")} == listed | {REJECTS}


@pytest.fixture(scope="module")
def mp_cgcnn_labels() -> dict[str, float]:
    frame = pd.read_csv(
        SNAPSHOTS / "mp2018_cgcnn/val.csv.gz",
        usecols=["material_id", "formation_energy_per_atom_cgcnn"],
    )
    return dict(zip(frame.material_id, frame.formation_energy_per_atom_cgcnn, strict=True))


def test_id_that_becomes_invalid_moves_to_the_rejects_and_back(good, settings, tmp_path):
    featurize_inputs(good, tmp_path, settings, shard_size=16, progress=False)
    victim = good[7]
    cut = victim.payload[: victim.payload.index("_atom_site_occupancy") + 40]
    broken = dataclasses.replace(victim, payload=cut)
    inputs = [broken if raw is victim else raw for raw in good]
    summary = featurize_inputs(inputs, tmp_path, settings, shard_size=16, progress=False)
    assert (summary.accepted, summary.rejected) == (0, 1)
    assert victim.id not in dataset_ids(tmp_path)
    rejects = read_rejects(tmp_path).to_pylist()
    assert [(r["id"], r["stage"]) for r in rejects] == [(victim.id, "parse")]
    assert "unreadable CIF" in rejects[0]["reason"]
    assert_every_input_once(inputs, tmp_path)
    # Fixed at the source: it comes back as a row and leaves the rejects.
    summary = featurize_inputs(good, tmp_path, settings, shard_size=16, progress=False)
    assert (summary.accepted, summary.rejected, summary.skipped) == (1, 0, len(good) - 1)
    assert read_rejects(tmp_path).num_rows == 0
    assert sorted(dataset_ids(tmp_path)) == sorted(raw.id for raw in good)


def reject_parts(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (out / REJECTS).iterdir()}


def test_rejects_are_appended_a_part_per_commit_not_rewritten(mixed, good, settings, tmp_path):
    """Each commit with new rejects adds one part to rejects.parquet/; running again leaves
    the parts it has no reason to change as they were, and new rejects come as a new part."""
    featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    kept = {id(raw) for raw in good}
    chunks = [mixed[start : start + 16] for start in range(0, len(mixed), 16)]
    with_rejects = sum(any(id(item) not in kept for item in chunk) for chunk in chunks)
    first = reject_parts(tmp_path)
    assert len(first) == with_rejects > 1
    assert set(Manifest.load(tmp_path).reject_parts) == set(first)

    featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    assert reject_parts(tmp_path) == first  # the same rejects again: nothing written

    empty = RawInput("empty-cif", "test", "cif", "data_empty\n", origin="added")
    featurize_inputs([*mixed, empty], tmp_path, settings, shard_size=16, progress=False)
    after = reject_parts(tmp_path)
    assert {name: after[name] for name in first} == first and len(after) == len(first) + 1
    assert_every_input_once([*mixed, empty], tmp_path)


def test_a_single_rejects_file_of_an_older_version_is_taken_up(mixed, settings, tmp_path):
    featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    rejects = read_rejects(tmp_path)
    # the layout before rejects were appended: one file, and no parts in the manifest
    shutil.rmtree(tmp_path / REJECTS)
    pq.write_table(rejects, tmp_path / REJECTS)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["reject_parts"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert read_rejects(tmp_path).equals(rejects)

    summary = featurize_inputs(mixed, tmp_path, settings, shard_size=16, progress=False)
    assert summary.version == 1  # the same rejects: nothing changed
    assert len(reject_parts(tmp_path)) == 1
    assert read_rejects(tmp_path).equals(rejects)
    assert Manifest.load(tmp_path).rejects == rejects.num_rows
    assert_every_input_once(mixed, tmp_path)


def test_other_r_cut_on_an_existing_dataset_is_refused(good, settings, tmp_path):
    featurize_inputs(good[:10], tmp_path, settings, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    other = FeaturizeSettings(r_cut=5.0)
    with pytest.raises(DatasetMismatch, match=r"r_cut=5\.0") as caught:
        featurize_inputs(good[:10], tmp_path, other, progress=False)
    assert str(tmp_path) in str(caught.value)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # The refusal leaves the folder usable by a run with the dataset's own settings.
    assert featurize_inputs(good[:12], tmp_path, settings, progress=False).accepted == 2


def test_primitive_and_input_cell_datasets_do_not_mix(good, settings, tmp_path):
    featurize_inputs(good[:5], tmp_path, settings, progress=False)
    keep_cell = dataclasses.replace(settings, primitive=False)
    with pytest.raises(DatasetMismatch, match="cell"):
        featurize_inputs(good[:5], tmp_path, keep_cell, progress=False)


KILLED_RUN = """
import itertools, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import MP2018_SPEC, R_CUT, SNAPSHOTS
from crystalformer.featurize import FeaturizeSettings
from crystalformer.sources.files import iter_table
from crystalformer.datasets import featurize_inputs
inputs = itertools.islice(iter_table(SNAPSHOTS / {file!r}, MP2018_SPEC), {n})
featurize_inputs(inputs, Path({out!r}), FeaturizeSettings(r_cut=R_CUT), shard_size={size},
                 progress=False)
"""


@pytest.mark.slow
def test_killed_run_leaves_whole_shards_and_resumes(tmp_path):
    """SIGKILL a run of 3000 real crystals once a shard is committed; what the manifest
    lists is whole, and a re-run skips it, finishes the rest and cleans up the debris."""
    n, file = 3000, "mp2018_cgcnn/train.csv.gz"
    out = tmp_path / "killed"
    code = KILLED_RUN.format(tests=str(TESTS), file=file, n=n, out=str(out), size=40)
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifest = Manifest.load(out) if (out / MANIFEST).exists() else None
        if manifest is not None and manifest.shards:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]

    manifest = Manifest.load(out)
    committed = sum(s.rows for s in manifest.shards)
    assert 0 < committed < n
    for shard in manifest.shards:  # every listed shard is whole: checksum and rows match
        assert sha256_of(out / shard.file) == shard.sha256
    assert len(dataset_ids(out)) == committed

    inputs = snapshot_rows(file, MP2018_SPEC, n)
    summary = featurize_inputs(
        inputs, out, FeaturizeSettings(r_cut=R_CUT), shard_size=40, progress=False
    )
    assert summary.skipped >= committed
    assert summary.accepted + summary.skipped + summary.rejected == n
    assert_every_input_once(inputs, out)
    assert sorted(dataset_ids(out)) == sorted({raw.id for raw in inputs} - rejected_ids(out))
    listed = {s.file for s in Manifest.load(out).shards}
    stray = folder_files(out) - listed - {MANIFEST, REJECTS, LOCK}
    assert stray == set(), "debris left after the resumed run"


def rejected_ids(out: Path) -> set[str]:
    return set(read_rejects(out)["id"].to_pylist())


@pytest.mark.slow
def test_dask_workers_give_the_same_dataset_as_the_serial_path(mixed, settings, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores for two Dask workers")
    serial = featurize_inputs(mixed, tmp_path / "serial", settings, shard_size=12, progress=False)
    with dask_client(workers=2) as client:
        assert client is not None
        assert all("127.0.0.1" in address for address in client.scheduler_info()["workers"])
        environ = client.run(lambda: {name: os.environ.get(name) for name in WORKER_MALLOC})
        expected = {name: str(value) for name, value in WORKER_MALLOC.items()}
        assert list(environ.values()) == [expected, expected]  # set before each worker started
        parallel = featurize_inputs(
            mixed, tmp_path / "dask", settings, shard_size=12, client=client, progress=False
        )
    assert (parallel.accepted, parallel.rejected, parallel.shards) == (
        serial.accepted,
        serial.rejected,
        serial.shards,
    )

    def content(folder: Path) -> tuple[list, list]:
        rows = sorted(read_dataset(folder).to_pylist(), key=lambda r: r["id"])
        rejects = sorted(read_rejects(folder).to_pylist(), key=lambda r: (r["id"], r["origin"]))
        return rows, rejects

    assert content(tmp_path / "dask") == content(tmp_path / "serial")
    assert_every_input_once(mixed, tmp_path / "dask")


@pytest.fixture
def input_zoo(tmp_path) -> Path:
    """A folder of every kind of entry: the broken fixtures (a Structure JSON among them),
    a CSV and a Parquet table of MP-20 rows, a hidden file, a subfolder and a dangling link."""
    folder = tmp_path / "zoo"
    (folder / "sub").mkdir(parents=True)
    for path in BAD.iterdir():
        (folder / "sub" / path.name).write_bytes(path.read_bytes())
    rows = pd.read_csv(SNAPSHOTS / "mp_20_biternary" / "val.csv.gz", nrows=7)
    rows.iloc[:4].to_csv(folder / "four.csv", index=False)
    rows.iloc[4:].to_parquet(folder / "three.parquet")
    (folder / ".hidden.cif").write_text("not read")
    (folder / "gone.cif").symlink_to(folder / "nowhere.cif")
    return folder


def test_the_input_count_is_what_the_sources_yield(input_zoo, tmp_path):
    """The progress bar's total: every spec counted as resolve_all reads it."""
    specs = [str(input_zoo), str(input_zoo / "four.csv"), "jarvis_sample"]
    inputs, _ = resolve_all(specs)
    assert count_all(specs) == sum(1 for _ in inputs) == 7 + len(list(BAD.iterdir())) + 1 + 4 + 63
    split_json = tmp_path / "table.json"
    pd.read_csv(input_zoo / "four.csv").to_json(split_json, orient="split", index=False)
    assert count_all([str(split_json)]) is None  # would be parsed whole: no total
    assert count_all([str(BAD / "shared_site.json")]) == 1  # a Structure JSON


def test_featurize_reports_what_it_does_against_the_input_total(tmp_path, capsys):
    lines: list[str] = []
    out = tmp_path / "ds"
    featurize_sources(["jarvis_sample"], out, progress=True, report=lines.append)
    assert lines[0] == f"featurising jarvis_sample (63 inputs) into {out}"
    assert lines[-1].startswith("featurising: 63/63 inputs done (100%) in ")
    assert "63/63" in capsys.readouterr().err  # the bar, with its total


def test_featurize_says_when_the_total_is_unknown(input_zoo, tmp_path):
    table = tmp_path / "table.json"
    pd.read_csv(input_zoo / "four.csv").to_json(table, orient="split", index=False)
    lines: list[str] = []
    featurize_sources([str(table)], tmp_path / "ds", progress=False, report=lines.append)
    assert "(input count unknown)" in lines[0]
    assert lines[-1].startswith("featurising: 4 inputs done in ") and "(total unknown)" in lines[-1]
