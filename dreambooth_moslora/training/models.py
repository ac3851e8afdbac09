"""The models a run trains: the base model's parts loaded frozen, the adapters put in, the optimizer."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import AdapterConfig
from ..errors import AdapterMismatchError, TrainingError
from ..formats import read_adapter
from ..inference import sampling_config
from ..single_file import file_pipeline, file_schedule, is_single_file, load_single_file
from ..surgery import adapter_layers, inject_components, trainable_parameters, unbank_mixers
from .base_precision import place, replace_tensors

logger = logging.getLogger("dreambooth_moslora")


@dataclass
class BaseModel:
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


@contextmanager
def loading(what: str):
    """Any failure to load a model (a wrong folder, a hub id offline, a missing part) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainingError(f"cannot load {what}: {first}") from None


def load_vae(model_path: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None,
             base_config: str | None = None):
    """The base model's VAE (from its folder or its checkpoint file), or the separately given one (e.g. an fp16-safe
    VAE)."""
    from diffusers import AutoencoderKL

    if vae_path:
        return AutoencoderKL.from_pretrained(vae_path, revision=revision)
    if is_single_file(model_path):
        return load_single_file(model_path, base_config, parts=("vae",))[0]["vae"]
    return AutoencoderKL.from_pretrained(model_path, subfolder="vae", revision=revision, variant=variant)


