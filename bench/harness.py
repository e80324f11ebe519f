"""What every benchmark shares: case processes, timing, memory, machine and code state, reports.

A benchmark times each case in a fresh interpreter (`run_case_process`), so one case's
imports, caches and peak memory do not colour the next; the case times its work with
`time_repeats` (best of several passes after a warm-up) and reads its memory with `rss_mib`.
The driver writes one JSON report (`Session`) that README figures are read from, and prints a
table (`print_table`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Thread counts of every numerical library a case process may load: per-core figures.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

# --- inputs ----------------------------------------------------------------------------------


def load_inputs(dataset_name: str, n: int) -> tuple[list, str]:
    """The first n readable CIF inputs of a dataset of conf/datasets.yaml (its validation
    file if it has one), and the file(s) they came from: real crystals for every benchmark."""
    from crystalformer.conf import datasets_config
    from crystalformer.records import RawInput
    from crystalformer.sources.snapshots import snapshot_inputs

    datasets = datasets_config().datasets
    if dataset_name not in datasets:
        raise SystemExit(
            f"unknown dataset {dataset_name!r}; conf/datasets.yaml has {sorted(datasets)}"
        )
    dataset = datasets[dataset_name]
    if dataset.structure_column != "cif":
        raise SystemExit(f"{dataset_name} holds {dataset.structure_column}, not CIF text")
    files = [f for f in dataset.files if "val" in Path(f).name] or dataset.files
    items = snapshot_inputs(dataset.model_copy(update={"files": files}))
    raws = list(itertools.islice((r for r in items if isinstance(r, RawInput)), n))
    if not raws:
        raise SystemExit(f"{dataset_name}: no readable rows in {files}")
    return raws, ", ".join(f"data/snapshots/{f}" for f in files)


# --- cases in their own processes -----------------------------------------------------------


def run_case_process(script: str, name: str, options: Sequence[str], threads: int) -> dict:
    """Run `bench/<script> --worker NAME OPTIONS...` in a fresh interpreter with `threads`
    threads per numerical library; the last line it prints is its JSON result."""
    command = [sys.executable, str(ROOT / "bench" / script), "--worker", name, *options]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))},
    )
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  ran {name}", file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall-clock (perf_counter) and process CPU seconds of each timed pass."""

    wall: list[float]
    cpu: list[float]
    output: Any  # what the last pass returned

    @property
    def best(self) -> int:
        """The pass with the shortest wall time."""
        return min(range(len(self.wall)), key=self.wall.__getitem__)


def time_repeats(
    run: Callable[[], Any], repeat: int, before: Callable[[], None] = lambda: None
) -> Timings:
    """`repeat` timed passes of `run()` (warm it up first). Before each, `before()` and a
    garbage collection drop what the previous pass left, so it does not add to the peak."""
    wall, cpu, output = [], [], None
    for _ in range(repeat):
        output = None
        before()
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        output = run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return Timings(wall, cpu, output)


# --- memory ----------------------------------------------------------------------------------


