"""The offline demo: a MoSLoRA adapter on a tiny SDXL, saved in three formats and reloaded every way.

    python -m dreambooth_moslora.demo --output_dir outputs/demo

It needs no network: the SDXL-architecture pipeline is built from config. Until the trainer
lands, the adapter's up matrices are seeded random values standing in for trained ones,
so that the mixer, the fold and every loader have something non-trivial to reproduce.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .adapter import MIXER_INITS, MIXER_MODES, AdapterConfig
from .errors import AdapterError
from .formats import save_adapter
from .inference import load_adapter, max_abs_diff, pipeline_components, sdxl_forward, unload_adapter
from .surgery import adapter_layers, inject_components, remove_adapter
from .tiny_sdxl import save_tiny_sdxl

PROMPT = "a photo of sks dog on the beach"


def labelled_grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """One row of images with a caption strip under each."""
    w, h = images[0].size
    strip = 14
    grid = Image.new("RGB", (w * len(images), h + strip), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image, (i * w, 0))
        draw.text((i * w + 2, h + 1), label, fill="black")
    return grid


def stand_in_for_training_(components: dict, seed: int, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    for model in components.values():
        for layer in adapter_layers(model).values():
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


def run(output_dir: Path, rank: int, alpha: float, mixer: str, mixer_init: str, seed: int) -> int:
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()  # before diffusers imports its pipelines: no torchvision notices
    transformers.logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    from diffusers import StableDiffusionXLPipeline

    start = time.perf_counter()
    model_dir = save_tiny_sdxl(output_dir / "tiny-sdxl", seed=seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    print(f"tiny SDXL written to {model_dir} and reloaded with StableDiffusionXLPipeline.from_pretrained")

    base = sdxl_forward(pipe, PROMPT, seed=seed)
    components = pipeline_components(pipe)
    torch.manual_seed(seed)
    params = inject_components(components, AdapterConfig(rank=rank, alpha=alpha, mixer=mixer, mixer_init=mixer_init))
    stand_in_for_training_(components, seed)
    counts = ", ".join(f"{c}: {len(adapter_layers(m))} layers" for c, m in components.items())
    n_params = sum(p.numel() for ps in params.values() for p in ps)
    print(f"MoSLoRA rank {rank}, alpha {alpha:g}, mixer {mixer} ({mixer_init}) — {counts}; {n_params:,} trainable")

    live = sdxl_forward(pipe, PROMPT, seed=seed)
    adapter_dir = output_dir / "adapter"
    files = save_adapter(adapter_dir, components, base_model=str(model_dir))
    for fmt, path in files.items():
        print(f"  {fmt:9s} {path}  ({path.stat().st_size / 1024:.0f} KiB)")

    generate = dict(prompt=PROMPT, num_inference_steps=12, guidance_scale=5.0, height=64, width=64)
    images = [pipe(**generate, generator=torch.Generator().manual_seed(seed)).images[0]]
    for model in components.values():
        remove_adapter(model)
    images.insert(0, pipe(**generate, generator=torch.Generator().manual_seed(seed)).images[0])

    print(f"max |difference| from the live adapter (UNet noise prediction and both text encoders), fp32:")
    checks = []
    for fmt, path in files.items():
        for fuse in (False, True):
            load_adapter(pipe, path, fuse=fuse)
            checks.append((f"load_adapter({fmt}, fuse={fuse})", max_abs_diff(live, sdxl_forward(pipe, PROMPT, seed=seed))))
            unload_adapter(pipe)
    try:
        import peft  # noqa: F401 — stock diffusers needs it for load_lora_weights
    except ImportError:
        print("  (peft is not installed: skipping stock diffusers' load_lora_weights)")
    else:
        for fmt in ("diffusers", "kohya"):
            pipe.load_lora_weights(str(adapter_dir), weight_name=files[fmt].name)
            checks.append((f"stock load_lora_weights({fmt})", max_abs_diff(live, sdxl_forward(pipe, PROMPT, seed=seed))))
            pipe.unload_lora_weights()
    for name, diff in checks:
        print(f"  {name:40s} {diff:.2e}  {'ok' if diff <= 1e-5 else 'MISMATCH'}")
    restored = max_abs_diff(base, sdxl_forward(pipe, PROMPT, seed=seed))
    print(f"  {'base after unloading':40s} {restored:.2e}")

    load_adapter(pipe, files["kohya"])
    images.append(pipe(**generate, generator=torch.Generator().manual_seed(seed)).images[0])
    grid = labelled_grid([im.resize((128, 128), Image.NEAREST) for im in images], ["base", "MoSLoRA", "kohya file"])
    grid_path = output_dir / "samples.png"
    grid.save(grid_path)
    print(f"sample grid (same seed: base | live adapter | reloaded kohya file): {grid_path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if all(diff <= 1e-5 for _, diff in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=float, default=8.0)
    parser.add_argument("--mixer", choices=MIXER_MODES, default="learned")
    parser.add_argument("--mixer_init", choices=MIXER_INITS, default="kaiming")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return run(args.output_dir, args.rank, args.lora_alpha, args.mixer, args.mixer_init, args.seed)
    except (AdapterError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
