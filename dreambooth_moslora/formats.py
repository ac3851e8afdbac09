"""Adapter files: native MoSLoRA, diffusers LoRA and kohya LoRA, all safetensors.

Because B·M·A has rank ≤ r, a MoSLoRA layer is exactly the plain LoRA with down = A and
up = B·M. The diffusers file folds M and α/r into the up matrix (stock diffusers then
loads it with scale 1); the kohya file folds M and keeps α in its ``.alpha`` entry. No file
carries the mixer under a key that a stock loader would drop.

Reading never unpickles anything: the safetensors header is checked by hand (length,
JSON, dtypes, offsets) before a byte of tensor data is touched.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import AdapterConfig, MoSLoRALinear
from .errors import AdapterFileError, AdapterMismatchError
from .surgery import COMPONENTS, adapter_layers

NATIVE_FILE = "moslora_adapter.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
FILE_NAMES = {"native": NATIVE_FILE, "diffusers": DIFFUSERS_FILE, "kohya": KOHYA_FILE}
FORMATS = tuple(FILE_NAMES)

NATIVE_FORMAT_NAME = "dreambooth-moslora"
NATIVE_FORMAT_VERSION = 1
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass
class LayerWeights:
    """One adapted layer as stored in a file: ΔW = (alpha/rank)·up·mixer·down."""

    down: torch.Tensor  # A, rank × in
    up: torch.Tensor  # B, out × rank
    alpha: float
    mixer: torch.Tensor | None = None  # M, rank × rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class AdapterFile:
    format: str
    layers: dict[str, dict[str, LayerWeights]]  # component → module path → weights
    config: AdapterConfig  # the adapter's settings (rank/alpha of the most common layer)
    metadata: dict[str, str]


# ---------------------------------------------------------------- safetensors, read and written safely


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, checked, without reading tensor data.

    Any defect (truncated, not safetensors, absurd sizes, malformed entries) is one AdapterFileError.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: truncated ({size} bytes) — not a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFileError(
                f"{path}: not a safetensors file, or truncated (header claims {header_len} bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: malformed safetensors metadata (values must be strings)")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and entry.get("dtype") in _DTYPE_SIZES
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        )
        if not ok:
            raise AdapterFileError(f"{path}: malformed safetensors entry for tensor {name!r}")
        begin, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if not 0 <= begin <= end <= data_len:
            raise AdapterFileError(
                f"{path}: truncated or corrupt (tensor {name!r} lies at bytes {begin}–{end}, data has {data_len})"
            )
        if end - begin != numel * _DTYPE_SIZES[entry["dtype"]]:
            raise AdapterFileError(f"{path}: corrupt tensor {name!r} (shape {entry['shape']} does not fit its bytes)")
    return header, dict(metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads a safetensors file after checking its header; any defect is one AdapterFileError."""
    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own checks, as a last line of defence
        raise AdapterFileError(f"{path}: unreadable safetensors file ({exc})") from None
    return tensors, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes atomically: a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- naming


def sgm_unet_path(path: str, layers_per_block: int) -> str | None:
    """The original (SGM) UNet path kohya and A1111 use for a diffusers SDXL path, or None.

    SGM counts the UNet's sub-blocks flatly: input_blocks.0 is conv_in, then each down level
    has ``layers_per_block`` (resnet, attention) pairs and a downsampler; each up level has one
    pair more. Only paths inside attention blocks are mapped: the transformer's own layer
    names are the same in both layouts.
    """
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        level, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + level * (layers_per_block + 1) + layer}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        level, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{level * (layers_per_block + 1) + layer}.1.{rest}"
    return None


def file_path(component: str, model: nn.Module, path: str) -> str:
    """A module path as files spell it: text-encoder layers always under ``text_model.``.

    transformers 5 dropped the ``text_model`` level from CLIPTextModel (not from the
    projection model); every LoRA file in the wild, kohya's and diffusers', keeps it.
    """
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path


