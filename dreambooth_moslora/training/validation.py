"""Validation images: the adapter being trained, drawn with fixed seeds so that runs compare."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..runtime import image_generators
from ..safe_files import save_image
from ..surgery import adapter_layers
from ..inference import sampling_config


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int | None = None) -> Image.Image:
    """Images in rows of ``columns``, a caption strip under each. Images narrower than their captions
    (a 32-px toy model's) are enlarged by a whole factor, pixels kept sharp, so that captions do not overlap."""
    columns = columns or len(images)
    w, h = images[0].size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((measure.textlength(label) for label in labels), default=0)
    zoom = max(1, math.ceil((widest + 4) / w))
    w, h, strip = w * zoom, h * zoom, 14
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (w * columns, (h + strip) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * w, (i // columns) * (h + strip)
        grid.paste(image.resize((w, h), Image.NEAREST) if zoom > 1 else image, (x, y))
        draw.text((x + 2, y + h + 1), label, fill="black")
    return grid


def set_adapter_training(components: dict, training: bool) -> None:
    """Train or eval mode for the adapter layers alone (dropout); the frozen models stay as they are."""
    for model in components.values():
        for layer in adapter_layers(model).values():
            layer.train(training)


@torch.no_grad()
def validation_grid(parts: dict, components: dict, prompt: str | list[str], count: int, seed: int, steps: int,
                    resolution: int, device, mixed_precision: bool, path: Path) -> Path:
    """Draws ``count`` images of ``prompt`` (a row for each of several) with the live adapter into one labelled grid
    (the same noise each time).

    ``parts`` are the pipeline's other parts: vae, text_encoder(_2), tokenizer(_2), scheduler config.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    set_adapter_training(components, False)
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=components["unet"],
        scheduler=EulerDiscreteScheduler.from_config(sampling_config(parts["scheduler_config"], {})),
    )
    # zero terminal SNR: rescaled guidance against over-exposure, as its paper recommends (φ = 0.7)
    rescale = 0.7 if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(torch.device(device).type) if mixed_precision else nullcontext()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images, labels = [], []
    with autocast:
        for row, text in enumerate(prompts):
            for i, generator in enumerate(image_generators(seed, range(count))):  # image i: the same noise each time
                images.append(pipe(text, num_inference_steps=steps, height=resolution, width=resolution,
                                   generator=generator, guidance_rescale=rescale).images[0])
                labels.append(f"seed {seed}, #{i}" if len(prompts) == 1 else f"prompt {row + 1}, #{i}")
    save_image(labelled_grid(images, labels, columns=count), path)
    set_adapter_training(components, True)
    return path
