"""What a training run from the web demo may be: the presets (the trainer's options, by name) and the settings a
request may change, each with its range or choices."""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth_moslora.adapter import LORA_INITS, MIXER_INITS, MIXER_MODES
from dreambooth_moslora.runtime import has_module
from toyworld.recipe import NUM_CLASS_IMAGES, TOY_TRAINING

TOY_PRESET = "toy world on a CPU"  # about a minute on two cores
SDXL_LOW_MEMORY = "SDXL 1024 px, low memory (12 GB)"
SDXL_24GB = "SDXL 1024 px, 24 GB"


@dataclass(frozen=True)
class Preset:
    options: dict  # the trainer's options, by name
    min_free_bytes: int  # disk space a run needs besides its uploads (class images, checkpoints, adapters)
    prefers_demo_model: bool = False


PRESETS = {
    # The offline demo's recipe (toyworld.demo): the small toy-world model, 32 px, adapters on the text encoders too.
    TOY_PRESET: Preset(dict(
        resolution=32, train_batch_size=2, **TOY_TRAINING, train_text_encoder=True, mixer="learned",
                            mixer_init="kaiming",
        num_class_images=NUM_CLASS_IMAGES, class_inference_steps=25, sample_batch_size=10, cache_latents=True,
                            validation_steps=50,
        num_validation_images=4, num_validation_inference_steps=25, checkpointing_steps=100, seed=0, alpha_mask=False,
    ), min_free_bytes=50 * 2**20, prefers_demo_model=True),
    # diffusers' low-memory SDXL recipe: batch 1 with accumulation, checkpointing, fp16, cached latents, 8-bit Adam.
    SDXL_LOW_MEMORY: Preset(dict(
        resolution=1024, train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
        mixed_precision="fp16", use_8bit_adam=has_module("bitsandbytes"), cache_latents=True, max_train_steps=500,
        learning_rate=1e-4, text_encoder_lr=5e-6, train_text_encoder=False, rank=4, lora_alpha=4.0, mixer="learned",
        mixer_init="kaiming", lora_init="gaussian", num_class_images=100, class_inference_steps=30, sample_batch_size=2,
        validation_steps=100, num_validation_images=2, num_validation_inference_steps=25, checkpointing_steps=100,
                                 seed=0,
        alpha_mask=False,
    ), min_free_bytes=2 * 2**30),
    SDXL_24GB: Preset(dict(
        resolution=1024, train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
        mixed_precision="bf16", cache_latents=True, max_train_steps=500, learning_rate=1e-4, text_encoder_lr=5e-6,
        train_text_encoder=True, rank=16, lora_alpha=16.0, mixer="learned", mixer_init="kaiming", lora_init="gaussian",
        num_class_images=100, class_inference_steps=30, sample_batch_size=4, validation_steps=100,
        num_validation_images=4, num_validation_inference_steps=25, checkpointing_steps=100, seed=0, alpha_mask=False,
    ), min_free_bytes=3 * 2**30),
}



@dataclass(frozen=True)
class Span:
    low: float
    high: float
    whole: bool = False


# The settings a request may change (the page's advanced panel), each checked: a Span, or a tuple of choices.
ADJUSTABLE = {
    "rank": Span(1, 256, True), "lora_alpha": Span(1e-3, 4096), "learning_rate": Span(1e-7, 1.0),
    "text_encoder_lr": Span(1e-8, 1.0), "max_train_steps": Span(1, 100_000, True), "seed": Span(0, 2**31 - 1, True),
    "validation_steps": Span(1, 100_000, True), "num_class_images": Span(1, 1000, True),
    "mixer": MIXER_MODES, "mixer_init": MIXER_INITS, "lora_init": LORA_INITS, "train_text_encoder": (True, False),
    "alpha_mask": (True, False),
}