def module_path(component: str, model: nn.Module, path: str) -> str:
    """The inverse of ``file_path`` for this model."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and path.startswith("text_model."):
        return path[len("text_model.") :]
    return path


def _layers_per_block(unet: nn.Module) -> int:
    lpb = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if not isinstance(lpb, int):
        raise AdapterFileError("kohya names need a UNet with the same layers_per_block at every level")
    return lpb


def kohya_name(component: str, path: str, model: nn.Module) -> str:
    path = file_path(component, model, path)
    if component == "unet":
        sgm = sgm_unet_path(path, _layers_per_block(model))
        if sgm is None:
            raise AdapterFileError(
                f"unet layer {path} has no kohya (SGM) name: the kohya format covers layers inside attention blocks"
            )
        path = sgm
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


def _linear_paths(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, MoSLoRALinear)) and not name.endswith(".base_layer")
    ]


def kohya_name_map(components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every kohya layer name a file may use → (component, module path), in SGM and diffusers spellings."""
    names: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        if model is None or component not in KOHYA_PREFIXES:
            continue
        prefixes = [KOHYA_PREFIXES[component]] + (["lora_te_"] if component == "text_encoder" else [])
        lpb = _layers_per_block(model) if component == "unet" else None
        for path in _linear_paths(model):
            spellings = [file_path(component, model, path)]
            if component == "unet" and (sgm := sgm_unet_path(path, lpb)):
                spellings.append(sgm)
            for prefix in prefixes:
                for spelling in spellings:
                    names[prefix + spelling.replace(".", "_")] = (component, path)
    return names


# ---------------------------------------------------------------- writing


def _folded_up(layer: MoSLoRALinear, with_alpha: bool) -> torch.Tensor:
    """B·M (times α/r when asked), computed in float64 so the fold adds no rounding of its own."""
    up = layer.lora_B.detach().double()
    if layer.lora_M is not None:
        up = up @ layer.lora_M.detach().double()
    if with_alpha:
        up = up * (layer.alpha / layer.rank)
    return up.float()


def _live_layers(components: dict[str, nn.Module]) -> tuple[AdapterConfig, list[tuple[str, str, str, MoSLoRALinear]]]:
    """The adapter's settings, and each live layer as (component, module path, path in files, layer)."""
    found = [
        (component, path, file_path(component, model, path), layer)
        for component, model in components.items()
        if model is not None
        for path, layer in adapter_layers(model).items()
    ]
    if not found:
        raise AdapterFileError("nothing to save: no model carries MoSLoRA layers")
    first = found[0][3]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return AdapterConfig(first.rank, first.alpha, first.mixer_mode, first.mixer_init, dropout), found


def native_state(components, base_model=None, training=None):
    config, layers = _live_layers(components)
    tensors, targets = {}, {}
    for component, _, name, layer in layers:
        tensors[f"{component}.{name}.moslora_A"] = layer.lora_A.detach().float()
        tensors[f"{component}.{name}.moslora_B"] = layer.lora_B.detach().float()
        if layer.lora_M is not None:
            tensors[f"{component}.{name}.moslora_M"] = layer.lora_M.detach().float()
        targets.setdefault(component, []).append(name)
    metadata = {
        "format": NATIVE_FORMAT_NAME,
        "format_version": str(NATIVE_FORMAT_VERSION),
        "adapter_config": json.dumps(config.to_dict()),
        "targets": json.dumps({c: sorted(names) for c, names in targets.items()}),
        "base_model": base_model or "",
        "training": json.dumps(training or {}),
    }
    return tensors, metadata


def diffusers_state(components, base_model=None, training=None):
    config, layers = _live_layers(components)
    tensors = {}
    for component, _, name, layer in layers:
        tensors[f"{component}.{name}.lora_A.weight"] = layer.lora_A.detach().float()
        tensors[f"{component}.{name}.lora_B.weight"] = _folded_up(layer, with_alpha=True)
    provenance = {"adapter_config": config.to_dict(), "folded": "mixer and alpha/rank are in lora_B"}
    metadata = {
        "format": "pt",
        "dreambooth_moslora": json.dumps(provenance),
        "base_model": base_model or "",
        "training": json.dumps(training or {}),
    }
    return tensors, metadata


