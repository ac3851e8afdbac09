"""Model surgery: find the SDXL layers to adapt, swap MoSLoRA layers in, take them out, fuse them.

Layers are addressed by their module path inside one model (``down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q``); a pipeline is a dict of such models by component name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .adapter import AdapterConfig, BankClose, BankRefresh, MixerBank, MoSLoRALinear
from .errors import AdapterError

# The attention projections that diffusers' SDXL DreamBooth LoRA script adapts, in self- (attn1)
# and cross-attention (attn2) of every transformer block.
UNET_TARGETS = (r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",)
# The attention projections of every CLIP encoder layer (CLIP-L and OpenCLIP-bigG alike).
TEXT_ENCODER_TARGETS = (r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",)

DEFAULT_TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS, "text_encoder_2": TEXT_ENCODER_TARGETS}

_FUSED_ATTR = "_moslora_fused_layers"
_BANKS = "moslora_mixer_banks"  # the submodule holding a model's MixerBanks
_BANK_HOOK = "_moslora_bank_hook"


def find_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Paths of the ``nn.Linear`` layers whose path matches any of the regular expressions."""
    compiled = [re.compile(p) for p in patterns]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.search(name) for p in compiled)
    ]


def adapter_layers(model: nn.Module) -> dict[str, MoSLoRALinear]:
    """The live MoSLoRA layers of a model, by the path of the layer they replace."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoSLoRALinear)}


def has_adapter(model: nn.Module) -> bool:
    return bool(adapter_layers(model)) or bool(getattr(model, _FUSED_ATTR, None))


def refuse_second_adapter(model: nn.Module, action: str) -> None:
    """A model takes one adapter at a time: ``action`` ("injecting", "loading") another is refused in one line."""
    if has_adapter(model):
        raise AdapterError(f"{type(model).__name__} already carries a MoSLoRA adapter: "
                           f"remove it before {action} another")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject_adapter(
    model: nn.Module,
    config: AdapterConfig,
    targets: Iterable[str] | None = None,
    extra_targets: Iterable[str] = (),
) -> list[nn.Parameter]:
    """Replaces every matching ``nn.Linear`` by a MoSLoRA layer; returns the trainable parameters.

    The rest of the model is frozen, as in PEFT: afterwards only the adapter trains.

    ``targets`` are regular expressions searched in module paths (default: the UNet's
    attention projections); ``extra_targets`` adds to them, for power users.
    """
    refuse_second_adapter(model, "injecting")
    patterns = list(UNET_TARGETS if targets is None else targets) + list(extra_targets)
    names = find_targets(model, patterns)
    if not names:
        raise AdapterError(f"no nn.Linear layer of {type(model).__name__} matches the targets {patterns}")
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, MoSLoRALinear(model.get_submodule(name), config))
    if config.mixer != "none":
        bank_mixers(model)
    return trainable_parameters(model)


def bank_mixers(model: nn.Module) -> list[MixerBank]:
    """Groups the model's mixer layers by shape, dtype and device, and has every forward of the model compute
    each group's B·M in one batched matmul (see ``MixerBank``)."""
    groups: dict[tuple, list[MoSLoRALinear]] = {}
    for layer in adapter_layers(model).values():
        if layer.lora_M is not None:
            key = (layer.out_features, layer.rank, layer.lora_B.dtype, layer.lora_B.device)
            groups.setdefault(key, []).append(layer)
    banks = nn.ModuleList(MixerBank(layers) for layers in groups.values())
    model.add_module(_BANKS, banks)  # registered: .to(), the model's parameters and DDP see them
    refresh, done = BankRefresh(list(banks)), BankClose(list(banks))
    object.__setattr__(model, _BANK_HOOK, (model.register_forward_pre_hook(refresh), model.register_forward_hook(done)))
    return list(banks)


def unbank_mixers(model: nn.Module) -> None:
    """Gives each mixer layer its own B and M again (as they are now): what regional compilation needs, where each
    block is compiled once for all blocks of its kind and a layer's place in a group would tell them apart."""
    banks = model._modules.pop(_BANKS, None)
    for bank in banks or ():
        bank.release()
    for handle in model.__dict__.pop(_BANK_HOOK, ()):
        handle.remove()


def inject_layers(model: nn.Module, layers: dict[str, MoSLoRALinear]) -> None:
    """Puts ready-made MoSLoRA layers in place of the base layers they wrap (used when loading files)."""
    refuse_second_adapter(model, "loading")
    for name, layer in layers.items():
        _set_submodule(model, name, layer)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable tensors: each layer's own, then its groups' stacked B and M."""
    own = [p for layer in adapter_layers(model).values() for p in layer.parameters() if p.requires_grad]
    banks = model._modules.get(_BANKS) or ()
    return own + [p for bank in banks for p in bank.parameters() if p.requires_grad]


def mixer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that hold the model's mixers: its groups' stacked M, and the M of layers outside a group."""
    banks = model._modules.get(_BANKS) or ()
    own = [layer._parameters["lora_M"] for layer in adapter_layers(model).values()
           if layer._parameters.get("lora_M") is not None]
    return [bank.mixers for bank in banks] + own


def remove_adapter(model: nn.Module) -> int:
    """Puts the original layers back, with their original weights; returns how many layers it restored."""
    unbank_mixers(model)
    layers = adapter_layers(model)
    for name, layer in layers.items():
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    fused = getattr(model, _FUSED_ATTR, None) or {}
    for layer in fused.values():
        layer.unmerge()  # the base layer object is the one in the model: this restores its weight
    if fused:
        delattr(model, _FUSED_ATTR)
    return len(layers) + len(fused)


def fuse_adapter(model: nn.Module) -> int:
    """Merges ΔW into the base weights and takes the wrappers out: inference then costs nothing extra.

    The adapter is remembered on the model, so ``remove_adapter`` can still subtract it again.
    """
    unbank_mixers(model)
    layers = adapter_layers(model)
    for name, layer in layers.items():
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    if layers:
        setattr(model, _FUSED_ATTR, {**getattr(model, _FUSED_ATTR, {}), **layers})
    return len(layers)


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    if getattr(model, _FUSED_ATTR, None):
        raise AdapterError("the adapter is fused into the weights: load it unfused to change its scale")
    for layer in adapter_layers(model).values():
        layer.scale = scale


def inject_components(
    components: dict[str, nn.Module], config: AdapterConfig, targets: dict[str, Iterable[str]] | None = None
) -> dict[str, list[nn.Parameter]]:
    """Injects into several models at once (UNet and text encoders); returns their trainable parameters."""
    targets = DEFAULT_TARGETS if targets is None else targets
    chosen = {c: m for c, m in components.items() if c in targets and m is not None}
    for model in chosen.values():  # refuse before touching any model
        refuse_second_adapter(model, "injecting")
    return {c: inject_adapter(m, config, targets[c]) for c, m in chosen.items()}
