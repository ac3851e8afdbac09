"""Synthetic subjects, drawn deterministically, for the offline demo and the tests.

The demo subject is a striped ball — a disc with diagonal bands in two fixed colours — seen at
different sizes and places on plain backgrounds. It stands in for "sks dog" where no photos
and no real SDXL are at hand.

    python -m dreambooth_moslora.synthetic assets/subject
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {"white": (240, 240, 236), "blue": (60, 90, 200), "green": (60, 160, 80), "black": (25, 25, 25)}
SUBJECT_PROMPT = "a photo of sks ball"
CLASS_PROMPT = "a photo of ball"


def striped_ball(size: int, background: tuple, center: tuple[float, float], radius: float, stripes=((230, 60, 40), (250, 210, 40))) -> Image.Image:
    """A disc with diagonal stripes (width radius/2.5), drawn at 4× and downsampled for smooth edges."""
    scale = 4
    big = Image.new("RGB", (size * scale, size * scale), background)
    mask = Image.new("L", big.size, 0)
    cx, cy, r = center[0] * scale, center[1] * scale, radius * scale
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    bands = Image.new("RGB", big.size, stripes[0])
    draw = ImageDraw.Draw(bands)
    width = r / 2.5
    for k in range(-int(4 * size * scale / width), int(4 * size * scale / width)):
        if k % 2:
            x0 = k * width
            draw.polygon([(x0, 0), (x0 + width, 0), (x0 + width + big.height, big.height), (x0 + big.height, big.height)], fill=stripes[1])
    big.paste(bands, (0, 0), mask)
    return big.resize((size, size), Image.LANCZOS)


def subject_images(count: int = 5, size: int = 64, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``count`` views of the striped ball, with a caption each."""
    rng = random.Random(seed)
    names = list(BACKGROUNDS)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        radius = size * rng.uniform(0.26, 0.36)
        center = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
        out.append((striped_ball(size, BACKGROUNDS[name], center, radius), f"{SUBJECT_PROMPT} on a {name} background"))
    return out


def write_subject(folder: Path, count: int = 5, size: int = 64, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, caption) in enumerate(subject_images(count, size, seed)):
        path = folder / f"sks_ball_{i}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the demo subject's images.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_subject(args.folder, args.count, args.size, args.seed):
        print(path)


if __name__ == "__main__":
    main()
