"""Where a training step's time goes: torch's profiler over a few batches of the real loop (``--profile_steps N``).

The window opens after the first batches (allocation, autotuning, compilation) and closes ``N`` batches later. It
writes ``profile.json`` beside the adapter — per batch: operations dispatched, kernel launches, reads of a device
value by the host (``.item()``, ``float(t)``, ``if t:``), the loop's planned reads of its losses, device
synchronisations, copies between host and device, tensors made on the host, Python's full garbage collections (each
walks every object alive, stalling the step) and the objects frozen out of them, wall time, the GPU's busy share,
and the kernels that took longest — and ``profile-trace.json`` for chrome://tracing or Perfetto. On a CPU the same
counts come out (no kernels, no copies): a test reads them, so a step that starts waiting on the device again shows
without a GPU.

A tensor made on the host is one made by a factory (``torch.randn``, ``torch.tensor``, …) without a device, or from
host data: on a GPU it must be copied over, and an ordinary copy makes the host wait.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..safe_files import write_text

LOSS_READ = "read losses"  # the loop's one planned read of device values, every --logging_steps steps
SCALAR_READS = {"aten::_local_scalar_dense"}  # what .item(), float(t), bool(t) and friends come down to
DEVICE_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}
FACTORIES = ("randn", "rand", "randint", "randperm", "zeros", "ones", "empty", "full", "arange", "linspace", "eye")
FROM_HOST_DATA = ("tensor", "as_tensor")


class HostTensors(TorchFunctionMode):
    """Counts tensors made on the host during a step, by where in the code they were made."""

    def __init__(self):
        super().__init__()
        self.where: Counter[str] = Counter()
        self._factories = {getattr(torch, name) for name in FACTORIES}
        self._from_data = {getattr(torch, name) for name in FROM_HOST_DATA}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_host = func in self._factories and kwargs.get("device") is None
        if on_host or (func in self._from_data and not (args and isinstance(args[0], torch.Tensor))):
            import traceback

            frame = traceback.extract_stack(limit=2)[0]  # the caller
            self.where[f"{Path(frame.filename).name}:{frame.lineno} torch.{func.__name__}"] += 1
        return func(*args, **kwargs)


class StepProfile:
    """Profiles batches ``after`` + 1 … ``after`` + ``steps`` of the loop; ``tick()`` is called as each batch starts.
    With ``steps`` 0 it does nothing."""

    def __init__(self, steps: int, output_dir: Path, after: int = 2):
        self.steps, self.output_dir, self.after = steps, Path(output_dir), after
        self.ticks = 0
        self.profiler = None
        self.host_tensors: HostTensors | None = None
        self.started = 0.0
        self.summary: dict | None = None
        self.collections: list[float] = []  # seconds each full collection in the window took
        self._collecting = 0.0

    @contextmanager
    def batch(self):
        """Around each batch's forward, backward and optimizer step: opens and closes the window as batches go by,
        and counts the tensors the step makes on the host (the data loader's and the loop's own are not counted)."""
        if self.steps <= 0:
            yield
            return
        if self.ticks == self.after:
            self._open()
        elif self.ticks == self.after + self.steps:
            self.close()
        self.ticks += 1
        if self.profiler is None:
            yield
            return
        with self.host_tensors:
            yield

    def _open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()
        self.host_tensors = HostTensors()
        gc.callbacks.append(self._on_collection)
        self.started = time.perf_counter()

    def _on_collection(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._collecting = time.perf_counter()
        else:
            self.collections.append(time.perf_counter() - self._collecting)

    def close(self) -> dict | None:
        """Ends the window (at the loop's end at the latest) and writes the files; returns the summary."""
        if self.profiler is None:
            return self.summary
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        gc.callbacks.remove(self._on_collection)
        batches = max(self.ticks - self.after, 1)
        self.summary = summarise(self.profiler.events(), batches, wall, self.host_tensors.where)
        self.summary.update(full_collections_per_batch=len(self.collections) / batches,
                            full_collection_ms_per_batch=round(sum(self.collections) * 1e3 / batches, 3),
                            frozen_objects=gc.get_freeze_count())
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.output_dir / "profile.json", json.dumps(self.summary, indent=1) + "\n")
        self.profiler.export_chrome_trace(str(self.output_dir / "profile-trace.json"))
        self.profiler = None
        return self.summary


def summarise(events, batches: int, wall_seconds: float, host_tensors: Counter) -> dict:
    """Per-batch counts from the profiler's events (see the module's docstring)."""
    host = [event for event in events if event.device_type == torch.autograd.DeviceType.CPU]
    names = Counter(event.name for event in host)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list] = {}
    for kernel in kernels:
        entry = per_kernel.setdefault(kernel.name, [0, 0.0])
        entry[0] += 1
        entry[1] += kernel.time_range.end - kernel.time_range.start
    top = sorted(per_kernel.items(), key=lambda item: -item[1][1])[:15]
    return {
        "batches": batches,
        "wall_ms_per_batch": round(wall_seconds * 1e3 / batches, 3),
        "ops_per_batch": sum(n for name, n in names.items() if name.startswith("aten::")) / batches,
        "scalar_reads_per_batch": len([e for e in host if e.name in SCALAR_READS and not in_cpu_optimizer(e, kernels)])
        / batches,
        "loss_reads_per_batch": names[LOSS_READ] / batches,
        "device_syncs_per_batch": sum(names[name] for name in DEVICE_SYNCS) / batches,
        "kernel_launches_per_batch": sum(names[name] for name in LAUNCHES) / batches,
        "host_to_device_copies_per_batch": sum(1 for k in kernels if "HtoD" in k.name) / batches,
        "device_to_host_copies_per_batch": sum(1 for k in kernels if "DtoH" in k.name) / batches,
        "host_tensors_per_batch": sum(host_tensors.values()) / batches,
        "host_tensors_made_at": dict(host_tensors.most_common(10)),
        "gpu_busy_share": busy_share(kernels, wall_seconds) if kernels else None,
        "top_kernels": [{"name": name[:120], "calls_per_batch": n / batches,
                         "ms_per_batch": round(us / 1e3 / batches, 3)} for name, (n, us) in top],
    }


def in_cpu_optimizer(event, kernels) -> bool:
    """A read inside the optimizer's step on a CPU run: CPU optimizers read their step counts, host values that a
    GPU's fused optimizer keeps on the device; not a wait for the device."""
    if kernels:
        return False
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("Optimizer.step"):
        parent = parent.cpu_parent
    return parent is not None


def busy_share(kernels, wall_seconds: float) -> float:
    """The share of the window in which the GPU ran at least one kernel or copy."""
    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return round(busy / 1e6 / wall_seconds, 4)
