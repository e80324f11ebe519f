"""Training one property: the paper's recipe (docs/model.md §5) in plain sight.

`prepare_data` turns a featurised dataset into train/val/test tables for one target; `fit`
runs the loop (L1 on standardised targets, AdamW, per-step inverse-sqrt decay, gradient
clipping, SWA over the last epochs) and writes a checkpoint after every epoch, so an
interrupted run resumes onto the same curve. Checkpoints are safetensors plus JSON: loading
one never unpickles code. No MLflow or Prefect here (see crystalformer.tracking).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crystalformer.model import Runtime, build_model
from crystalformer.model.base import PropertyModel
from crystalformer.model.config import config_from_card
from crystalformer.predict import predict_table
from crystalformer.recipe import TrainConfig
from crystalformer.shards import Manifest, read_dataset, write_atomic
from crystalformer.version import __version__

SPLITS = ("train", "val", "test")
CHECKPOINT_FORMAT = "crystalformer-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
STATE_TENSORS = "train_state.safetensors"
STATE_INFO = "train_state.json"
LATEST = "LATEST"
SPLIT_FILE = "split.parquet"
TRAINING_COLUMNS = [
    "id",
    "atomic_numbers",
    "disorder_site",
    "disorder_z",
    "disorder_occupancy",
    "image_pair",
    "image_dist",
    "equivalent_atom",  # Crystalformer computes one atom per class
    "positions",  # with lattice and image_shift: geometry for angles and supercells
    "lattice",
    "image_shift",
    "split",
    "structure_hash",
]


@dataclass
class TrainingData:
    """One target's labelled crystals, split; `skipped` counts rows left out and why."""

    target: str
    unit: str | None
    r_cut: float
    splits: dict[str, pa.Table]
    split_source: str  # "dataset" (its own split column) or "seeded"
    skipped: dict[str, int] = field(default_factory=dict)

    def split_table(self) -> pa.Table:
        """id, structure_hash and split of every crystal used: saved with the run."""
        parts = [
            t.select(["id", "structure_hash"]).append_column("split", pa.array([n] * t.num_rows))
            for n, t in self.splits.items()
        ]
        return pa.concat_tables(parts)


def prepare_data(folder: Path, target: str, config: TrainConfig) -> TrainingData:
    """Read a featurised dataset and split its crystals that carry `target`.

    The dataset's own split column decides when it holds any value (rows without one are
    skipped); otherwise a split seeded by `config.split_seed` with `split_fractions`.
    """
    manifest = Manifest.load(Path(folder))
    if manifest is None:
        raise FileNotFoundError(f"{folder}: not a featurised dataset (no manifest.json)")
    if target not in manifest.targets:
        known = ", ".join(manifest.targets) or "none"
        raise ValueError(f"{folder} has no target {target!r} (its targets: {known})")
    table = read_dataset(Path(folder), columns=[*TRAINING_COLUMNS, target])
    skipped = {"no_label": int(table[target].null_count)}
    table = table.filter(pc.is_valid(table[target]))
    if pc.any(pc.is_valid(table["split"])).as_py():
        split_source = "dataset"
        skipped["no_split"] = int(table["split"].null_count)
        table = table.filter(pc.is_valid(table["split"]))
    else:
        split_source = "seeded"
    rng = np.random.default_rng(config.split_seed)
    if config.max_crystals is not None and table.num_rows > config.max_crystals:
        skipped["max_crystals"] = table.num_rows - config.max_crystals
        table = table.take(np.sort(rng.choice(table.num_rows, config.max_crystals, False)))
    if split_source == "dataset":
        labels = table["split"].to_numpy(zero_copy_only=False)
    else:
        labels = seeded_split(table.num_rows, config.split_fractions, rng)
    # one chunk per column: a random `take` of a batch from 14 chunks cost 0.2 s, from one 10 ms
    splits = {name: table.filter(pa.array(labels == name)).combine_chunks() for name in SPLITS}
    if splits["train"].num_rows == 0 or splits["val"].num_rows == 0:
        raise ValueError(f"{folder}: {target} needs crystals in both train and val splits")
    return TrainingData(
        target=target,
        unit=manifest.targets[target],
        r_cut=manifest.r_cut,
        splits={name: t for name, t in splits.items() if t.num_rows},
        split_source=split_source,
        skipped={k: v for k, v in skipped.items() if v},
    )


def seeded_split(n: int, fractions: tuple[float, float, float], rng) -> np.ndarray:
    """train/val/test labels for n rows, each split at least one row when n >= 3."""
    n_val = max(1, round(fractions[1] * n)) if fractions[1] else 0
    n_test = max(1, round(fractions[2] * n)) if fractions[2] else 0
    labels = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    return labels[rng.permutation(n)]


