"""A screening run as data: its options, and the names of the files in its folder.

The command line, the `screen` flow and `screen.screen` share `ScreenOptions`, so each option
has one default; `screen` writes the folder and `report` reads it by these names. Nothing
heavy is imported here: the command line reads the defaults when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FEATURES = "features"  # the candidates' dataset folder
RESULTS = "results"  # one result shard per feature shard
RANKED = "ranked.parquet"
RUN_FILE = "screen.json"
REPORT = "report.html"
LABEL_METRICS = "label_metrics.json"

# Bounds a batch's memory; small crystals share big batches. Its largest temporary, the
# radial basis (images × ≤64 float32), stays under glibc's 32 MiB mmap limit (WORKER_MALLOC).
MAX_IMAGES_PER_BATCH = 100_000


@dataclass(frozen=True)
class ScreenOptions:
    """Everything a screening run is given; a default here is the default everywhere."""

    candidates: Sequence[str]  # anything featurize reads, or featurised dataset folders
    models: Sequence[str]  # model URIs; several of one property form an ensemble
    out: Path  # the run folder
    filter_expr: str | None = None  # keep the rows where it holds
    rank_by: str | None = None  # a score, higher first
    pareto: str | None = None  # two objectives, "A:max,B:min"
    top: int = 50  # rows in the report's top table
    workers: int = 1  # Dask worker processes (1: in this process)
    scheduler: str | None = None  # a running Dask scheduler instead of local workers
    shard_size: int | None = None  # crystals per feature shard (None: conf/featurize.yaml's)
    device: str | None = None  # None: CUDA when there is one
    compiled: bool = True  # torch.compile'd kernels (each process compiles them once)
    max_images: int = MAX_IMAGES_PER_BATCH  # lattice images per prediction batch
    progress: bool = True
    root: Path | None = None  # the data root whose MLflow store models:/ and runs:/ name
