"""DreamBooth for Stable Diffusion XL with MoSLoRA adapters: the product, one module per job.

    adapter     the MoSLoRA layer (ΔW = α/r · B·M·A) and its settings
    surgery     finding SDXL targets, injecting, removing, fusing
    formats     native / diffusers / kohya safetensors files, one class each
    safe_files  safetensors headers checked before use; atomic writes
    inference   loading adapter files into diffusers pipelines (no peft)
    sdxl        SDXL conditioning: tokens, text embeddings, time ids, an exactness check
    runtime     the seed scheme, quiet libraries, freeing memory
    metrics     DINO / CLIP-I / CLIP-T for real runs
    errors      every user-facing error
    training/   the DreamBooth trainer behind train_dreambooth.py

The toy world (an offline SDXL-architecture model and the demo on it) is the separate ``toyworld``
package, which imports this one; this one never imports it.
"""

from .adapter import MIXER_INITS, MIXER_MODES, AdapterConfig, MoSLoRALinear
from .errors import AdapterError, AdapterFileError, AdapterMismatchError, MosloraError
from .formats import DIFFUSERS_FILE, FILE_NAMES, FORMATS, KOHYA_FILE, NATIVE_FILE, read_adapter, save_adapter
from .inference import load_adapter, load_adapter_into, pipeline_components, set_scale, unload_adapter
from .surgery import (
    DEFAULT_TARGETS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    adapter_layers,
    find_targets,
    fuse_adapter,
    inject_adapter,
    inject_components,
    remove_adapter,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "MoSLoRALinear", "MIXER_MODES", "MIXER_INITS",
    "MosloraError", "AdapterError", "AdapterFileError", "AdapterMismatchError",
    "FORMATS", "FILE_NAMES", "NATIVE_FILE", "DIFFUSERS_FILE", "KOHYA_FILE", "save_adapter", "read_adapter",
    "load_adapter", "load_adapter_into", "unload_adapter", "set_scale", "pipeline_components",
    "UNET_TARGETS", "TEXT_ENCODER_TARGETS", "DEFAULT_TARGETS", "find_targets", "inject_adapter", "inject_components",
    "remove_adapter", "fuse_adapter", "adapter_layers", "trainable_parameters",
]