def base_weights(model_path: str, revision, variant, vae_path, base_config) -> tuple:
    """(UNet, VAE, [text encoder, text encoder 2]) from a diffusers folder or hub id, or from one checkpoint file
    whose configs ``base_config`` gives."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if is_single_file(model_path):
        parts = ("unet", "text_encoder", "text_encoder_2") + (() if vae_path else ("vae",))
        models, _ = load_single_file(model_path, base_config, parts)
        vae = load_vae(model_path, vae_path, revision) if vae_path else models["vae"]
        return models["unet"], vae, [models["text_encoder"], models["text_encoder_2"]]
    text_encoders = [
        CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", revision=revision, variant=variant),
        CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2", revision=revision,
                                                    variant=variant),
    ]
    vae = load_vae(model_path, vae_path, revision, variant)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", revision=revision, variant=variant)
    return unet, vae, text_encoders


def base_schedule(model_path: str, prediction_type: str | None, zero_terminal_snr: bool | None) -> dict:
    """The noise schedule to train with, over the model's scheduler config: the command line's settings, over what
    a checkpoint file marks (its v_pred / ztsnr keys, or modelspec.prediction_type); said in the log."""
    explicit = noise_schedule(prediction_type, zero_terminal_snr)
    detected = file_schedule(model_path) if is_single_file(model_path) else {}
    schedule = {**detected, **explicit}
    if detected:
        def said(s: dict) -> str:
            ztsnr = ", zero terminal SNR" if s.get("rescale_betas_zero_snr") else ""
            return f"{s.get('prediction_type', 'as configured')}{ztsnr}"

        logger.info("noise schedule: %s (the file marks %s)", said(schedule), said(detected))
    return schedule


def noise_schedule(prediction_type: str | None, zero_terminal_snr: bool | None) -> dict:
    """The scheduler settings the command line gives (--prediction_type, --rescale_betas_zero_snr), to override a
    base model's scheduler config with; unset ones keep the model's."""
    schedule = {"prediction_type": prediction_type, "rescale_betas_zero_snr": zero_terminal_snr}
    return {key: value for key, value in schedule.items() if value is not None}


def load_base_model(model_path: str, revision, variant, vae_path, device, weight_dtype, base_precision: str = "auto",
                    schedule: dict | None = None, base_config: str | None = None) -> BaseModel:
    """Frozen weights in the mixed-precision dtype, or the UNet's and text encoders' stored as ``base_precision``
    says (see base_precision.py); the VAE in fp32 unless a separate (fp16-safe) one is given; the noise schedule
    the model's own, with ``schedule``'s settings over it."""
    with loading(f"the base model {model_path!r}"):
        base = _load_base_model(model_path, revision, variant, vae_path, device, weight_dtype, base_precision,
                                schedule or {}, base_config)
    config = base.noise_scheduler.config
    if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
        raise TrainingError("zero terminal SNR on an epsilon-prediction model: the last timestep holds no signal to "
                            "predict the noise from; pass --prediction_type v_prediction if the model predicts v")
    return base


def _load_base_model(model_path: str, revision, variant, vae_path, device, weight_dtype, base_precision,
                     schedule: dict, base_config: str | None) -> BaseModel:
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer

    configs, revision_of_configs = (base_config, None) if is_single_file(model_path) else (model_path, revision)
    unet, vae, text_encoders = base_weights(model_path, revision, variant, vae_path, base_config)
    tokenizers = [
        AutoTokenizer.from_pretrained(configs, subfolder=sub, revision=revision_of_configs, use_fast=False)
        for sub in ("tokenizer", "tokenizer_2")
    ]
    noise_scheduler = DDPMScheduler.from_pretrained(configs, subfolder="scheduler", revision=revision_of_configs,
                                                    **schedule)
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    saved = sum(place(model, base_precision, weight_dtype, device) for model in (unet, *text_encoders))
    if saved:
        logger.info("base weights stored in %s: %.2f GiB less than in %s", base_precision, saved / 2**30,
                    str(weight_dtype).removeprefix("torch."))
    vae.to(device, dtype=weight_dtype if vae_path else torch.float32)
    for model in (unet, vae, *text_encoders):
        align_(model)
    return BaseModel(tokenizers, text_encoders, vae, unet, noise_scheduler)


def align_(model: torch.nn.Module, boundary: int = 64) -> None:
    """Copies every tensor of ``model`` that lies off a 64-byte boundary in host memory (weights mapped straight
    from a file lie wherever the file put them) into memory of its own: CPU matrix kernels round differently at
    different alignments, so without this the same weights could train to different results by file layout (a
    GPU's allocations are aligned already)."""
    replace_tensors(model, lambda t: t.detach().clone() if t.device.type == "cpu" and t.data_ptr() % boundary else t)


def add_adapters(base: BaseModel, config: AdapterConfig, text_encoders: bool, seed: int, gradient_checkpointing: bool,
                 start_from: Path | None = None, compile_mode: str | None = None):
    """MoSLoRA layers in the UNet (and the text encoders), started from a file's adapter if given, the UNet compiled
    if asked; returns the adapted models and their trainable parameters."""
    components = {"unet": base.unet}
    if text_encoders:
        components.update(text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1])
    torch.manual_seed(seed)  # the adapter's initial A and M
    params = inject_components(components, config)
    if start_from is not None:
        every = {"unet": base.unet, "text_encoder": base.text_encoders[0], "text_encoder_2": base.text_encoders[1]}
        start_from_file(components, start_from, every)
    if gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if text_encoders:
            for encoder in base.text_encoders:
                encoder.gradient_checkpointing_enable()
    if compile_mode:
        params["unet"] = compile_unet(base.unet, compile_mode)
    return components, params


