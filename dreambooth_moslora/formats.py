"""Adapter files: native MoSLoRA, diffusers LoRA and kohya LoRA, all safetensors.

Because B·M·A has rank ≤ r, a MoSLoRA layer is exactly the plain LoRA with down = A and
up = B·M. The diffusers file folds M and α/r into the up matrix (stock diffusers then
loads it with scale 1); the kohya file folds M and keeps α in its ``.alpha`` entry. No file
carries the mixer under a key that a stock loader would drop.

Each format is one small class whose ``read`` mirrors its ``write``. Files are read through
``safe_files``: nothing is unpickled, and every header is checked before tensor data is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import AdapterConfig, MoSLoRALinear, mix
from .embeddings import NewTokens, bundle, read_embeddings, unbundle
from .errors import AdapterFileError, AdapterMismatchError
from .safe_files import read_header, read_json_field, read_safetensors, write_safetensors
from .sdxl import COMPONENTS
from .surgery import adapter_layers

NATIVE_FILE = "moslora_adapter.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
FILE_NAMES = {"native": NATIVE_FILE, "diffusers": DIFFUSERS_FILE, "kohya": KOHYA_FILE}
FORMATS = tuple(FILE_NAMES)

# Which tools load each file completely (checked with their own loaders on a full-size SDXL adapter): the
# diffusers file is for diffusers only (ComfyUI reads just its text-encoder half, Forge and A1111 none of it).
LOADED_BY = {
    "native": "dreambooth-moslora only (load_adapter; trains on as MoSLoRA)",
    "diffusers": "stock diffusers (load_lora_weights) and dreambooth-moslora",
    "kohya": "ComfyUI, AUTOMATIC1111, Forge, stock diffusers (load_lora_weights) and dreambooth-moslora",
}
NATIVE_FORMAT_NAME = "dreambooth-moslora"
NATIVE_FORMAT_VERSION = 1
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    def folded_up(self, with_alpha: bool) -> torch.Tensor:
        """B·M (times α/r when asked), computed in float64 so the fold adds no rounding of its own."""
        up = mix(self.up, self.mixer, torch.float64)
        return (up * (self.alpha / self.rank) if with_alpha else up).float()

    def delta(self) -> torch.Tensor:
        """ΔW = (α/r)·B·M·A (out×in), in float64."""
        return mix(self.up, self.mixer, torch.float64) @ self.down.double() * (self.alpha / self.rank)

    @classmethod
    def of(cls, layer: MoSLoRALinear) -> LayerWeights:
        mixer = None if layer.lora_M is None else layer.lora_M.detach().float()
        return cls(layer.lora_A.detach().float(), layer.lora_B.detach().float(), layer.alpha, mixer)


@dataclass
class AdapterFile:
    format: str
    layers: dict[str, dict[str, LayerWeights]]  # component → module path → weights
    config: AdapterConfig  # the adapter's settings (rank/alpha of its first layer for plain LoRA files)
    metadata: dict[str, str]
    embeddings: tuple[dict[str, torch.Tensor], NewTokens] | None = None  # pivotal tuning's rows and their tokens

    def rewrite(self, prompt: str) -> str:
        """A prompt in the adapter's new tokens (``TOK`` → ``<s0><s1>``); unchanged when it has none."""
        return self.embeddings[1].rewrite(prompt) if self.embeddings else prompt


@dataclass
class Entry:
    """One layer on its way into a file: where it sits, and its weights."""

    component: str
    path: str  # module path in the model
    file_path: str  # the path as files spell it
    model: nn.Module  # the model it is part of (for kohya's names)
    weights: LayerWeights


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


def _drops_text_model(component: str, model: nn.Module) -> bool:
    """transformers 5 dropped the ``text_model`` level from CLIPTextModel (not from the projection
    model); every LoRA file in the wild, kohya's and diffusers', keeps it."""
    return component.startswith("text_encoder") and not hasattr(model, "text_model")


def file_path(component: str, model: nn.Module, path: str) -> str:
    """A module path as files spell it: text-encoder layers always under ``text_model.``."""
    if _drops_text_model(component, model) and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path


