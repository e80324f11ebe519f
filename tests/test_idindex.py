"""The driver's on-disk id index: same answers as the dictionaries it replaced, and no
file left behind."""

from __future__ import annotations

from crystalformer.idindex import IdIndex
from crystalformer.shards import DatasetFolder


def test_keys_remove_and_move_follow_the_shards(tmp_path):
    ids = IdIndex(tmp_path)
    # More ids than one query may name, so the batching is exercised.
    ids.add("a.parquet", [(f"x{k}", f"key{k}") for k in range(2000)])
    ids.add("b.parquet", [("y", "key-y"), ("x7", "key7-new")])  # x7 moved to b
    assert ids.keys(f"x{k}" for k in range(0, 2000, 3)) == {
        f"x{k}": ("key7-new" if k == 7 else f"key{k}") for k in range(0, 2000, 3)
    }
    assert ids.keys(["nope"]) == {}
    held = ids.remove(["y", "x7", "x1500", "nope"])
    assert held == {"b.parquet": {"y", "x7"}, "a.parquet": {"x1500"}}
    assert ids.remove(["y"]) == {}  # forgotten
    ids.move("a.parquet", "c.parquet")
    assert ids.remove(["x0", "x1999"]) == {"c.parquet": {"x0", "x1999"}}
    ids.close()


def test_first_read_names_where_an_id_was_read_first(tmp_path):
    ids = IdIndex(tmp_path)
    assert ids.first_read("mp-1", "a.cif") is None
    assert ids.first_read("mp-2", "b.cif") is None
    assert ids.first_read("mp-1", "c.cif") == "a.cif"
    assert ids.first_read("mp-1", "d.cif") == "a.cif"
    ids.close()


def test_index_file_is_removed_on_close_and_a_killed_runs_copy_on_the_next_open(settings, tmp_path):
    folder = DatasetFolder(tmp_path, settings, {})
    index_file = folder.ids.path
    assert index_file.parent == tmp_path and index_file.exists()
    folder.close()
    assert not index_file.exists()
    leftover = tmp_path / ".ids-killedrun.tmp"  # what a hard-killed run leaves
    leftover.write_bytes(b"")
    folder = DatasetFolder(tmp_path, settings, {})
    assert not leftover.exists()
    folder.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