@torch.no_grad()
def start_from_file(components: dict, path: Path, every: dict) -> None:
    """--network_weights: the adapter layers start as a file's (any of the three formats, or a LoRA from another
    tool), its ΔW exactly: a plain LoRA's M is I, a mixer this run does not train is folded into B, and B is scaled by
    the file's α over the run's. Layers the file lacks start fresh (a warning says how many). ``every``: all the base
    model's parts, adapted or not, for reading the file's layer names."""
    adapter = read_adapter(path, every)
    live = {component: adapter_layers(model) for component, model in components.items()}
    for component, by_path in adapter.layers.items():
        for layer_path, weights in by_path.items():
            layer = live.get(component, {}).get(layer_path)
            if layer is None:
                hint = " (add --train_text_encoder)" if component != "unet" and component not in live else ""
                raise AdapterMismatchError(f"--network_weights {path}: it adapts {component}.{layer_path}, which this "
                                           f"run does not{hint}")
            if layer.rank != weights.rank:
                raise AdapterMismatchError(f"--network_weights {path}: its rank is {weights.rank}, this run's "
                                           f"{layer.rank}: give --rank {weights.rank}")
            up = weights.up if layer.lora_M is not None else weights.folded_up(with_alpha=False)
            layer.lora_A.copy_(weights.down)
            layer.lora_B.copy_(up * (weights.alpha / layer.alpha))
            if layer.lora_M is not None:
                layer.lora_M.copy_(weights.mixer if weights.mixer is not None else torch.eye(layer.rank))
    fresh = sum(map(len, live.values())) - sum(map(len, adapter.layers.values()))
    if fresh:
        logger.warning("--network_weights %s: %d adapted layer(s) are not in the file and start fresh", path, fresh)
    if adapter.embeddings:
        logger.warning("--network_weights %s: its new tokens are not loaded (only the adapter layers)", path)


def compile_unet(unet: torch.nn.Module, mode: str) -> list[torch.nn.Parameter]:
    """--torch_compile: the whole UNet, hooks, adapters and checkpointing included, as one graph for inductor
    (``mode`` as torch.compile's: "reduce-overhead" replays it as CUDA graphs), or "regional": each transformer block
    compiled once for all of its kind (diffusers' compile_repeated_blocks; far quicker to compile, where a whole
    graph cannot be captured). Returns the UNet's trainable parameters, which regional compilation regroups."""
    if mode == "regional":
        unbank_mixers(unet)  # a layer's slot in its group would be a different constant in every block
        unet.compile_repeated_blocks()
    else:
        unet.compile(mode=mode)
    return trainable_parameters(unet)


def make_optimizer(name: str, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8, use_8bit_adam: bool = False,
                   prodigy: dict | None = None) -> torch.optim.Optimizer:
    """AdamW (fused where the device has it), 8-bit AdamW, or Prodigy (``prodigy``: its beta3, decouple, … options)."""
    if name == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise TrainingError("--optimizer prodigy needs prodigyopt: "
                                "pip install 'dreambooth-moslora[optim]'") from None
        if any(group["lr"] < 0.1 for group in groups):  # Prodigy finds its own step size; lr multiplies it
            logger.warning("with --optimizer prodigy the learning rate is a multiplier: around 1.0 is usual")
        return prodigyopt.Prodigy(groups, betas=betas, eps=eps, **(prodigy or {}))
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install 'dreambooth-moslora[optim]'") from None
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)
    try:  # the fused kernel: one call for all of the adapter's many small tensors (6× faster on CPU here)
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):  # a device or torch without it
        return torch.optim.AdamW(groups, betas=betas, eps=eps)


def class_image_pipeline(model_path: str, revision, variant, device, schedule: dict | None = None,
                         base_config: str | None = None, precision: str | None = None):
    """The base model's pipeline, for drawing class images in ``precision`` (--prior_generation_precision; default
    fp16 on a GPU, else fp32), sampling as ``schedule`` says."""
    from diffusers import StableDiffusionXLPipeline

    # One dtype for every part: transformers keeps a checkpoint's dtype (fp16 text encoders stay fp16) where
    # diffusers makes fp32, and the two would not multiply.
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        precision, torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    with loading(f"the base model {model_path!r} for class images"):
        if is_single_file(model_path):
            pipe = file_pipeline(model_path, base_config, dtype)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(model_path, revision=revision, variant=variant,
                                                             torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(sampling_config(pipe.scheduler.config, schedule or {}))
    pipe.to(device)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        align_(model)  # the same class images from a folder and from a file
    return pipe
