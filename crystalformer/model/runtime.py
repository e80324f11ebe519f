"""Where and how a model runs: given when a model is prepared, never saved with it.

The architecture (model/config.py) is what a model is; a `Runtime` is how this machine runs
it: the device, TF32 or not, the chunk size of the eager sparse kernels, and whether those
kernels are torch.compile'd. `Runtime.prepare` applies it once, so forward passes read no
flags, and a checkpoint taken under one runtime resumes or predicts under any other.
Defaults are plain eager PyTorch; conf/runtime.yaml holds the shipped settings.

Torch is imported when a model is prepared, not with this module, so reading conf stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch


class Runnable(Protocol):
    """What a runtime prepares: a module that picks its sparse kernels (PropertyModel)."""

    def select_kernels(self, chunk: int, compiled: bool) -> None: ...

    def to(self, device: torch.device) -> Any: ...


M = TypeVar("M", bound=Runnable)


@dataclass(frozen=True)
class Runtime:
    """How a prepared model runs (hashable: a process keeps one prepared copy per runtime)."""

    device: str = "auto"  # "auto" (CUDA when there is one), "cpu", "cuda", "cuda:1", ...
    allow_tf32: bool = False  # TF32 matrix products on CUDA: faster, ~1e-3 relative error
    image_chunk: int = 8192  # pairs or images per eager chunk: bounds (edges × heads × features)
    compiled: bool = False  # torch.compile the sparse products (fused, no chunks)

    def with_options(self, **options: Any) -> Runtime:
        """This runtime with the options a caller gave; None keeps this one's setting."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def torch_device(self) -> torch.device:
        """The device, "auto" resolved to CUDA when there is one."""
        import torch

        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def prepare(self, model: M) -> M:
        """`model` on this device with its kernels chosen, ready to train or predict.

        TF32 is a process-wide torch switch: the last runtime prepared on CUDA sets it.
        """
        import torch

        device = self.torch_device()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
        model.select_kernels(self.image_chunk, self.compiled)
        return model.to(device)
