"""Shards: what is featurised comes back from Parquet unchanged, and the manifest tells the truth.

Rows are real MP, MP-20 and JARVIS crystals (one with a disordered site) with their labels.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from crystalformer import __version__, shards
from crystalformer.datasets import featurize_inputs
from crystalformer.featurize import FeaturizedCrystal, FeaturizeSettings, featurize_chunk
from crystalformer.records import RawInput
from crystalformer.shards import (
    LOCK,
    MANIFEST,
    REJECT_COLUMNS,
    REJECTS,
    SCHEMA_VERSION,
    Manifest,
    NotADatasetFolder,
    base_schema,
    cut_by_total,
    read_dataset,
    read_rejects,
    rows_to_table,
    table_to_rows,
    write_shard,
)

FE_ROW = "  Fe  Fe0  1  0.00000000  0.00000000  0.00000000  1\n"


@pytest.fixture(scope="module")
def inputs(mp_raws, biternary_raws, jarvis_raws, mp_cifs) -> list[RawInput]:
    """Real crystals from three sources (different label sets, some labels missing) and a
    disordered FeN (Fe site shared with Co)."""
    half_cobalt = FE_ROW.replace("Fe  Fe0", "Co  Co0").replace(" 1\n", " 0.5\n")
    mixed = mp_cifs["mp-1009019"].replace(FE_ROW, FE_ROW.replace(" 1\n", " 0.5\n") + half_cobalt)
    disordered = RawInput("mp-1009019-CoFe", "mp2018", "cif", mixed, {"band_gap": None}, "val")
    return mp_raws[:80] + biternary_raws[:40] + jarvis_raws[:30] + [disordered]


@pytest.fixture(scope="module")
def rows(inputs, settings) -> list[FeaturizedCrystal]:
    result = featurize_chunk(inputs, settings)
    assert result.rejects == []
    return result.rows


def target_names(inputs) -> list[str]:
    return sorted({name for raw in inputs for name in raw.targets})


def assert_same_rows(got: list[FeaturizedCrystal], expected: list[FeaturizedCrystal], names):
    assert [r.crystal.id for r in got] == [r.crystal.id for r in expected]
    for a, b in zip(got, expected, strict=True):
        ca, cb = a.crystal, b.crystal
        assert (ca.source, ca.split, a.formula, a.structure_hash) == (
            cb.source,
            cb.split,
            b.formula,
            b.structure_hash,
        )
        assert np.array_equal(ca.numbers, cb.numbers)
        assert np.array_equal(ca.lattice, cb.lattice)
        assert np.allclose(ca.cart_coords, cb.cart_coords, rtol=0, atol=1e-12)
        assert np.array_equal(a.images.pair, b.images.pair)
        assert np.array_equal(a.equivalent_atom, b.equivalent_atom)
        assert np.array_equal(a.images.shift, b.images.shift)
        # distances are stored as float32: exactly the float32 of the computed ones
        assert np.array_equal(a.images.dist, b.images.dist.astype(np.float32).astype(np.float64))
        assert {n: ca.targets.get(n) for n in names} == {n: cb.targets.get(n) for n in names}
        if cb.disorder is None:
            assert ca.disorder is None
        else:
            assert np.array_equal(ca.disorder.site, cb.disorder.site)
            assert np.array_equal(ca.disorder.z, cb.disorder.z)
            assert np.array_equal(ca.disorder.occupancy, cb.disorder.occupancy)


def test_rows_round_trip_through_a_table(rows, inputs, settings):
    names = target_names(inputs)
    table = rows_to_table(rows, names, settings)
    assert table.num_rows == len(rows)
    assert table.schema.names == base_schema().names + names
    assert_same_rows(list(table_to_rows(table)), rows, names)


def test_rows_round_trip_through_a_parquet_shard(rows, inputs, settings, tmp_path):
    names = target_names(inputs)
    info = write_shard(tmp_path, "shard-test.parquet", rows, names, settings, version=3)
    path = tmp_path / "shard-test.parquet"
    assert (info.file, info.rows, info.version) == ("shard-test.parquet", len(rows), 3)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-test.parquet"]  # no temporary left
    assert_same_rows(list(table_to_rows(pq.read_table(path))), rows, names)


def test_row_groups_hold_a_bounded_number_of_images(rows, inputs, settings, tmp_path, monkeypatch):
    """A reader taking one row group at a time needs memory for at most the cap (or for one
    crystal above it); together the groups are the whole shard, in order."""
    names = target_names(inputs)
    images = np.array([len(row.images.dist) for row in rows])
    cap = int(np.percentile(images, 90)) * 3
    monkeypatch.setattr(shards, "IMAGES_PER_ROW_GROUP", cap)
    write_shard(tmp_path, "shard-test.parquet", rows, names, settings, version=1)
    parquet = pq.ParquetFile(tmp_path / "shard-test.parquet")
    assert parquet.num_row_groups > 5
    seen = 0
    for k in range(parquet.num_row_groups):
        group = parquet.read_row_group(k, columns=["image_dist"])
        in_group = images[seen : seen + group.num_rows]
        assert in_group.sum() <= cap or group.num_rows == 1
        seen += group.num_rows
    assert seen == len(rows)
    assert_same_rows(list(table_to_rows(parquet.read())), rows, names)


def test_cut_by_total_covers_every_row_in_order_within_both_limits():
    counts = np.array([5, 1, 30, 2, 2, 2, 2, 9, 0, 4])
    groups = cut_by_total(counts, max_total=10, max_rows=3)
    assert groups[0][0] == 0 and groups[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))  # consecutive, no gaps
    for start, stop in groups:
        assert stop - start <= 3
        assert counts[start:stop].sum() <= 10 or stop - start == 1
    assert groups == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 9), (9, 10)]  # greedy


def test_shard_written_before_equivalent_atoms_reads_every_atom_on_its_own(rows, inputs, settings):
    table = rows_to_table(rows, target_names(inputs), settings)
    assert any(len(set(row.equivalent_atom.tolist())) < row.crystal.n_atoms for row in rows)
    old = list(table_to_rows(table.drop_columns(["equivalent_atom"])))
    every_atom = [list(range(r.crystal.n_atoms)) for r in rows]
    assert [r.equivalent_atom.tolist() for r in old] == every_atom


def test_disordered_site_is_stored_in_the_disorder_columns(rows, inputs, settings):
    table = rows_to_table(rows, target_names(inputs), settings)
    record = table.to_pylist()[-1]
    assert record["id"] == "mp-1009019-CoFe"
    assert record["formula"] == "Co0.5Fe0.5N"
    assert len(record["disorder_site"]) == 2
    assert sorted(zip(record["disorder_z"], record["disorder_occupancy"], strict=True)) == [
        (26, 0.5),
        (27, 0.5),
    ]
    site = record["disorder_site"][0]
    assert record["disorder_site"] == [site, site]
    assert record["atomic_numbers"][site] == 26  # the site's largest share (a tie: Fe first)
    assert all(r["disorder_site"] == [] for r in table.to_pylist()[:-1])  # ordered crystals


def test_shard_file_metadata_names_its_settings(rows, inputs, tmp_path):
    settings = FeaturizeSettings(r_cut=5.5, primitive=False, symprec=0.001)
    names = target_names(inputs)
    write_shard(tmp_path, "s.parquet", rows[:5], names, settings, version=1)
    metadata = {
        k.decode(): v.decode() for k, v in pq.read_schema(tmp_path / "s.parquet").metadata.items()
    }
    assert metadata["schema_version"] == str(SCHEMA_VERSION)
    assert float(metadata["r_cut"]) == 5.5
    assert metadata["cell"] == "input"
    assert float(metadata["symprec"]) == 0.001
    assert metadata["library_version"] == __version__
    assert json.loads(metadata["targets"]) == names


def test_featurized_dataset_round_trips_and_manifest_matches_files(
    inputs, rows, settings, tmp_path
):
    out = tmp_path / "dataset"
    units = {"formation_energy_per_atom": "eV/atom", "band_gap": "eV"}
    summary = featurize_inputs(inputs, out, settings, units, shard_size=37, progress=False)
    assert (summary.accepted, summary.rejected, summary.skipped) == (len(inputs), 0, 0)
    assert summary.shards == 5  # ceil(151 / 37)

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["r_cut"] == settings.r_cut
    assert manifest["cell"] == "primitive"
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["library_version"] == __version__
    assert manifest["version"] == summary.version == 1
    assert manifest["targets"]["band_gap"] == "eV"
    assert set(manifest["targets"]) == set(target_names(inputs))
    listed = {shard["file"] for shard in manifest["shards"]}
    assert {p.name for p in out.glob("*.parquet")} == listed | {REJECTS}
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["rows"] == pq.read_metadata(path).num_rows
        assert pq.read_schema(path).metadata[b"r_cut"] == repr(settings.r_cut).encode()
    assert sum(shard["rows"] for shard in manifest["shards"]) == len(inputs)

    table = read_dataset(out)
    back = sorted(table_to_rows(table), key=lambda r: r.crystal.id)
    expected = sorted(rows, key=lambda r: r.crystal.id)
    assert_same_rows(back, expected, target_names(inputs))
    assert read_rejects(out).num_rows == 0
    assert read_rejects(out).schema.names == list(REJECT_COLUMNS)
    assert Manifest.load(out).settings() == settings


def test_rejects_table_has_id_source_stage_reason_origin(mp_raws, settings, tmp_path):
    broken = RawInput("mp-broken", "mp2018", "cif", mp_raws[0].payload[:400], origin="here:1")
    featurize_inputs([mp_raws[1], broken], tmp_path, settings, progress=False)
    rejects = read_rejects(tmp_path).to_pylist()
    assert len(rejects) == 1
    reject = rejects[0]
    assert (reject["id"], reject["source"], reject["stage"], reject["origin"]) == (
        "mp-broken",
        "mp2018",
        "parse",
        "here:1",
    )
    assert "unreadable CIF" in reject["reason"]
    assert Manifest.load(tmp_path).rejects == 1


def test_dataset_of_only_rejects_reads_as_an_empty_table(settings, tmp_path):
    featurize_inputs(
        [RawInput("nothing", "test", "cif", "data_empty\n")], tmp_path, settings, progress=False
    )
    table = read_dataset(tmp_path)
    assert table.num_rows == 0
    assert table.schema.names[: len(base_schema())] == base_schema().names
    assert read_rejects(tmp_path).num_rows == 1


def test_second_source_adds_its_target_columns(mp_raws, jarvis_raws, settings, tmp_path):
    featurize_inputs(mp_raws[:10], tmp_path, settings, progress=False)
    featurize_inputs(jarvis_raws[:10], tmp_path, settings, progress=False)
    table = read_dataset(tmp_path)
    assert table.num_rows == 20
    records = {r["id"]: r for r in table.to_pylist()}
    for raw in mp_raws[:10] + jarvis_raws[:10]:
        for name, value in raw.targets.items():
            assert records[raw.id][name] == value
    assert records[mp_raws[0].id]["mbj_bandgap"] is None
    assert records[jarvis_raws[0].id]["band_gap"] is None


def test_columns_a_shard_predates_read_as_null(mp_raws, jarvis_raws, settings, tmp_path):
    """Columns asked for by name (as training does): a shard from before `equivalent_atom`
    existed, or before a target was added, gives nulls instead of failing the read."""
    featurize_inputs(mp_raws[:10], tmp_path, settings, progress=False)
    old = tmp_path / Manifest.load(tmp_path).shards[0].file
    pq.write_table(pq.read_table(old).drop_columns(["equivalent_atom"]), old)
    featurize_inputs(jarvis_raws[:10], tmp_path, settings, progress=False)
    table = read_dataset(tmp_path, columns=["id", "equivalent_atom", "band_gap", "mbj_bandgap"])
    assert table.num_rows == 20
    assert table["equivalent_atom"].null_count == 10
    assert table["mbj_bandgap"].null_count == 10 + sum(
        raw.targets.get("mbj_bandgap") is None for raw in jarvis_raws[:10]
    )


def test_folder_without_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a featurised dataset"):
        read_dataset(tmp_path)


# --- what a dataset folder may remove (issue 14) ---------------------------------------------


def test_rerun_keeps_a_users_files_beside_the_shards_and_removes_real_debris(
    mp_raws, settings, tmp_path
):
    """Only files of our own name patterns that the manifest does not list are debris."""
    featurize_inputs(mp_raws[:6], tmp_path, settings, progress=False)
    shard = tmp_path / Manifest.load(tmp_path).shards[0].file
    mine = {"notes.parquet": shard.read_bytes(), "mine.tmp": b"draft", "shard-old.parquet": b"x"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    debris = [
        ".shard-0002-abcdef012345.parquet.123.tmp",  # write_atomic's temporary of a shard
        ".manifest.json.77.tmp",
        ".rejects.parquet.77.tmp",
        ".ids-k2j_x9ab.tmp",  # a killed run's scratch id index
        "shard-0002-0123456789ab.parquet",  # written by a worker, never committed
    ]
    for name in debris:
        (tmp_path / name).write_bytes(shard.read_bytes())

    featurize_inputs(mp_raws[:8], tmp_path, settings, progress=False)
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data
    assert not any((tmp_path / name).exists() for name in debris)
    assert read_dataset(tmp_path, ["id"]).num_rows == 8


def test_a_folder_that_is_not_a_dataset_is_refused_and_left_untouched(mp_raws, settings, tmp_path):
    """`featurize u/in.parquet --out u` once deleted the input before reading it."""
    user = tmp_path / "u"
    user.mkdir()
    (user / "in.parquet").write_bytes(b"the user's table")
    (user / "shard-0001-0123456789ab.parquet").write_bytes(b"looks like ours, but no manifest")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    with pytest.raises(NotADatasetFolder, match=r"u is not empty and is not a dataset folder"):
        featurize_inputs(mp_raws[:3], user, settings, progress=False)
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before  # no .lock either


def test_a_first_run_killed_before_its_first_commit_is_taken_up_again(mp_raws, settings, tmp_path):
    """No manifest yet, but nothing in the folder that is not ours: not a user's folder."""
    leftovers = [LOCK, ".ids-abc123.tmp", ".shard-0001-0123456789ab.parquet.9.tmp"]
    for name in [*leftovers, "shard-0001-0123456789ab.parquet"]:
        (tmp_path / name).write_bytes(b"half written")
    featurize_inputs(mp_raws[:3], tmp_path, settings, progress=False)
    assert read_dataset(tmp_path, ["id"]).num_rows == 3
    listed = {s.file for s in Manifest.load(tmp_path).shards}
    assert {p.name for p in tmp_path.iterdir()} == listed | {LOCK, MANIFEST, REJECTS}


def test_an_out_that_is_a_file_is_refused(mp_raws, settings, tmp_path):
    table = tmp_path / "table.parquet"
    table.write_bytes(b"a user's file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        featurize_inputs(mp_raws[:3], table, settings, progress=False)
    assert table.read_bytes() == b"a user's file"