# --- checkpoints ------------------------------------------------------------------------------


def save_model(model: PropertyModel, folder: Path, info: dict) -> None:
    """A model as weights (safetensors) and a JSON card (config, targets, units, r_cut)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(state, str(folder / MODEL_WEIGHTS))
    card = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "architecture": model.config.encoder,
        "library_version": __version__,
        "config": asdict(model.config),
        **info,
    }
    (folder / MODEL_INFO).write_text(json.dumps(card, indent=1))


def load_model(folder: Path) -> tuple[PropertyModel, dict]:
    """A model saved by `save_model`, and its card; no pickled code is read. The model is on
    the CPU with eager kernels: `Runtime.prepare` it to run elsewhere or compiled."""
    folder = Path(folder)
    try:
        card = json.loads((folder / MODEL_INFO).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {MODEL_INFO}, not a crystalformer model") from None
    if card.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder / MODEL_INFO}: not a {CHECKPOINT_FORMAT}")
    config = config_from_card(card.get("architecture", "crystalformer"), card["config"])
    model = build_model(config)
    model.load_state_dict(load_file(str(folder / MODEL_WEIGHTS)))
    return model, card


class CheckpointDir:
    """Epoch checkpoints of one run; LATEST names the newest complete one."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def latest(self) -> Path | None:
        pointer = self.path / LATEST
        return self.path / pointer.read_text().strip() if pointer.exists() else None

    def write(self, epoch: int, save: Callable[[Path], None]) -> Path:
        """Write into a fresh folder, then point LATEST at it: a kill leaves the old one."""
        name = f"epoch-{epoch:05d}"
        staging = self.path / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save(staging)
        final = self.path / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        write_atomic(self.path / LATEST, lambda tmp: tmp.write_text(name))
        for old in self.path.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class FitResult:
    model: PropertyModel  # the last weights
    swa_model: PropertyModel | None  # the equal-weight average over the SWA epochs
    history: list[dict]  # per epoch: epoch, train_loss, val_mae, lr, seconds
    final: dict[str, float]  # val_mae, val_mae_swa, test_mae, test_mae_swa (where defined)
    predictions: dict[str, np.ndarray]  # split -> predictions of the reported model