def module_path(component: str, model: nn.Module, path: str) -> str:
    """The inverse of ``file_path`` for this model."""
    if _drops_text_model(component, model) and path.startswith("text_model."):
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
            raise AdapterFileError(f"unet layer {path} has no kohya (SGM) name: the kohya format covers "
                                   "layers inside attention blocks")
        path = sgm
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


def kohya_name_map(components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every kohya layer name a file may use → (component, module path), in SGM and diffusers spellings."""
    names: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        if model is None or component not in KOHYA_PREFIXES:
            continue
        prefixes = [KOHYA_PREFIXES[component]] + (["lora_te_"] if component == "text_encoder" else [])
        lpb = _layers_per_block(model) if component == "unet" else None
        linear = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, MoSLoRALinear)) and not n.endswith(".base_layer")]
        for path in linear:
            spellings = [file_path(component, model, path)]
            if component == "unet" and (sgm := sgm_unet_path(path, lpb)):
                spellings.append(sgm)
            for prefix in prefixes:
                for spelling in spellings:
                    names[prefix + spelling.replace(".", "_")] = (component, path)
    return names


# ---------------------------------------------------------------- what goes into a file


def live_entries(components: dict[str, nn.Module]) -> tuple[AdapterConfig, list[Entry]]:
    """The adapter's settings (those its layers keep) and every live layer, in model order."""
    found = [
        (component, path, model, layer)
        for component, model in components.items()
        if model is not None
        for path, layer in adapter_layers(model).items()
    ]
    if not found:
        raise AdapterFileError("nothing to save: no model carries MoSLoRA layers")
    entries = [Entry(c, p, file_path(c, m, p), m, LayerWeights.of(layer)) for c, p, m, layer in found]
    return found[0][3].config, entries


def file_entries(layers: dict[str, dict[str, LayerWeights]], components: dict[str, nn.Module]) -> list[Entry]:
    """Layers read from a file (component → module path → weights) as entries for writing."""
    return [
        Entry(component, path, file_path(component, components[component], path), components[component], weights)
        for component, by_path in layers.items()
        for path, weights in by_path.items()
    ]


# ---------------------------------------------------------------- reading helpers


def _group(path, tensors, suffixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by layer name, each layer's tensors by role (down, up, mixer, alpha)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} for this file format")
        groups.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = tensor
    for name, parts in groups.items():
        for needed in ("down", "up"):
            if needed not in parts:
                raise AdapterFileError(f"{path}: layer {name} has no {needed} matrix")
    return groups


def _alpha(path, name, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1 or tensor.dtype not in FLOAT_DTYPES + (torch.int64, torch.int32):
        raise AdapterFileError(f"{path}: layer {name} has a malformed alpha (one number expected)")
    value = float(tensor.reshape(-1)[0])
    if not value > 0 or value == float("inf"):
        raise AdapterFileError(f"{path}: layer {name} has alpha {value}: it must be a positive number")
    return value


def _layer(path, name, parts, alpha: float | None) -> LayerWeights:
    down, up, mixer = parts["down"], parts["up"], parts.get("mixer")
    matrices = (down, up) + ((mixer,) if mixer is not None else ())
    if any(t.dtype not in FLOAT_DTYPES for t in matrices):
        raise AdapterFileError(f"{path}: layer {name} is stored as {down.dtype}: float16, "
                               "bfloat16, float32 or float64 expected")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise AdapterFileError(f"{path}: layer {name} has inconsistent shapes (down "
                               f"{tuple(down.shape)}, up {tuple(up.shape)})")
    if mixer is not None and tuple(mixer.shape) != (down.shape[0], down.shape[0]):
        raise AdapterFileError(f"{path}: layer {name} has a mixer of shape "
                               f"{tuple(mixer.shape)} for rank {down.shape[0]}")
    if not all(torch.isfinite(t).all() for t in matrices):
        raise AdapterFileError(f"{path}: layer {name} holds non-finite values")
    if "alpha" in parts:
        alpha = _alpha(path, name, parts["alpha"])
    alpha = float(down.shape[0]) if alpha is None else alpha
    return LayerWeights(down.float(), up.float(), float(alpha), None if mixer is None else mixer.float())


def _metadata_object(path, metadata: dict[str, str], key: str) -> dict:
    """A metadata entry that must hold a JSON object when present ({} when absent); anything else is refused."""
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path}: its {key} metadata is not a JSON object")
    return value


def _by_component(path, groups, components, alpha_of) -> dict[str, dict[str, LayerWeights]]:
    """``component.path`` layer names (native and diffusers files) resolved to module paths."""
    layers: dict[str, dict[str, LayerWeights]] = {}
    for name, parts in groups.items():
        component, _, stored = name.partition(".")
        model = components.get(component) if components is not None else None  # None: the file's own names
        where = module_path(component, model, stored) if model is not None else stored
        layers.setdefault(component, {})[where] = _layer(path, name, parts, alpha_of(component))
    return layers


# ---------------------------------------------------------------- the three formats


class NativeFormat:
    """A, B and M as trained, with the adapter's settings: resumable and trainable again."""

    suffixes = {".moslora_A": "down", ".moslora_B": "up", ".moslora_M": "mixer"}

    def matches(self, names, metadata) -> bool:
        return metadata.get("format") == NATIVE_FORMAT_NAME or any(k.endswith(".moslora_A") for k in names)

    def write(self, config, layers: list[Entry], base_model, training):
        tensors, targets = {}, {}
        for entry in layers:
            prefix, w = f"{entry.component}.{entry.file_path}", entry.weights
            tensors[f"{prefix}.moslora_A"] = w.down
            tensors[f"{prefix}.moslora_B"] = w.up
            if w.mixer is not None:
                tensors[f"{prefix}.moslora_M"] = w.mixer
            targets.setdefault(entry.component, []).append(entry.file_path)
        metadata = {
            "format": NATIVE_FORMAT_NAME,
            "format_version": str(NATIVE_FORMAT_VERSION),
            "adapter_config": _json_text(config.to_dict()),
            "targets": _json_text({c: sorted(names) for c, names in targets.items()}),
            "base_model": base_model or "",
            "training": _json_text(training or {}),
        }
        return tensors, metadata

    def read(self, path, tensors, metadata, components):
        try:
            config = AdapterConfig(**_metadata_object(path, metadata, "adapter_config"))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, AdapterFileError):
                raise
            raise AdapterFileError(f"{path}: bad adapter_config metadata ({str(exc).splitlines()[0][:120]})") from None
        groups = _group(path, tensors, self.suffixes)
        for name, parts in groups.items():
            if (config.mixer == "none") != ("mixer" not in parts):
                raise AdapterFileError(f"{path}: layer {name} does not match the file's mixer mode {config.mixer!r}")
        return _by_component(path, groups, components, lambda _: config.alpha), config


class DiffusersFormat:
    """Plain LoRA as diffusers' ``load_lora_weights`` reads it: M and α/r folded into ``lora_B``."""

    suffixes = {
        ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
        ".alpha": "alpha",
    }

    def matches(self, names, metadata) -> bool:
        return any(k.split(".", 1)[0] in COMPONENTS and (".lora_A." in k or ".lora.down." in k) for k in names)

    def write(self, config, layers: list[Entry], base_model, training):
        tensors = {}
        for entry in layers:
            prefix = f"{entry.component}.{entry.file_path}"
            tensors[f"{prefix}.lora_A.weight"] = entry.weights.down
            tensors[f"{prefix}.lora_B.weight"] = entry.weights.folded_up(with_alpha=True)
        provenance = {"adapter_config": config.to_dict(), "folded": "mixer and alpha/rank are in lora_B"}
        metadata = {
            "format": "pt",
            "dreambooth_moslora": _json_text(provenance),
            "base_model": base_model or "",
            "training": _json_text(training or {}),
        }
        return tensors, metadata

    def read(self, path, tensors, metadata, components):
        alphas = self._alphas(path, metadata)
        return _by_component(path, _group(path, tensors, self.suffixes), components, alphas.get), None

    @staticmethod
    def _alphas(path, metadata: dict[str, str]) -> dict[str, float]:
        """Per-component lora_alpha from diffusers' own metadata (files saved with an alpha ≠ rank)."""
        config = _metadata_object(path, metadata, "lora_adapter_metadata")
        alphas = {}
        for component in COMPONENTS:
            value = config.get(f"{component}.lora_alpha")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise AdapterFileError(f"{path}: lora_adapter_metadata gives {component} a bad lora_alpha {value!r}")
            alphas[component] = float(value)
        return alphas


class KohyaFormat:
    """Plain LoRA in kohya's layout (SGM names, ``.alpha`` entries): ComfyUI, A1111 and Forge read it."""

    suffixes = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}

    def matches(self, names, metadata) -> bool:
        return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in names)

    def write(self, config, layers: list[Entry], base_model, training):
        tensors = {}
        for entry in layers:
            name = kohya_name(entry.component, entry.path, entry.model)
            tensors[f"{name}.lora_down.weight"] = entry.weights.down
            tensors[f"{name}.lora_up.weight"] = entry.weights.folded_up(with_alpha=False)
            tensors[f"{name}.alpha"] = torch.tensor(entry.weights.alpha, dtype=torch.float32)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(config.rank),
            "ss_network_alpha": f"{config.alpha:g}",
            "ss_network_args": _json_text({"moslora_mixer": config.mixer, "moslora_mixer_init": config.mixer_init,
                                           "moslora_lora_init": config.lora_init}),
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_sd_model_name": base_model or "",
            "ss_v2": "False",
            "ss_training_comment": f"MoSLoRA (mixer {config.mixer}) folded into plain LoRA by dreambooth-moslora",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.sai_model_spec": "1.0.0",
        }
        metadata.update({f"ss_{key}": json.dumps(value) if isinstance(value, (dict, list)) else str(value)
                         for key, value in (training or {}).items()})
        if training and training.get("base_model_sha256"):  # the base's hashes, under sd-scripts' names
            metadata["ss_new_sd_model_hash"] = training["base_model_sha256"]
            metadata.update({"ss_sd_model_hash": training["base_model_legacy_hash"]}
                            if training.get("base_model_legacy_hash") else {})
        if training and training.get("prediction_type"):  # what sd-scripts writes, and what other tools read
            v = training["prediction_type"] == "v_prediction"
            metadata.update({"modelspec.prediction_type": "v" if v else "epsilon", "ss_v_parameterization": str(v),
                             "ss_zero_terminal_snr": str(bool(training.get("rescale_betas_zero_snr")))})
        return tensors, metadata

    def read(self, path, tensors, metadata, components):
        names = kohya_name_map(components) if components is not None else None
        layers: dict[str, dict[str, LayerWeights]] = {}
        for name, parts in _group(path, tensors, self.suffixes).items():
            if names is None:  # no model: the component from the prefix, the layer by the file's own name
                prefix = next((p for p in KOHYA_COMPONENTS if name.startswith(p)), None)
                if prefix is None:
                    raise AdapterFileError(f"{path}: layer {name} has no lora_unet_ or lora_te prefix")
                component, layer_path = KOHYA_COMPONENTS[prefix], name[len(prefix):]
            elif name not in names:
                raise AdapterMismatchError(f"{path}: layer {name} matches no layer of this pipeline")
            else:
                component, layer_path = names[name]
            layers.setdefault(component, {})[layer_path] = _layer(path, name, parts, None)
        return layers, None


