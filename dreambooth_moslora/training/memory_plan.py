"""Fitting a run into memory: ``--memory_budget_gib N`` and ``--train_batch_size auto``.

A step's peak is what stays (the base weights as stored, the adapter with its gradients and AdamW's two moments,
the VAE while latents are not cached, the text encoders while they train) plus what grows with the images in a
batch: the UNet's saved activations (far fewer with gradient checkpointing), the text encoders' when they train,
and, in its own phase before the UNet runs, the VAE's encoding. Those per-image figures were measured at 1024×1024
on the full-size SDXL (``benchmarks/gpu_suite.py`` measures them again) and scale with the pixel count; the weights
are counted from the model's own configs. The planner tries the settings from the fastest down — no checkpointing
before checkpointing, the base in the compute dtype before fp8 — keeps what the command line fixed, and with
``auto`` takes the largest batch that fits. A batch with prior preservation holds a class image per instance image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..errors import TrainingError

logger = logging.getLogger("dreambooth_moslora")
GIB = 2**30


@dataclass(frozen=True)
class Figures:
    """GiB per image at 1024×1024 in bf16, and what every run holds besides (CUDA context aside)."""

    unet_activations: float = 6.45  # no checkpointing: H200, 12.14 GiB peak at batch 1 less weights and fixed
    unet_activations_checkpointed: float = 2.90  # with checkpointing: 8.27 GiB peak at batch 1, the same way
    text_encoder_activations: float = 0.05  # 77 tokens: small beside the UNet's
    vae_encode: float = 1.5  # fp32 encoder activations at 1024 px (estimate: three 128-channel full-size maps)
    fixed: float = 0.5  # the allocator's slack, cuBLAS and attention workspaces


MEASURED = Figures()
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Job:
    """What the peak depends on besides the choices: parameter counts and the run's shape."""

    unet_params: int
    text_encoder_params: int
    vae_params: int
    adapter_params: int
    resolution: int
    compute: str  # "bf16", "fp16" or "fp32"
    images_per_example: int = 1  # 2 with prior preservation
    train_text_encoder: bool = False
    cache_latents: bool = False


@dataclass(frozen=True)
class Setting:
    gradient_checkpointing: bool
    base_precision: str  # "auto" (the compute dtype) or "fp8"
    batch_size: int
    peak_gib: float = 0.0

    def describe(self) -> str:
        return (f"batch {self.batch_size}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"base weights in {self.base_precision}")


def peak_gib(job: Job, setting: Setting, figures: Figures = MEASURED) -> float:
    """The planned peak of a step, in GiB."""
    stored = BYTES[job.compute] if setting.base_precision == "auto" else BYTES[setting.base_precision]
    weights = job.unet_params * stored + job.adapter_params * 4 * 4  # fp32 weights, gradients, two moments
    if job.train_text_encoder:
        weights += job.text_encoder_params * stored
    if not job.cache_latents:
        weights += job.vae_params * 4
    scale = (job.resolution / 1024) ** 2 * setting.batch_size * job.images_per_example
    per_image = figures.unet_activations_checkpointed if setting.gradient_checkpointing else figures.unet_activations
    if job.compute == "fp32":
        per_image *= 2
    unet_phase = per_image + (figures.text_encoder_activations if job.train_text_encoder else 0.0)
    vae_phase = 0.0 if job.cache_latents else figures.vae_encode
    return weights / GIB + figures.fixed + scale * max(unet_phase, vae_phase)


def plan(job: Job, budget_gib: float, batch_size: int | None, checkpointing: bool | None, base_precision: str | None,
         max_batch: int = 64, figures: Figures = MEASURED) -> Setting:
    """The fastest setting that fits ``budget_gib``; a None choice is the planner's (batch: the largest that fits),
    a given one is kept. Raises TrainingError, in one line, when nothing fits."""
    checkpoints = [False, True] if checkpointing is None else [checkpointing]
    precisions = ["auto", "fp8"] if base_precision is None else [base_precision]
    for checkpointed, precision in ((c, p) for c in checkpoints for p in precisions):  # fastest first
        setting = Setting(checkpointed, precision, batch_size or 1)
        if peak_gib(job, setting, figures) > budget_gib:
            continue
        while batch_size is None and setting.batch_size < max_batch:
            bigger = replace(setting, batch_size=setting.batch_size + 1)
            if peak_gib(job, bigger, figures) > budget_gib:
                break
            setting = bigger
        return replace(setting, peak_gib=peak_gib(job, setting, figures))
    smallest = Setting(checkpoints[-1], precisions[-1], batch_size or 1)
    raise TrainingError(f"nothing fits in {budget_gib:g} GiB at {job.resolution} px: the smallest setting "
                        f"({smallest.describe()}) needs {peak_gib(job, smallest, figures):.2f} GiB")


def parameter_counts(model_path: str, config, train_text_encoder: bool) -> dict[str, int]:
    """The base model's and the adapter's parameter counts, from the folder's configs on the meta device."""
    import torch
    from diffusers import AutoencoderKL

    from ..sdxl import meta_components
    from ..surgery import inject_components

    components = meta_components(model_path)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_path, subfolder="vae"))
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in components.items()}
    chosen = components if train_text_encoder else {"unet": components["unet"]}
    adapter = sum(p.numel() for params in inject_components(chosen, config).values() for p in params)
    return dict(unet=counts["unet"], text_encoders=counts["text_encoder"] + counts["text_encoder_2"],
                vae=sum(p.numel() for p in vae.parameters()), adapter=adapter)


def device_budget_gib(device) -> float:
    """What a run may use when no budget is given: 90% of the GPU's memory, or of the machine's on a CPU."""
    import os

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory * 0.9 / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9 / GIB