class Trainer:
    """State of one training run: model, optimiser, SWA average, step, history."""

    def __init__(
        self,
        data: TrainingData,
        model_config,  # any encoder's config (crystalformer.model.ENCODER_CONFIGS)
        config: TrainConfig,
        checkpoints: Path,
        card: dict | None = None,
        runtime: Runtime | None = None,  # default Runtime(); a checkpoint resumes under any
    ):
        self.data, self.config = data, config
        self.card = {"targets": [data.target], "units": {data.target: data.unit}, **(card or {})}
        self.checkpoints = CheckpointDir(checkpoints)
        torch.manual_seed(config.seed)
        self.model = build_model(model_config)
        self.model.check_cutoff(data.r_cut)
        labels = torch.tensor(data.splits["train"][data.target].to_numpy(), dtype=torch.float64)
        self.model.target_mean.fill_(float(labels.mean()))
        self.model.target_std.fill_(float(labels.std()) if len(labels) > 1 else 1.0)
        (runtime or Runtime()).prepare(self.model)
        self.device = self.model.device
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            (decay if parameter.ndim >= 2 and "embed" not in name else no_decay).append(parameter)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas,
        )  # fmt: skip
        self.swa: list[torch.Tensor] | None = None
        self.swa_count = 0
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.after_step: Callable[[], None] | None = None  # e.g. a benchmark's timed evaluation

    @property
    def swa_start_epoch(self) -> int:
        return self.config.epochs - self.config.swa_epochs

    def resume(self) -> bool:
        """Load the newest checkpoint, if any; True when one was found."""
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        self.model.load_state_dict(load_file(str(latest / MODEL_WEIGHTS)))
        tensors = load_file(str(latest / STATE_TENSORS), device=str(self.device))
        info = json.loads((latest / STATE_INFO).read_text())
        optimizer_state = {
            int(index): {key: tensors[f"optimizer.{index}.{key}"] for key in keys}
            for index, keys in info["optimizer_keys"].items()
        }
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": info["param_groups"]}
        )
        self.swa_count = info["swa_count"]
        if self.swa_count:
            self.swa = [tensors[f"swa.{k}"] for k in range(len(list(self.model.parameters())))]
        self.step, self.epoch, self.history = info["step"], info["epoch"], info["history"]
        return True

    def save_checkpoint(self) -> Path:
        def save(folder: Path) -> None:
            save_model(self.model, folder, self.card)
            state = self.optimizer.state_dict()
            tensors = {
                f"optimizer.{index}.{key}": value.detach().cpu().contiguous()
                for index, entry in state["state"].items()
                for key, value in entry.items()
            }
            if self.swa is not None:
                tensors.update({f"swa.{k}": t.cpu().contiguous() for k, t in enumerate(self.swa)})
            save_file(tensors, str(folder / STATE_TENSORS))
            info = {
                "epoch": self.epoch,
                "step": self.step,
                "swa_count": self.swa_count,
                "history": self.history,
                "param_groups": state["param_groups"],
                "optimizer_keys": {str(i): list(e) for i, e in state["state"].items()},
                "train_config": asdict(self.config),
            }
            (folder / STATE_INFO).write_text(json.dumps(info, indent=1))

        return self.checkpoints.write(self.epoch, save)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This epoch's shuffled batches: a function of (seed, epoch) only, so resumable."""
        order = np.random.default_rng([self.config.seed, epoch]).permutation(
            self.data.splits["train"].num_rows
        )
        return [
            order[s : s + self.config.batch_size]
            for s in range(0, len(order), self.config.batch_size)
        ]

    def train_epoch(self, progress: bool) -> dict:
        started = time.perf_counter()
        train = self.data.splits["train"]
        self.model.train()
        in_swa = self.epoch >= self.swa_start_epoch and self.config.swa_epochs > 0
        total, count = 0.0, 0
        batches = self.batches(self.epoch)
        decay_end = self.swa_start_epoch * len(batches)
        bar = tqdm(
            batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
            disable=not progress, unit="batch",
        )  # fmt: skip
        for rows in bar:
            part = train.take(rows)
            batch = self.model.make_batch(part).to(self.device)
            target = torch.tensor(part[self.data.target].to_numpy(), dtype=torch.float32)
            target = (target.to(self.device) - self.model.target_mean) / self.model.target_std
            lr = self.config.lr_at(decay_end if in_swa else self.step, decay_end)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = (self.model(batch)[:, 0] - target).abs().mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.step += 1
            if in_swa:
                self.update_swa()
            if self.after_step is not None:
                self.after_step()
            total += loss.item() * len(rows)
            count += len(rows)
            bar.set_postfix(loss=f"{total / count:.4f}")
        return {"train_loss": total / count, "lr": lr, "seconds": time.perf_counter() - started}

    def update_swa(self) -> None:
        """Equal-weight running average of the parameters after every SWA step."""
        parameters = [p.detach() for p in self.model.parameters()]
        if self.swa is None:
            self.swa = [p.clone() for p in parameters]
        else:
            for average, p in zip(self.swa, parameters, strict=True):
                average.add_(p - average, alpha=1 / (self.swa_count + 1))
        self.swa_count += 1

    def averaged_model(self) -> PropertyModel | None:
        if self.swa is None:
            return None
        averaged = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, average in zip(averaged.parameters(), self.swa, strict=True):
                p.copy_(average)
        return averaged

    def evaluate(self, model: PropertyModel, split: str) -> tuple[float, np.ndarray]:
        """MAE in target units on one split, and the predictions."""
        table = self.data.splits[split]
        predicted = predict_table(model, table, max_rows=self.config.eval_batch_size)[:, 0]
        return float(np.abs(predicted - table[self.data.target].to_numpy()).mean()), predicted

    def fit(
        self, on_epoch: Callable[[dict], None] | None = None, progress: bool = False
    ) -> FitResult:
        """Train to `config.epochs`, from wherever the run stands (0 or a resumed epoch)."""
        outer = tqdm(
            total=self.config.epochs, initial=self.epoch, desc=self.data.target,
            disable=not progress, unit="epoch",
        )  # fmt: skip
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch(progress)
            metrics["val_mae"], _ = self.evaluate(self.model, "val")
            self.epoch += 1
            metrics = {"epoch": self.epoch, **metrics}
            self.history.append(metrics)
            self.save_checkpoint()
            if on_epoch is not None:
                on_epoch(metrics)
            outer.update()
            outer.set_postfix(
                loss=f"{metrics['train_loss']:.4f}", val_mae=f"{metrics['val_mae']:.4g}"
            )
        outer.close()
        return self.result()

    def result(self) -> FitResult:
        """Final MAEs of the last and the averaged weights; predictions of the reported one."""
        swa_model = self.averaged_model()
        final, predictions = {}, {}
        for split in self.data.splits:
            if split == "train":
                continue
            final[f"{split}_mae"], predictions[split] = self.evaluate(self.model, split)
            if swa_model is not None:
                final[f"{split}_mae_swa"], predictions[split] = self.evaluate(swa_model, split)
        return FitResult(self.model, swa_model, self.history, final, predictions)
