"""The MoSLoRA layer: a frozen ``nn.Linear`` plus ΔW = (α/r)·B·M·A.

A (r×in) starts Gaussian with std 1/r (as diffusers' DreamBooth LoRA scripts and the MoSLoRA
reference initialise it: with Adam, how far ΔW moves per step scales with |A|, so the same learning
rate means the same thing here as there; kaiming-uniform is the option), B (out×r) at zero, and
the r×r mixer M between them is either learned (MoSLoRA), frozen (the paper's fixed-mixer variant)
or absent (plain LoRA).

Cost: the mixer is folded into the up matrix (B·M, an out×r product) and the α/r·scale factor
goes on the rank-r hidden state, so the layer computes ``(s·x·Aᵀ)·(B·M)ᵀ``: autograd keeps the
same activations as LoRA, and no out-sized tensor is multiplied by the scale afterwards, as PEFT
does. In a model given adapters by ``surgery.inject_adapter``, the layers of one shape form a
``MixerBank``: their B and M are stacked, and all their B·M come from one batched matmul per
forward of the model, so a training step dispatches no more operations than PEFT's LoRA.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError

MIXER_MODES = ("learned", "frozen", "none")
MIXER_INITS = ("kaiming", "orthogonal", "identity")
LORA_INITS = ("gaussian", "kaiming")


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters shared by every adapted layer of a model."""

    rank: int = 4
    alpha: float = 4.0
    mixer: str = "learned"
    mixer_init: str = "kaiming"
    dropout: float = 0.0
    lora_init: str = "gaussian"  # A's init: N(0, 1/r²) as PEFT's "gaussian", or kaiming-uniform as nn.Linear

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise AdapterError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.mixer not in MIXER_MODES:
            raise AdapterError(f"unknown mixer {self.mixer!r}: choose one of {', '.join(MIXER_MODES)}")
        if self.mixer_init not in MIXER_INITS:
            raise AdapterError(f"unknown mixer_init {self.mixer_init!r}: choose one of {', '.join(MIXER_INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lora_init not in LORA_INITS:
            raise AdapterError(f"unknown lora_init {self.lora_init!r}: choose one of {', '.join(LORA_INITS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def mix(up: torch.Tensor, mixer: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """B·M (B when there is no mixer): the up matrix of the equivalent plain LoRA, before α/r; in ``dtype`` if given."""
    if dtype is not None:
        up, mixer = up.to(dtype), None if mixer is None else mixer.to(dtype)
    return up if mixer is None else up @ mixer


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def init_mixer_(mixer: torch.Tensor, how: str) -> None:
    with torch.no_grad():
        if how == "kaiming":
            # The paper's choice: the same init nn.Linear(r, r) would get.
            nn.init.kaiming_uniform_(mixer, a=math.sqrt(5))
        elif how == "orthogonal":
            nn.init.orthogonal_(mixer)
        elif how == "identity":
            mixer.copy_(torch.eye(mixer.shape[0], dtype=mixer.dtype, device=mixer.device))
        else:
            raise AdapterError(f"unknown mixer_init {how!r}: choose one of {', '.join(MIXER_INITS)}")


class MoSLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; the adapter weights are kept in fp32 whatever the base dtype."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise AdapterError(f"MoSLoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.config = config  # the layer keeps its own settings: files are written from them
        self.rank = config.rank
        self.alpha = float(config.alpha)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, config.rank, dtype=dtype, device=device))
        if config.mixer == "none":
            self.register_parameter("lora_M", None)
        else:
            self.lora_M = nn.Parameter(
                torch.empty(config.rank, config.rank, dtype=dtype, device=device),
                requires_grad=config.mixer == "learned",
            )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._scale = 1.0  # inference-time multiplier on top of α/r
        self.enabled = True
        self.merged = False
        object.__setattr__(self, "bank", None)  # a MixerBank once surgery.bank_mixers groups the layer
        self.slot = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.lora_init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
        if self.lora_M is not None:
            init_mixer_(self.lora_M, self.config.mixer_init)

    def __getattr__(self, name: str):
        bank = self.__dict__.get("bank")
        if bank is not None and name in ("lora_B", "lora_M"):  # the layer's slice of its group's stacked weights
            return (bank.ups if name == "lora_B" else bank.mixers)[self.__dict__["slot"]]
        return super().__getattr__(name)

    # The wrapped layer's attributes, for code that inspects ``module.weight`` and friends.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        # A merged weight holds ΔW at the old scale: take it out before changing the scale.
        was_merged = self.merged
        self.unmerge()
        self._scale = float(value)
        if was_merged:
            self.merge()

    def mixed_up(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B·M (B without a mixer), the up matrix of the equivalent plain LoRA, before α/r; in ``dtype`` if given."""
        return mix(self.lora_B, self.lora_M, dtype)

    def up_weight(self) -> torch.Tensor:
        """B' = (α/r)·scale·B·M: the up matrix of the equivalent plain LoRA (out×r)."""
        return self.mixed_up() * (self.alpha / self.rank * self.scale)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out×in), in the adapter's dtype."""
        return self.up_weight() @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled or self.scale == 0:
            return out
        # Cast the small weights to the activations' dtype rather than the activations to fp32.
        compute_dtype = x.dtype if x.is_floating_point() else self.lora_A.dtype
        # The scale goes on the rank-r hidden state (PEFT scales the out-sized result), and M
        # into the up matrix, computed for the whole group at the start of the model's forward
        # (one batched matmul): per layer, the step then dispatches what LoRA's does.
        up = self.bank.product(self.slot) if self.bank is not None else None
        up = self.mixed_up() if up is None else up
        hidden = F.linear(self.dropout(x), _as(self.lora_A, compute_dtype)) * (self.alpha / self.rank * self._scale)
        return out + F.linear(hidden, _as(up, compute_dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Adds ΔW into the base weight; the forward then costs what the bare layer costs."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
            f"mixer={self.config.mixer}"
        )


class MixerBank(nn.Module):
    """The B and M of a group of layers (same shapes, dtype and device), stacked, and their B·M from one bmm.

    The bank owns the group's up matrices and mixers as two stacked parameters; each layer's ``lora_B`` and
    ``lora_M`` are its slices (views, so files, checkpoints and in-place restores work as before). ``refresh``
    runs before every forward of the model the layers are in (a forward pre-hook set by
    ``surgery.bank_mixers``): one ``bmm`` gives every layer its B·M, so a training step dispatches a few
    operations per group instead of a matmul, its two backward matmuls and their views per layer, and the
    optimizer steps two tensors per group instead of two per layer. A layer uses its product only during
    the model's forward, or during a backward pass (where gradient checkpointing recomputes the forward
    and must find the same products), in the same grad mode; otherwise (a layer called on its own, say
    after an optimizer step, which need not bump version counters) it computes its own B·M.
    """

    def __init__(self, layers: list[MoSLoRALinear]):
        super().__init__()
        self.ups = nn.Parameter(torch.stack([layer.lora_B.detach() for layer in layers]))
        self.mixers = nn.Parameter(torch.stack([layer.lora_M.detach() for layer in layers]),
                                   requires_grad=layers[0].lora_M.requires_grad)
        object.__setattr__(self, "layers", layers)  # not submodules: they belong to the model already
        for slot, layer in enumerate(layers):
            del layer._parameters["lora_B"], layer._parameters["lora_M"]
            object.__setattr__(layer, "bank", self)  # not a submodule of the layer: one owner, the model
            layer.slot = slot
        self.products: tuple[torch.Tensor, ...] | None = None
        self.grad_enabled = False
        self.in_forward = False  # set between the model's forward pre-hook and its forward hook

    def refresh(self) -> None:
        self.products = torch.bmm(self.ups, self.mixers).unbind(0)
        self.grad_enabled, self.in_forward = torch.is_grad_enabled(), True

    def product(self, slot: int) -> torch.Tensor | None:
        """The layer's B·M from the last refresh, or None when it may be stale."""
        if self.products is None or self.grad_enabled != torch.is_grad_enabled():
            return None
        if not self.in_forward and torch._C._current_graph_task_id() == -1:  # neither forward nor backward
            return None
        return self.products[slot]

    def release(self) -> None:
        """Gives every layer its own B and M parameters back (as they are now) and leaves the group."""
        for slot, layer in enumerate(self.layers):
            object.__setattr__(layer, "bank", None)
            layer.lora_B = nn.Parameter(self.ups[slot].detach().clone(), requires_grad=self.ups.requires_grad)
            layer.lora_M = nn.Parameter(self.mixers[slot].detach().clone(), requires_grad=self.mixers.requires_grad)
        object.__setattr__(self, "layers", [])
        self.products = None


class BankRefresh:
    """The model's forward pre-hook: refreshes its mixer banks (a callable object, so that a deepcopy of the model
    keeps it)."""

    def __init__(self, banks: list[MixerBank]):
        self.banks = banks

    def __call__(self, module, *args) -> None:
        for bank in self.banks:
            bank.refresh()


class BankClose:
    """The model's forward hook: its forward is over. A class of its own, not a flag of ``BankRefresh``: it has no
    tensor operation, so torch.compile skips its code for good, and shared code would take the refresh with it
    (the second step of a compiled run then traced the refresh again)."""

    def __init__(self, banks: list[MixerBank]):
        self.banks = banks

    def __call__(self, module, *args) -> None:
        for bank in self.banks:
            bank.in_forward = False
