"""A screening run as data: its options, and the names of the files in its folder.

The command line, the `screen` flow and `screen.screen` share `ScreenOptions`, so each option
has one default; `screen` writes the folder and `report` reads it by these names. Nothing
heavy is imported here: the command line reads the defaults when it starts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

FEATURES = "features"  # the candidates' dataset folder
RESULTS = "results"  # one result shard per feature shard
RANKED = "ranked.parquet"
RUN_FILE = "screen.json"
REPORT = "report.html"
LABEL_METRICS = "label_metrics.json"
STD_SUFFIX = "_std"  # a property's ensemble spread: the result column f"{property}_std"
STABILITY = "e_above_hull"  # what the default ranking orders by, lowest first

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
    rank_by: str | None = None  # a score, higher first (None: default_ranking's)
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


@dataclass(frozen=True)
class Ranking:
    """How a run orders the rows that pass its filter: `rank_by` (a score, higher first),
    ties by `tie_break` (a column, lower first, missing last), then by id. Without
    `rank_by` nothing ranks them: they are listed by id, and no table of them is a "top"."""

    rank_by: str | None = None
    tie_break: str | None = None
    default: bool = False  # chosen from the models' targets (no --rank-by given)

    @property
    def ranked(self) -> bool:
        return self.rank_by is not None

    def describe(self) -> str:
        """One line for the report, the artifacts and the logs."""
        if not self.ranked:
            return f"unranked, by id (no --rank-by, and no model predicts {STABILITY})"
        if self.default:
            text = f"lowest predicted {STABILITY} first"
        else:
            text = f"by {self.rank_by}, highest first"
        if self.tie_break:
            text += f", ties: smaller {self.tie_break} first"
        return text + ("; the default" if self.default else "")

    def table_title(self, top: int) -> str:
        """The title of the table of the first `top` rows that pass the filter."""
        if not self.ranked:
            return f"Candidates that pass the filter (unranked, by id; the first {top})"
        return f"Top {top} candidates that pass the filter ({self.describe()})"

    @classmethod
    def of_run(cls, metadata: dict) -> Ranking:
        """A run's ranking from its screen.json (runs written before it had one: their
        --rank-by or nothing)."""
        if "ranking" in metadata:
            return cls(**metadata["ranking"])
        return cls(metadata.get("rank_by"))


def default_ranking(rank_by: str | None, targets: Collection[str]) -> Ranking:
    """`--rank-by` exactly as given. Without it: the lowest predicted e_above_hull first
    (closest to the convex hull: the most stable), the smaller ensemble spread breaking
    ties (the surer prediction first); unranked when no model predicts e_above_hull."""
    if rank_by:
        return Ranking(rank_by)
    if STABILITY in targets:
        return Ranking(f"-{STABILITY}", tie_break=f"{STABILITY}{STD_SUFFIX}", default=True)
    return Ranking()
