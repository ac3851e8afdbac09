"""An exponential moving average of the adapter weights (--use_ema), as OneTrainer, SimpleTuner and ai-toolkit keep.

After each optimizer step every shadow tensor moves toward its weight: ``shadow ← shadow + (1 − d)·(weight −
shadow)``. The decay d follows diffusers' ``EMAModel``: ``min(--ema_decay, (1 + t)/(10 + t))`` at step t, or with
``--ema_warmup`` the power warm-up ``1 − (1 + t)^(−2/3)`` (SimpleTuner's), so the first steps are not averaged
with the untrained start. The shadow is fp32, on the training device or with ``--ema_cpu`` in host memory. There,
each step copies the adapter to the host, which makes the host wait for the device. It is written as the adapter,
checkpointed, and restored exactly on resume. Validation images are drawn from it.

diffusers' ``EMAModel`` is not used: it needs the shadow on the weights' device, and a checkpoint of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import TrainingError
from ..safe_files import read_safetensors, write_safetensors

EMA_FILE = "ema.safetensors"  # in a checkpoint folder


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = False, cpu: bool = False):
        self.params, self.decay, self.warmup = list(params), decay, warmup
        self.shadow = [p.detach().to("cpu" if cpu else p.device, torch.float32, copy=True) for p in self.params]
        self.step = 0  # optimizer steps averaged in: a Python number, so reading it never waits for the device

    def decay_at(self, step: int) -> float:
        t = max(0, step - 1)
        ramp = 1 - (1 + t) ** (-2 / 3) if self.warmup else (1 + t) / (10 + t)
        return max(0.0, min(self.decay, ramp))

    @torch.no_grad()
    def update(self) -> None:
        """Folds the weights as they now are into the shadow (after an optimizer step)."""
        self.step += 1
        weight = 1.0 - self.decay_at(self.step)
        current = [p.detach().to(s.device, torch.float32) for s, p in zip(self.shadow, self.params)]
        torch._foreach_lerp_(self.shadow, current, weight)  # at weight 1 (decay 0) exactly the weights

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The shadow in the adapter's place for the block (saving the adapter, validation images), then the live
        weights back, bit for bit."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live):
                    p.copy_(saved)

    def save(self, folder: Path) -> Path:
        tensors = {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        return write_safetensors(Path(folder) / EMA_FILE, tensors, {"step": str(self.step), "decay": repr(self.decay)})

    def restore(self, folder: Path) -> bool:
        """The shadow and its step from a checkpoint; False (nothing changed) when the checkpoint holds none."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        tensors, metadata = read_safetensors(path)
        shapes = [tuple(tensors[f"ema.{i}"].shape) if f"ema.{i}" in tensors else None for i in range(len(self.shadow))]
        if len(tensors) != len(self.shadow) or shapes != [tuple(s.shape) for s in self.shadow]:
            raise TrainingError(f"{path}: its EMA does not match the adapter being trained")
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(tensors[f"ema.{i}"])
        self.step = int(metadata.get("step", "0"))
        return True
