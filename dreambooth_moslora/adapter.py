"""The MoSLoRA layer: a frozen ``nn.Linear`` plus ΔW = (α/r)·B·M·A.

A (r×in) starts Gaussian with std 1/r (as diffusers' DreamBooth LoRA scripts and the MoSLoRA
reference initialise it: with Adam, how far ΔW moves per step scales with |A|, so the same learning
rate means the same thing here as there; kaiming-uniform is the option), B (out×r) at zero, and
the r×r mixer M between them is either learned (MoSLoRA), frozen (the paper's fixed-mixer variant)
or absent (plain LoRA).

Cost: the mixer is folded into the up matrix once per forward (B·M, an out×r product)
and the α/r·scale factor goes on the rank-r hidden state, so the layer computes
``(s·x·Aᵀ)·(B·M)ᵀ``: autograd keeps the same activations as LoRA, and no out-sized
tensor is multiplied by the scale afterwards, as PEFT does.
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
        # into the up matrix: autograd then keeps what LoRA keeps, plus one out×r product.
        hidden = F.linear(self.dropout(x), self.lora_A.to(compute_dtype)) * (self.alpha / self.rank * self._scale)
        return out + F.linear(hidden, self.mixed_up().to(compute_dtype))

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
