"""The README.md written beside a trained adapter: what it is, how it was trained, how to load it."""

from __future__ import annotations

import json
import re
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
        f"base_model: {yaml_string(base)}",
        "library_name: diffusers",
        "license: openrail++",
        f"instance_prompt: {yaml_string(prompt)}",
        "tags: [text-to-image, stable-diffusion-xl, diffusers, lora, moslora, dreambooth]",
        "---",
        "",
        f"# MoSLoRA DreamBooth adapter for {base}",
        "",
        *([f"Base model: {code(Path(base).name)}, AutoV2 `{settings['base_model_autov2']}` "
           f"(sha256 `{settings['base_model_sha256']}`).", ""] if settings.get("base_model_autov2") else []),
        f"Trained with dreambooth-moslora on {settings.get('num_train_images', '?')} image(s) of the subject "
        f"{code(prompt)}" + (f", with prior preservation on {code(settings.get('class_prompt'))}"
                             if settings.get("with_prior_preservation") else "") + ".",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("rank", "lora_alpha", "mixer", "mixer_init", "max_train_steps", "learning_rate", "train_batch_size",
                "resolution", "train_text_encoder", "mixed_precision", "prediction_type", "seed", "final_loss"):
        if key in settings:
            value = settings[key]
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Files", ""]
    descriptions = {
        "native": "MoSLoRA with its mixer (A, M, B): for resuming or further training with dreambooth-moslora",
        "diffusers": "plain LoRA with the mixer folded in: loads in stock diffusers",
        "kohya": "plain LoRA in kohya's layout: loads in ComfyUI and AUTOMATIC1111",
        "embeddings": "pivotal tuning's new tokens (clip_l, clip_g): load them with the LoRA, and write the tokens "
                      "in prompts as the example does",
    }
    if settings.get("new_tokens"):
        abstractions = " or ".join(code(a.strip()) for a in str(settings.get("token_abstraction", "")).split(","))
        descriptions["kohya"] += ("; it bundles the new tokens' embeddings, which AUTOMATIC1111 and Forge draw where "
                                  f"a prompt says {abstractions} (in ComfyUI load the `_emb` file as an embedding)")
    lines += [f"- `{name}` — {descriptions[fmt]}" for fmt, name in names.items()]
    if "diffusers" in names:
        lines += [
            "", "## Use it in diffusers", "", "```python", "import torch",
            "from diffusers import StableDiffusionXLPipeline", "",
            *pipeline_lines(base, settings.get("base_config")),
            f'pipe.load_lora_weights("{output_dir}", weight_name="{names["diffusers"]}")',
            *embedding_lines(output_dir, names.get("embeddings"), settings.get("new_tokens")),
            f"image = pipe({json.dumps(example)}, num_inference_steps=30).images[0]", "```",
        ]
    if grid is not None:
        rows = settings.get("validation_prompts") or [example]
        shown = code(example) if len(rows) == 1 else "; ".join(f"row {i + 1}: {code(p)}" for i, p in enumerate(rows))
        lines += ["", VALIDATION_HEADING, "", f"{shown}, at the end of training:", "", f"![validation]({grid.name})"]
    return write_text(output_dir / "README.md", "\n".join(lines) + "\n")


def yaml_string(text) -> str:
    """A value for the card's YAML header that reads back as exactly ``text``, whatever it holds (``:``, ``#``,
    quotes): a JSON string, which YAML reads as its double-quoted scalar."""
    return json.dumps(str(text), ensure_ascii=False)


def code(text) -> str:
    """``text`` as a Markdown code span, so that a prompt's ``<s0><s1>`` (pivotal tuning's tokens) or ``*`` shows
    as written instead of being taken for HTML or emphasis; a longer fence where the text holds backticks."""
    text = str(text)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def pipeline_lines(base: str, base_config: str | None) -> list[str]:
    """The example's pipeline: from the base's folder or hub id, or from its checkpoint file with our reader (with
    this project's pinned libraries diffusers' from_single_file leaves CLIP-L unloaded)."""
    if base.lower().endswith(".safetensors"):
        return ["from dreambooth_moslora.single_file import file_pipeline", "",
                f'pipe = file_pipeline("{base}", "{base_config}", torch.float16).to("cuda")']
    return [f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")']


def embedding_lines(output_dir: Path, name: str | None, tokens: list | None) -> list[str]:
    """Pivotal tuning's tokens into both text encoders, as stock diffusers loads an SDXL embedding."""
    if not name:
        return []
    return ["from safetensors.torch import load_file", f'emb = load_file("{Path(output_dir) / name}")',
            f'pipe.load_textual_inversion(emb["clip_l"], token={tokens}, text_encoder=pipe.text_encoder, '
            'tokenizer=pipe.tokenizer)',
            f'pipe.load_textual_inversion(emb["clip_g"], token={tokens}, text_encoder=pipe.text_encoder_2, '
            'tokenizer=pipe.tokenizer_2)']
