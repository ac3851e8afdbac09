"""The README.md written beside a trained adapter: what it is, how it was trained, how to load it."""

from __future__ import annotations

import json
from pathlib import Path

from ..safe_files import write_text

VALIDATION_HEADING = "## Validation images"  # the card's last section: pages that cannot serve its picture drop it


def write_model_card(output_dir: Path, settings: dict, files: dict[str, Path], grid: Path | None = None) -> Path:
    base = settings.get("pretrained_model_name_or_path", "")
    prompt = settings.get("instance_prompt", "")
    example = settings.get("validation_prompt") or prompt  # what the trainer sampled with, if it did
    names = {fmt: path.name for fmt, path in files.items()}
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "license: openrail++",
        f"instance_prompt: {prompt}",
        "tags: [text-to-image, stable-diffusion-xl, diffusers, lora, moslora, dreambooth]",
        "---",
        "",
        f"# MoSLoRA DreamBooth adapter for {base}",
        "",
        f"Trained with dreambooth-moslora on {settings.get('num_train_images', '?')} image(s) of the subject "
        f"`{prompt}`" + (f", with prior preservation on `{settings.get('class_prompt')}`" if settings.get("with_prior_preservation") else "") + ".",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("rank", "lora_alpha", "mixer", "mixer_init", "max_train_steps", "learning_rate", "train_batch_size",
                "resolution", "train_text_encoder", "mixed_precision", "prediction_type", "seed", "final_loss"):  # fmt: skip
        if key in settings:
            value = settings[key]
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Files", ""]
    descriptions = {
        "native": "MoSLoRA with its mixer (A, M, B): for resuming or further training with dreambooth-moslora",
        "diffusers": "plain LoRA with the mixer folded in: loads in stock diffusers",
        "kohya": "plain LoRA in kohya's layout: loads in ComfyUI and AUTOMATIC1111",
    }
    lines += [f"- `{name}` — {descriptions[fmt]}" for fmt, name in names.items()]
    if "diffusers" in names:
        lines += [
            "", "## Use it in diffusers", "", "```python", "import torch",
            "from diffusers import StableDiffusionXLPipeline", "",
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{output_dir}", weight_name="{names["diffusers"]}")',
            f"image = pipe({json.dumps(example)}, num_inference_steps=30).images[0]", "```",
        ]  # fmt: skip
    if grid is not None:
        lines += ["", VALIDATION_HEADING, "", f"“{example}”, at the end of training:", "", f"![validation]({grid.name})"]
    return write_text(output_dir / "README.md", "\n".join(lines) + "\n")