def kohya_state(components, base_model=None, training=None):
    config, layers = _live_layers(components)
    tensors = {}
    for component, path, _, layer in layers:
        name = kohya_name(component, path, components[component])
        tensors[f"{name}.lora_down.weight"] = layer.lora_A.detach().float()
        tensors[f"{name}.lora_up.weight"] = _folded_up(layer, with_alpha=False)
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_args": json.dumps({"moslora_mixer": config.mixer, "moslora_mixer_init": config.mixer_init}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": base_model or "",
        "ss_v2": "False",
        "ss_training_comment": f"MoSLoRA (mixer {config.mixer}) folded into plain LoRA by dreambooth-moslora",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.sai_model_spec": "1.0.0",
    }
    for key, value in (training or {}).items():
        metadata[f"ss_{key}"] = str(value)
    return tensors, metadata


_STATE_BUILDERS = {"native": native_state, "diffusers": diffusers_state, "kohya": kohya_state}


def save_adapter(
    output_dir: str | os.PathLike,
    components: dict[str, nn.Module],
    formats=FORMATS,
    base_model: str | None = None,
    training: dict | None = None,
) -> dict[str, Path]:
    """Writes the adapter carried by ``components`` in each requested format; returns the paths."""
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown:
        raise AdapterFileError(f"unknown output format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    # Build every file's tensors before writing any, so a naming error writes nothing.
    states = {fmt: _STATE_BUILDERS[fmt](components, base_model, training) for fmt in formats}
    written = {}
    for fmt, (tensors, metadata) in states.items():
        written[fmt] = Path(output_dir) / FILE_NAMES[fmt]
        write_safetensors(written[fmt], tensors, metadata)
    return written


# ---------------------------------------------------------------- reading


def detect_format(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    if metadata.get("format") == NATIVE_FORMAT_NAME or any(k.endswith(".moslora_A") for k in tensors):
        return "native"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors):
        return "kohya"
    if any(k.split(".", 1)[0] in COMPONENTS and (".lora_A." in k or ".lora.down." in k) for k in tensors):
        return "diffusers"
    return None


def _split_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, role in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _group(path, tensors, suffixes) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split_key(key, suffixes)
        if split is None:
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} for this file format")
        groups.setdefault(split[0], {})[split[1]] = tensor
    for name, parts in groups.items():
        for needed in ("down", "up"):
            if needed not in parts:
                raise AdapterFileError(f"{path}: layer {name} has no {needed} matrix")
    return groups


def _layer(path, name, parts, alpha) -> LayerWeights:
    down, up, mixer = parts["down"], parts["up"], parts.get("mixer")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise AdapterFileError(
            f"{path}: layer {name} has inconsistent shapes (down {tuple(down.shape)}, up {tuple(up.shape)})"
        )
    if mixer is not None and tuple(mixer.shape) != (down.shape[0], down.shape[0]):
        raise AdapterFileError(f"{path}: layer {name} has a mixer of shape {tuple(mixer.shape)} for rank {down.shape[0]}")
    for t in (down, up) + ((mixer,) if mixer is not None else ()):
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterFileError(f"{path}: layer {name} holds non-finite or non-float values")
    if "alpha" in parts:
        alpha = float(parts["alpha"].float().reshape(-1)[0])
    alpha = down.shape[0] if alpha is None else alpha
    return LayerWeights(down.float(), up.float(), float(alpha), None if mixer is None else mixer.float())