KOHYA_COMPONENTS = {prefix: component for component, prefix in KOHYA_PREFIXES.items()} | {"lora_te_": "text_encoder"}
FORMAT_CLASSES = {"native": NativeFormat(), "kohya": KohyaFormat(), "diffusers": DiffusersFormat()}  # detection order


def _json_text(value) -> str:
    return json.dumps(value)


# ---------------------------------------------------------------- saving and reading


def save_adapter(
    output_dir: str | os.PathLike,
    components: dict[str, nn.Module],
    formats=FORMATS,
    base_model: str | None = None,
    training: dict | None = None,
    embeddings: tuple[dict[str, torch.Tensor], NewTokens] | None = None,
    suffix: str = "",
) -> dict[str, Path]:
    """Writes the adapter carried by ``components`` in each requested format (the kohya file bundling
    ``embeddings``, pivotal tuning's rows and tokens, when given), each file's name ending in ``suffix``
    (``_live``: the live weights beside an EMA); returns the paths."""
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown:
        raise AdapterFileError(f"unknown output format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    config, entries = live_entries(components)
    # Build every file's tensors before writing any, so a naming error writes nothing.
    states = {fmt: file_state(fmt, config, entries, base_model, training, embeddings) for fmt in formats}
    names = {fmt: FILE_NAMES[fmt].replace(".safetensors", f"{suffix}.safetensors") for fmt in formats}
    return {fmt: write_safetensors(Path(output_dir) / names[fmt], *state) for fmt, state in states.items()}


def write_adapter_file(path: str | os.PathLike, fmt: str, config: AdapterConfig, entries: list[Entry],
                       base_model: str | None = None, training: dict | None = None, extra: dict | None = None,
                       embeddings=None) -> Path:
    """One file of the given format from entries (e.g. layers read from other files), with extra metadata."""
    tensors, metadata = file_state(fmt, config, entries, base_model, training, embeddings)
    return write_safetensors(path, tensors, {**metadata, **(extra or {})})


def file_state(fmt: str, config, entries: list[Entry], base_model, training, embeddings) -> tuple[dict, dict]:
    """A file's tensors and metadata; the kohya file bundles pivotal tuning's embeddings (``embeddings.bundle``),
    which the other formats leave to the ``_emb`` file beside them (stock diffusers refuses keys it does not know)."""
    tensors, metadata = FORMAT_CLASSES[fmt].write(config, entries, base_model, training)
    if embeddings is not None and fmt == "kohya":
        bundled, described = bundle(*embeddings)
        tensors, metadata = {**tensors, **bundled}, {**metadata, **described}
    return tensors, metadata


def detect_format(names, metadata: dict[str, str]) -> str | None:
    """The format of a file from its tensor names (a header's keys will do) and metadata; None if unknown."""
    return next((name for name, fmt in FORMAT_CLASSES.items() if fmt.matches(names, metadata)), None)


def read_adapter(path: str | os.PathLike, components: dict[str, nn.Module] | None) -> AdapterFile:
    """Reads a file of any of the three formats and resolves its layers against ``components``.

    Nothing is changed; a file that does not fit raises AdapterMismatchError naming the first layer. Without
    components (None) the layers keep the file's own names, unchecked against any model.
    """
    tensors, metadata = read_safetensors(path)
    embeddings = unbundle(path, tensors, metadata) or companion_embeddings(path, metadata)
    fmt = detect_format(tensors, metadata)
    if fmt is None:
        first = next(iter(tensors), "<none>")
        raise AdapterFileError(f"{path}: not a LoRA/MoSLoRA file this toolkit knows (first tensor: {first!r})")
    layers, config = FORMAT_CLASSES[fmt].read(path, tensors, metadata, components)
    if not any(layers.values()):
        raise AdapterFileError(f"{path}: the file holds no adapter layers")
    if components is not None:
        _check_fits(path, layers, components)
    if config is None:  # a plain LoRA: its settings are those of its first layer
        first = next(iter(next(iter(layers.values())).values()))
        config = AdapterConfig(first.rank, first.alpha, "none", "identity")
    return AdapterFile(fmt, layers, config, metadata, embeddings)


def companion_embeddings(path: str | os.PathLike, metadata: dict[str, str]):
    """The embeddings file beside an adapter trained with new tokens (its ``embeddings_file``, else the one
    ``*_emb.safetensors`` there), read and checked to hold the tokens the adapter records; None without new tokens."""
    training = read_json_field(metadata, "training")
    tokens = training.get("new_tokens")
    if not tokens:
        return None
    folder = Path(path).parent
    named = training.get("embeddings_file")
    candidates = [folder / Path(named).name] if isinstance(named, str) else sorted(folder.glob("*_emb.safetensors"))
    if len(candidates) != 1 or not candidates[0].is_file():
        raise AdapterFileError(f"{path}: it was trained with new tokens {''.join(map(str, tokens))}, but their "
                               f"embeddings file ({named or '*_emb.safetensors'}) is not beside it")
    rows, new = read_embeddings(candidates[0])
    if new.tokens != list(tokens):
        raise AdapterFileError(f"{candidates[0]}: holds tokens {''.join(new.tokens)}, the adapter was trained with "
                               f"{''.join(map(str, tokens))}")
    return rows, new


def _check_fits(path, layers, components) -> None:
    for component, by_path in layers.items():
        model = components.get(component)
        if component not in COMPONENTS or model is None:
            raise AdapterMismatchError(f"{path}: the adapter has {component} layers, but "
                                       f"the pipeline has no {component}")
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
            # dropout is a training setting: a loaded adapter draws exactly what it learned
            config = dataclasses.replace(adapter.config, rank=w.rank, alpha=w.alpha, dropout=0.0)
            if w.mixer is None:
                config = dataclasses.replace(config, mixer="none", mixer_init="identity")
            layer = MoSLoRALinear(base, config)
            copy_weights(layer, w)
            built.setdefault(component, {})[layer_path] = layer
    return built


# ---------------------------------------------------------------- a file's summary, from its header alone


def summarize(path: str | os.PathLike) -> dict | None:
    """What a file says of itself (format, rank, α, mixer, prompt, steps, base model) from its header alone.

    None for a safetensors file that is no adapter; AdapterFileError for one that cannot be read.
    """
    header, metadata = read_header(path)
    fmt = detect_format(header, metadata)
    if fmt is None:
        return None
    downs = ("moslora_A", "lora_A.weight", "lora_down.weight")
    ranks = [e["shape"][0] for k, e in header.items() if k.endswith(downs) and e["shape"]]
    config = (_metadata_object(path, metadata, "adapter_config")
              or read_json_field(metadata, "dreambooth_moslora").get("adapter_config", {}))
    config = config if isinstance(config, dict) else {}
    alpha = config.get("alpha") or metadata.get("ss_network_alpha")
    summary = {
        "format": fmt,
        "rank": (config.get("rank") or metadata.get("ss_network_dim")
                 or (max(set(ranks), key=ranks.count) if ranks else None)),
        "alpha": f"{alpha:g}" if isinstance(alpha, float) else alpha,
        "mixer": config.get("mixer") or read_json_field(metadata, "ss_network_args").get("moslora_mixer") or "none",
        **recorded(metadata),
    }
    del summary["training"]
    return summary


def recorded(metadata: dict[str, str]) -> dict:
    """What a file of any format records of its training: instance and sample prompts, steps, base model, and all
    settings."""
    training = read_json_field(metadata, "training")
    return {
        "instance_prompt": training.get("instance_prompt") or metadata.get("ss_instance_prompt"),
        "validation_prompt": training.get("validation_prompt") or None,
        "steps": training.get("max_train_steps") or metadata.get("ss_max_train_steps"),
        "base_model": metadata.get("base_model") or metadata.get("ss_sd_model_name") or None,
        "noise_schedule": recorded_schedule(training, metadata),
        "base_sha256": training.get("base_model_sha256") or metadata.get("ss_new_sd_model_hash") or None,
        "training": training,
    }


def recorded_schedule(training: dict, metadata: dict[str, str]) -> dict:
    """The noise schedule a file says it was trained with (prediction type, zero terminal SNR), in diffusers'
    scheduler-config names; from our settings, else from sd-scripts' keys; empty when it says nothing."""
    schedule = {}
    v = {"v": "v_prediction", "epsilon": "epsilon"}.get(metadata.get("modelspec.prediction_type", ""))
    if training.get("prediction_type") in ("epsilon", "v_prediction"):
        schedule["prediction_type"] = training["prediction_type"]
    elif v or metadata.get("ss_v_parameterization") in ("True", "False"):
        schedule["prediction_type"] = v or ("v_prediction" if metadata["ss_v_parameterization"] == "True"
                                            else "epsilon")
    if isinstance(training.get("rescale_betas_zero_snr"), bool):
        schedule["rescale_betas_zero_snr"] = training["rescale_betas_zero_snr"]
    elif metadata.get("ss_zero_terminal_snr") in ("True", "False"):
        schedule["rescale_betas_zero_snr"] = metadata["ss_zero_terminal_snr"] == "True"
    return schedule