def rss_mib(field_name: str = "VmHWM") -> float:
    """This process's peak resident set size (VmHWM), or the current one (VmRSS), in MiB.

    Not getrusage's ru_maxrss: that survives execve, so a case process would start from the
    driver's own peak (measured: a child of an 800 MB parent reports 800 MB).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field_name} in /proc/self/status")


@dataclass
class TreeRss:
    """Resident set sizes (bytes) of a process and its descendants, sampled while it runs."""

    total: int = 0  # largest sum over the process and all its descendants
    main: int = 0  # largest of the process alone
    child: int = 0  # largest of any one descendant (e.g. a Dask worker)
    main_samples: list[int] = field(default_factory=list)  # every sample of the process
    child_samples: dict[int, list[int]] = field(default_factory=dict)  # each descendant's

    def follow(self, pid: int, every: float = 0.1, stop: threading.Event | None = None) -> None:
        """Sample until the process ends or `stop` is set. The summed peak shows growth; the
        process alone and its largest child tell it from workers peaking together; the
        medians of the samples tell a level from a momentary peak."""
        import psutil

        stop = stop or threading.Event()
        try:
            root = psutil.Process(pid)
            while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
                sizes = {}
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # it may have just exited
                        sizes[process.pid] = process.memory_info().rss
                main = sizes.pop(pid, 0)
                self.total = max(self.total, main + sum(sizes.values()))
                self.main = max(self.main, main)
                self.main_samples.append(main)
                self.child = max(self.child, max(sizes.values(), default=0))
                for child, size in sizes.items():
                    self.child_samples.setdefault(child, []).append(size)
                if stop.wait(every):
                    return
        except psutil.Error:
            return

    def worker_median(self) -> float:
        """The largest median of one descendant that lived through at least half the samples
        (a Dask worker, not a short-lived helper process); 0 without one."""
        lived = [s for s in self.child_samples.values() if 2 * len(s) >= len(self.main_samples)]
        return max((statistics.median(samples) for samples in lived), default=0)


def communicate_sampling_rss(
    process: subprocess.Popen, every: float = 0.1
) -> tuple[bytes, bytes, TreeRss]:
    """(stdout, stderr, memory) of a started process, its tree's RSS sampled every `every` s."""
    memory, stop = TreeRss(), threading.Event()
    sampler = threading.Thread(target=memory.follow, args=(process.pid, every, stop), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    stop.set()  # the samples are complete when this returns, not up to `every` later
    sampler.join()
    return stdout, stderr, memory


# --- machine and code ------------------------------------------------------------------------


def code_state() -> dict:
    """The commit benchmarked and the files that differed from it (read-only git calls)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": modified}


def machine_info(packages: Sequence[str], **extra: Any) -> dict:
    """CPUs, platform, Python and the installed versions of `packages`, then `extra`."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: version(package) for package in packages},
        **extra,
    }


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo; empty where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ""
    lines = cpuinfo.read_text().splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def memory_gib() -> float:
    """Physical memory of the machine."""
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


# --- reports ---------------------------------------------------------------------------------


def command_line(script: str, arguments: Sequence[str] | None = None) -> str:
    """The command that reruns this benchmark (this process's own arguments by default)."""
    arguments = sys.argv[1:] if arguments is None else arguments
    return " ".join([".venv/bin/python", f"bench/{script}", *arguments])


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


class Session:
    """One benchmark run: its wall clock and the machine's load from start to report, which
    say how much other work shared the machine while it ran."""

    def __init__(self, script: str):
        self.script = script
        self.started = time.perf_counter()
        self.load_before = os.getloadavg()

    def header(self, machine: dict) -> dict:
        """The report's first keys: what ran, when, where, on which code, beside what load."""
        return {
            "benchmark": f"bench/{self.script}",
            "command": command_line(self.script),
            "date": utc_now(),
            "machine": machine,
            "code": code_state(),
            "load_average_1_5_15_min": {"start": self.load_before, "end": os.getloadavg()},
        }

    def write(self, path: Path, report: dict) -> None:
        """Add the run's wall time to `report`, write it and say so."""
        report["wall_seconds"] = round(time.perf_counter() - self.started, 1)
        write_json(path, report)
        print(
            f"\nwrote {path} ({report['wall_seconds']} s in all; load average "
            f"{self.load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
            f"{os.cpu_count()} CPUs)"
        )


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column: its header, the format spec of its values (e.g. ">11.1f", whose
    alignment and width also place the header), and the row's key or a function of the row."""

    header: str
    spec: str
    value: str | Callable[[Any], Any]

    def head(self) -> str:
        align_width = re.match(r"[<>^]?\d*", self.spec).group()
        return format(self.header, align_width)

    def cell(self, row: Any) -> str:
        value = row[self.value] if isinstance(self.value, str) else self.value(row)
        return format(value, self.spec)


def print_table(columns: Sequence[Column], rows: Sequence[Any], rule: bool = False) -> None:
    """A header line (and a rule of dashes under it), then one line per row."""
    header = "".join(column.head() for column in columns)
    print(header)
    if rule:
        print("-" * len(header))
    for row in rows:
        print("".join(column.cell(row) for column in columns))
