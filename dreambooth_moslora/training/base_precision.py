"""Frozen base weights stored in less precision than the step computes in (``--base_precision``).

``fp8``: every frozen ``nn.Linear`` and ``nn.Conv2d`` weight of the model is kept in float8 (e4m3) with one scale
per output channel (its largest magnitude ÷ 448, e4m3's largest value), and upcast to the activations' dtype
layer by layer in the forward — half a bf16 UNet's memory (SDXL's: 2.6 GB instead of 5.1). kohya's ``--fp8_base``
casts without a scale; the scale keeps small channels from falling into e4m3's subnormals. ``bf16``/``fp16``:
the same, in that dtype and without a scale, where it differs from the compute dtype. Norms, embeddings and biases
stay in the compute dtype; the adapters, their gradients and the optimizer's state stay in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}


def stored(weight: torch.Tensor, storage: torch.dtype, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight in ``storage``, its per-output-channel scale in ``compute``; the scale is None but for fp8)."""
    if storage != FP8:
        return weight.detach().to(storage), None
    amax = weight.detach().float().abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True)
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (weight.detach().float() / scale).to(FP8), scale.to(compute)


def upcast(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = layer.weight.to(dtype)
    return weight if layer.weight_scale is None else weight * layer.weight_scale.to(dtype)


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored low and upcast per call."""

    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, upcast(self, x.dtype), bias)


class StoredConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored low and upcast per call."""

    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, upcast(self, x.dtype), bias)


KINDS = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def store_weights(model: nn.Module, storage: torch.dtype, compute: torch.dtype) -> int:
    """Stores the frozen Linear and Conv2d weights of ``model`` in ``storage``; returns how many bytes that saved
    against ``compute``. Call it before the adapters go in and before the model moves to the device."""
    saved = 0
    for module in model.modules():
        kind = KINDS.get(type(module))
        if kind is None or module.weight.requires_grad:
            continue
        weight, scale = stored(module.weight, storage, compute)
        saved += module.weight.numel() * (torch.finfo(compute).bits - torch.finfo(storage).bits) // 8
        module.__class__ = kind
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.register_buffer("weight_scale", scale)
    return saved


def place(model: nn.Module, base_precision: str, compute: torch.dtype, device) -> int:
    """The model on ``device`` in ``compute``, its frozen weights stored as ``base_precision`` says (auto: in
    ``compute``); returns the bytes that saved."""
    storage = STORAGE.get(base_precision, compute)
    if storage == compute:
        model.to(device, dtype=compute)
        return 0
    saved = store_weights(model, storage, compute)
    cast_the_rest(model, compute)
    model.to(device)
    return saved


def cast_the_rest(model: nn.Module, compute: torch.dtype) -> None:
    """Every floating-point parameter and buffer not stored low (norms, embeddings, biases, scales) in ``compute``:
    ``model.to(dtype)`` would cast the stored weights back up."""
    low = set(STORAGE.values()) - {compute}
    replace_tensors(model, lambda t: t.to(compute) if t.is_floating_point() and t.dtype not in low else t)


def replace_tensors(model: nn.Module, change) -> None:
    """Every parameter and buffer of ``model`` through ``change`` (a tensor → a new one, or itself to keep it); a
    parameter stays a parameter, with its requires_grad."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                new = None if tensor is None else change(tensor)
                if new is not tensor:
                    is_parameter = isinstance(tensor, nn.Parameter)
                    store[name] = nn.Parameter(new.detach(), tensor.requires_grad) if is_parameter else new
