"""Ranking a screening run in bounded memory: time and peak memory of the ranking alone
(`crystalformer.ranking.write_ranked`, what `screen` runs after predicting) at two sizes.

    .venv/bin/python bench/rank.py --results OUT/results [--sizes 100000,1000000]
                                   [--filter EXPR] [--pareto A:max,B:min] [--out FILE]

The result shards of a real screening run (`--results`: a `crystalformer screen` run's
OUT/results) are copied with new ids (`<id>#<copy>`) into shards of 2,000 rows up to each
size (untimed). Each size is ranked in a fresh process as `screen` ranks a run whose models
predict e_above_hull: lowest e_above_hull first, ties by its spread, with --filter and
--pareto when given. The process imports crystalformer.screen first, as the command has
when it ranks; its resident set then (VmRSS) and its peak after ranking (VmHWM) are
reported. Flat memory: the peak at the larger size within a few per cent of the smaller.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import (  # bench/harness.py
    RESULTS,
    Column,
    Session,
    machine_info,
    print_table,
    rss_mib,
    run_case_process,
)

SHARD_ROWS = 2_000  # as conf/featurize.yaml's shard_size: one result shard per feature shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="a screening run's OUT/results folder")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--filter", default=None)
    parser.add_argument("--pareto", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "rank.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(rank_case(json.loads(args.case.read_text()))))
        return
    if args.results is None:
        parser.error("--results is required")

    session = Session("rank.py")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rank-") as tmp:
        for size in [int(size) for size in args.sizes.split(",")]:
            folder = Path(tmp) / str(size)
            replicate(args.results, folder / "results", size)
            case = folder / "case.json"
            options = {"filter_expr": args.filter, "pareto": args.pareto}
            case.write_text(json.dumps({"folder": str(folder), **options}))
            rows.append(
                {"rows": size, **run_case_process("rank.py", str(size), ["--case", str(case)], 1)}
            )
    print_table(TABLE, rows)
    report = {
        **session.header(machine_info(("numpy", "pandas", "pyarrow"))),
        "results": str(args.results),
        "memory": "VmRSS after imports, before ranking; VmHWM after ranking (MiB)",
        "cases": rows,
    }
    session.write(args.out, report)


def replicate(results: Path, folder: Path, size: int) -> None:
    """`size` rows of the run's results, copied with new ids, in shards of SHARD_ROWS."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    base = pa.concat_tables([pq.read_table(f) for f in sorted(results.glob("*.parquet"))])
    written, copy = 0, 0
    while written < size:
        table = base.slice(0, size - written)
        ids = pc.binary_join_element_wise(table["id"], pa.scalar(f"#{copy}"), "")
        table = table.set_column(table.schema.get_field_index("id"), "id", ids)
        for start in range(0, table.num_rows, SHARD_ROWS):
            part = table.slice(start, SHARD_ROWS)
            pq.write_table(part, folder / f"{copy:05d}-{start:07d}.parquet", compression="zstd")
        written += table.num_rows
        copy += 1


def rank_case(case: dict) -> dict:
    import crystalformer.screen  # noqa: F401  (what the screen command has imported)
    from crystalformer.ranking import write_ranked
    from crystalformer.screen_run import RANKED, default_ranking

    folder = Path(case["folder"])
    ranking = default_ranking(None, ["e_above_hull"])
    before = rss_mib("VmRSS")
    start = time.perf_counter()
    ranked = write_ranked(
        sorted((folder / "results").glob("*.parquet")), folder / RANKED,
        filter_expr=case["filter_expr"], rank_by=ranking.rank_by,
        tie_break=ranking.tie_break, pareto=case["pareto"],
    )  # fmt: skip
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "passed": ranked.passed,
        "sample_rows": len(ranked.sample),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(rss_mib()),
    }


TABLE = (
    Column("rows", ">10", "rows"),
    Column("seconds", ">9", "seconds"),
    Column("RSS before", ">12", "rss_before_mib"),
    Column("peak RSS", ">10", "peak_rss_mib"),
    Column("sample", ">8", "sample_rows"),
)


if __name__ == "__main__":
    main()
