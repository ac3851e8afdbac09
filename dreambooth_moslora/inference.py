"""Loading adapter files into diffusers SDXL pipelines, without peft; a sampler configured for the noise schedule
an adapter was trained with."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from .embeddings import check_rows, install_into, unload_embeddings
from .errors import AdapterMismatchError
from .formats import AdapterFile, build_layers, copy_weights, read_adapter, recorded
from .safe_files import base_sha256
from .sdxl import COMPONENTS
from .surgery import adapter_layers, fuse_adapter, inject_layers, remove_adapter, set_adapter_scale


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The adaptable models of a pipeline by component name (missing ones are left out)."""
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def load_adapter_into(
    components: dict[str, nn.Module], path: str | os.PathLike | AdapterFile, scale: float = 1.0, fuse: bool = False
) -> AdapterFile:
    """Loads a native, diffusers or kohya file (or one already read) into the models, replacing any adapter they carry.

    The file is read and checked against every layer before anything changes, so a bad or
    mismatched file leaves the models as they were. Native files come back as live,
    trainable MoSLoRA layers; the other formats as plain LoRA layers (mixer folded in).
    """
    adapter = path if isinstance(path, AdapterFile) else read_adapter(path, components)
    layers = build_layers(adapter, components)
    for model in components.values():
        remove_adapter(model)
    for component, by_path in layers.items():
        model = components[component]
        inject_layers(model, by_path)
        set_adapter_scale(model, scale)
        if fuse:
            fuse_adapter(model)
    return adapter


def load_adapter(pipe, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False,
                 base: str | os.PathLike | None = None, check_base: bool = True) -> AdapterFile:
    """``load_adapter(pipe, "out/moslora_adapter.safetensors")``: any of the three formats, live or fused.

    Pivotal tuning's new tokens come too (bundled in a kohya file, or the ``_emb`` file beside the others): write
    them in prompts, or the abstraction they stand for through ``adapter.rewrite(prompt)``. ``base`` is where the
    pipeline's weights came from (by default the path it was loaded from, a folder or a checkpoint file); when the
    adapter records another base's sha256, a warning says so: the layers fit any SDXL, but an adapter drawn on a
    base it was not trained on looks off.
    """
    adapter = read_adapter(path, pipeline_components(pipe))
    if adapter.embeddings:  # checked before anything changes
        check_rows([pipe.text_encoder, pipe.text_encoder_2], adapter.embeddings[1], adapter.embeddings[0])
    load_adapter_into(pipeline_components(pipe), adapter, scale=scale, fuse=fuse)
    if adapter.embeddings:
        install_into(pipe, *adapter.embeddings)  # in place of any tokens the pipeline had
    else:
        unload_embeddings(pipe)
    base = base if base is not None else pipe.config.get("_name_or_path")
    line = base_mismatch(recorded(adapter.metadata), base, Path(path).name) if base and check_base else None
    if line:
        warnings.warn(line, stacklevel=2)
    return adapter


def base_mismatch(record: dict, base: str | os.PathLike, adapter_name: str) -> str | None:
    """A line when a file's record (``formats.recorded``) names the weights (sha256) of another base than ``base``'s,
    else None; also None when either is unknown (a hub id, a file that records no hash)."""
    wanted = record.get("base_sha256")
    current = base_sha256(base) if wanted else None
    if not current or current == wanted:
        return None
    return (f"{adapter_name} was trained on another base ({record.get('base_model') or 'unnamed'}, AutoV2 "
            f"{wanted[:10].upper()}) than {Path(base).name} (AutoV2 {current[:10].upper()}): expect it to look off")


def unload_adapter(pipe) -> int:
    """Takes the adapter (live or fused) and its new tokens out again; returns how many layers were restored."""
    unload_embeddings(pipe)
    return sum(remove_adapter(model) for model in pipeline_components(pipe).values())


def set_scale(pipe, scale: float) -> None:
    for model in pipeline_components(pipe).values():
        set_adapter_scale(model, scale)


def restore_adapter_weights(components: dict[str, nn.Module], path: str | os.PathLike) -> None:
    """Copies a native file's A, M and B into the adapter layers already in the models, in place.

    For resuming: the layers (and so the optimizer's and DDP's references to them) stay the same
    objects. The file must hold exactly these layers, with the same ranks and mixer modes.
    """
    adapter = read_adapter(path, components)
    live = {c: adapter_layers(m) for c, m in components.items()}
    for component, by_path in adapter.layers.items():
        for layer_path, weights in by_path.items():
            layer = live.get(component, {}).get(layer_path)
            if layer is None or layer.rank != weights.rank or (layer.lora_M is None) != (weights.mixer is None):
                raise AdapterMismatchError(f"{path}: {component}.{layer_path} does not match the adapter being trained")
    if sum(len(v) for v in adapter.layers.values()) != sum(len(v) for v in live.values()):
        raise AdapterMismatchError(f"{path}: holds a different set of layers than the adapter being trained")
    for component, by_path in adapter.layers.items():
        for layer_path, weights in by_path.items():
            copy_weights(live[component][layer_path], weights)


def sampling_config(config, schedule: dict) -> dict:
    """A sampler's config for a model trained as ``schedule`` says: with zero terminal SNR, timesteps spaced to
    start at the last one ("trailing"), as the zero-terminal-SNR paper (Lin et al., 2023) prescribes."""
    config = {**config, **schedule}
    if config.get("rescale_betas_zero_snr"):
        config["timestep_spacing"] = "trailing"
    return config
