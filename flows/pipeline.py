"""Flow `pipeline`: the main job end to end on the embedded defaults (bundled snapshots).

Every dataset of conf/datasets.yaml featurised into DATA_ROOT/datasets/; the models shipped
in models/ registered in MLflow as champions; train-all on a small budget (a few epochs on a
subset), whose models are challengers that never displace them; then the champions screen
two candidate sets:
substituted AFLOW prototypes (conf/generate.yaml), the discovery use, and the MPTS-52 time
split (crystals from after the training data), which is scored against its DFT labels.
A fresh clone ends with registered models in MLflow and two screening reports.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task

from crystalformer import conf
from crystalformer.report import evaluate_run
from crystalformer.sources.candidates import (
    generate_candidates,
    generate_config,
    write_candidates_table,
)
from crystalformer.tracking import register_pretrained
from flows.refresh import refresh_data
from flows.screen import screen_flow
from flows.train import train_all

SCREENED_PROPERTIES = ["e_above_hull", "formation_energy_per_atom", "band_gap"]
# No rank_by: the default ranking (lowest predicted e_above_hull, the ensemble's spread
# breaking ties; screen_run.default_ranking).
SCREEN = {
    "filter_expr": "e_above_hull < 0.1 and band_gap > 0.5",
    "pareto": "band_gap:max,e_above_hull:min",
}


@task
def generated_candidates(path: Path) -> Path:
    """The prototype substitutions of conf/generate.yaml (deterministic: written once)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_candidates_table(generate_candidates(generate_config()), path)
    return path


@task
def seed_champions(root: Path) -> list[str]:
    """The models shipped in models/ become registered versions (champions unless a
    comparable better one is), so the short training below runs as their challenger."""
    messages = register_pretrained(root)
    for message in messages:
        get_run_logger().info(message)
    return messages


@flow(name="pipeline", log_prints=True)
def pipeline(
    data_root: str | None = None,
    workers: int = 2,
    train_epochs: int = 2,
    train_max_crystals: int = 600,
) -> dict:
    """Featurise the snapshots (incremental), train every property briefly, screen."""
    root = Path(data_root).resolve() if data_root else conf.data_root()
    datasets = refresh_data(sources=["snapshots"], data_root=str(root), workers=workers)
    seed_champions(root)
    models = train_all(epochs=train_epochs, max_crystals=train_max_crystals, data_root=str(root))
    champions = [f"models:/crystalformer-{name}@champion" for name in SCREENED_PROPERTIES]
    candidates = generated_candidates(root / "candidates" / "generated.parquet")
    screens = {}
    for name, source in [("generated", candidates), ("mpts52", root / "datasets" / "mpts52")]:
        screens[name] = screen_flow(
            candidates=[str(source)], models=champions, out=str(root / "screens" / name),
            workers=workers, data_root=str(root), **SCREEN,
        )  # fmt: skip
    labelled = root / "screens" / "mpts52"
    metrics = evaluate_run(labelled, root / "datasets" / "mpts52", root=root)
    get_run_logger().info(
        f"MPTS-52 against DFT labels: {metrics}; reports under {root / 'screens'}"
    )
    return {"datasets": datasets, "models": models, "screens": screens, "metrics": metrics}


if __name__ == "__main__":
    pipeline(workers=min(2, os.cpu_count() or 1))