def _diffusers_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """Per-component lora_alpha from diffusers' own metadata (files saved with an alpha ≠ rank)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {c: float(config[f"{c}.lora_alpha"]) for c in COMPONENTS if f"{c}.lora_alpha" in config}


def read_adapter(path: str | os.PathLike, components: dict[str, nn.Module]) -> AdapterFile:
    """Reads a file of any of the three formats and resolves its layers against ``components``.

    Nothing is changed; a file that does not fit raises AdapterMismatchError naming the first layer.
    """
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, metadata)
    if fmt is None:
        first = next(iter(tensors), "<none>")
        raise AdapterFileError(f"{path}: not a LoRA/MoSLoRA file this toolkit knows (first tensor: {first!r})")

    layers: dict[str, dict[str, LayerWeights]] = {}
    mixer_mode, mixer_init = "none", "identity"
    if fmt == "native":
        try:
            config = AdapterConfig(**json.loads(metadata.get("adapter_config", "{}")))
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path}: bad adapter_config metadata ({exc})") from None
        mixer_mode, mixer_init = config.mixer, config.mixer_init
        groups = _group(path, tensors, {".moslora_A": "down", ".moslora_B": "up", ".moslora_M": "mixer"})
        for name, parts in groups.items():
            if (config.mixer == "none") != ("mixer" not in parts):
                raise AdapterFileError(f"{path}: layer {name} does not match the file's mixer mode {config.mixer!r}")
            component, _, layer_path = name.partition(".")
            layers.setdefault(component, {})[layer_path] = _layer(path, name, parts, config.alpha)
    elif fmt == "diffusers":
        alphas = _diffusers_alphas(metadata)
        suffixes = {
            ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
            ".alpha": "alpha",
        }  # fmt: skip
        for name, parts in _group(path, tensors, suffixes).items():
            component, _, layer_path = name.partition(".")
            layers.setdefault(component, {})[layer_path] = _layer(path, name, parts, alphas.get(component))
    else:
        names = kohya_name_map(components)
        suffixes = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
        for name, parts in _group(path, tensors, suffixes).items():
            if name not in names:
                raise AdapterMismatchError(f"{path}: layer {name} matches no layer of this pipeline")
            component, layer_path = names[name]
            layers.setdefault(component, {})[layer_path] = _layer(path, name, parts, None)

    if fmt != "kohya":  # kohya names were resolved against the models already
        layers = {
            c: {module_path(c, components[c], p) if components.get(c) is not None else p: w for p, w in by_path.items()}
            for c, by_path in layers.items()
        }
    _check_fits(path, layers, components)
    if fmt != "native":  # a plain LoRA: its settings are those of its first layer
        first = next(iter(next(iter(layers.values())).values()))
        config = AdapterConfig(first.rank, first.alpha, mixer_mode, mixer_init)
    return AdapterFile(fmt, layers, config, metadata)


def _check_fits(path, layers, components) -> None:
    for component, by_path in layers.items():
        model = components.get(component)
        if component not in COMPONENTS or model is None:
            raise AdapterMismatchError(f"{path}: the adapter has {component} layers, but the pipeline has no {component}")
        modules = dict(model.named_modules())
        for layer_path, weights in by_path.items():
            module = modules.get(layer_path)
            if isinstance(module, MoSLoRALinear):
                module = module.base_layer
            if not isinstance(module, nn.Linear):
                raise AdapterMismatchError(f"{path}: {component} has no linear layer {layer_path}")
            expected = (module.out_features, module.in_features)
            got = (weights.up.shape[0], weights.down.shape[1])
            if got != expected:
                raise AdapterMismatchError(
                    f"{path}: {component}.{layer_path} is {got[1]}→{got[0]} in the adapter but "
                    f"{expected[1]}→{expected[0]} in the model — was the adapter trained on another base model?"
                )


@torch.no_grad()
def copy_weights(layer: MoSLoRALinear, weights: LayerWeights) -> None:
    layer.lora_A.copy_(weights.down)
    layer.lora_B.copy_(weights.up)
    if weights.mixer is not None:
        layer.lora_M.copy_(weights.mixer)


def build_layers(adapter: AdapterFile, components: dict[str, nn.Module]) -> dict[str, dict[str, MoSLoRALinear]]:
    """Live MoSLoRA layers around the components' base layers, holding the file's weights."""
    built: dict[str, dict[str, MoSLoRALinear]] = {}
    for component, by_path in adapter.layers.items():
        modules = dict(components[component].named_modules())
        for layer_path, w in by_path.items():
            base = modules[layer_path]
            if isinstance(base, MoSLoRALinear):
                base = base.base_layer
            mixer = adapter.config.mixer if w.mixer is not None else "none"
            config = AdapterConfig(w.rank, w.alpha, mixer, adapter.config.mixer_init if w.mixer is not None else "identity")
            layer = MoSLoRALinear(base, config)
            copy_weights(layer, w)
            built.setdefault(component, {})[layer_path] = layer
    return built
