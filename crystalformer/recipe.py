"""Training settings: a plain dataclass (no torch import), loadable from conf/train/*.yaml."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("inverse_sqrt", "cosine")


@dataclass
class TrainConfig:
    """The paper's recipe for MP (500 epochs, batch 128); presets in conf/train/."""

    epochs: int = 500
    swa_epochs: int = 50  # the last epochs: lr frozen, weights averaged after every step
    batch_size: int = 128
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-5  # on weight matrices only
    grad_clip: float = 1.0
    schedule: str = "inverse_sqrt"  # or "cosine": linear warm-up, then cosine to lr·final_lr
    decay_steps: int = 4000  # inverse_sqrt: lr(t) = lr·sqrt(decay_steps / (decay_steps + t))
    warmup_steps: int = 0  # cosine: linear from 0 to lr over these steps
    final_lr: float = 0.02  # cosine: fraction of lr reached when SWA starts (and kept there)
    seed: int = 123  # initialisation and batch order
    split_seed: int = 123  # the 80/10/10 split of datasets that have none
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_crystals: int | None = None  # a seeded subset of the labelled crystals, for quick runs
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 <= self.swa_epochs <= self.epochs:
            raise ValueError("need epochs >= 1 and 0 <= swa_epochs <= epochs")
        if self.batch_size < 1 or (self.max_crystals is not None and self.max_crystals < 3):
            raise ValueError("need batch_size >= 1 and max_crystals >= 3")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-9:
            raise ValueError("split_fractions must be three fractions summing to 1")

    def lr_at(self, step: int, decay_end: int) -> float:
        """The learning rate at `step`; `decay_end` is the step where SWA starts (the caller
        passes min(step, decay_end), so the rate is frozen from there on)."""
        if self.schedule == "inverse_sqrt":
            return self.lr * math.sqrt(self.decay_steps / (self.decay_steps + step))
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, decay_end - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.final_lr + (1 - self.final_lr) * cosine)
