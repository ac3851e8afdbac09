"""Reads a toy-world image back into its attributes: shape, colour (the subject's too), background.

A small CNN trained on the world generator's own ground truth, so that images a model generates can be
scored without a person looking at them: does "a red square on a blue background" give a red square on
blue? Its training also shows the DreamBooth subject's colour (purple) on every shape, circles included,
which pretraining never draws, so it tells the subject apart from ordinary members of its class.

    python -m toyworld.classifier --output assets/toy-world-classifier.safetensors

Training is seeded and takes a few minutes on a CPU; the held-out accuracy is stored in the file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_moslora.runtime import image_generators
from dreambooth_moslora.safe_files import read_safetensors, write_safetensors

from .world import BACKGROUNDS, COLOURS, SHAPES, Scene, render, sample_scene, scenes

HEADS = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
IMAGE_SIZE = 32
SUBJECT_SHARE = 0.2  # of training scenes: the subject's colour on every shape (pretraining never draws a purple circle)


class AttributeClassifier(nn.Module):
    """Three heads over one small convolutional trunk; input 32×32 RGB in [-1, 1]."""

    def __init__(self, width: int = 16):
        super().__init__()

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *conv(3, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 4 * width), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * width * (IMAGE_SIZE // 8) ** 2, 128), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size) → N×3×32×32 in [-1, 1]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), resample=3)  # bicubic
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def labels(scene_list: list[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scene_list]) for name, values in HEADS.items()}


def classifier_scenes(count: int, seed: int) -> list[Scene]:
    """Ordinary scenes plus the subject's colour on every shape and background."""
    rng = random.Random(seed)
    return [
        sample_scene(rng, is_subject=True, shape=rng.choice(SHAPES)) if rng.random() < SUBJECT_SHARE
            else sample_scene(rng)
        for _ in range(count)
    ]


def degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and brightness shifts: generated images are softer and noisier than rendered ones."""
    n = pixels.shape[0]
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=generator)
    pixels = torch.lerp(pixels, blurred, amount)
    strength = torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    pixels = pixels + torch.randn(pixels.shape, generator=generator) * strength
    pixels = pixels * (1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.15)
    return pixels.clamp(-1, 1)


@torch.no_grad()
def predict(classifier: AttributeClassifier, pixels: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    classifier.eval()
    out = {name: [] for name in HEADS}
    for start in range(0, len(pixels), batch_size):
        logits = classifier(pixels[start : start + batch_size])
        for name in HEADS:
            out[name].append(logits[name].argmax(dim=1))
    return {name: torch.cat(v) for name, v in out.items()}


def classify(classifier: AttributeClassifier, images) -> list[dict[str, str]]:
    """Each image's attributes by name: ``{"shape": "circle", "colour": "purple", "background": "blue"}``."""
    found = predict(classifier, to_tensor(images))
    return [{name: HEADS[name][int(found[name][i])] for name in HEADS} for i in range(len(images))]


def accuracy(classifier: AttributeClassifier, scene_list: list[Scene]) -> dict[str, float]:
    pixels = to_tensor([render(s, IMAGE_SIZE) for s in scene_list])
    found, truth = predict(classifier, pixels), labels(scene_list)
    return {name: float((found[name] == truth[name]).float().mean()) for name in HEADS}


def prompt_scenes(count: int, seed: int) -> list[Scene]:
    """Scenes whose captions serve as evaluation prompts (a seed range pretraining does not use)."""
    return scenes(count, seed=7_000_000 + seed)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 5.0, batch_size: int = 64):
    """One image per prompt; image i always gets the same starting noise, whatever the batch size."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = image_generators(seed, range(start, start + len(chunk)))
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
        images.extend(out.images)
    return images


def attribute_accuracy(pipe, classifier: AttributeClassifier, count: int = 200, seed: int = 0, steps: int = 25,
                       guidance: float = 5.0):
    """How often images generated from world captions show the prompted shape, colour and background.

    Returns the accuracy per attribute, the prompted scenes and the images.
    """
    prompted = prompt_scenes(count, seed)
    images = generate(pipe, [s.caption for s in prompted], seed=seed, steps=steps, guidance=guidance)
    found = classify(classifier, images)
    result = {name: sum(f[name] == getattr(s, name) for f, s in zip(found, prompted)) / count for name in HEADS}
    return result, prompted, images


def image_grid(images, columns: int, zoom: int = 3):
    """The images side by side (row-major), enlarged without smoothing so that pixels stay visible."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w * zoom, rows * h * zoom), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.resize((w * zoom, h * zoom), Image.NEAREST),
                   ((i % columns) * w * zoom, (i // columns) * h * zoom))
    return grid


def train_classifier(steps: int = 1200, train_size: int = 20_000, batch_size: int = 128, seed: int = 0, log=print):
    """Returns the classifier and its accuracy per attribute on 2,000 held-out scenes (another seed)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = classifier_scenes(train_size, seed=seed)
    pixels = to_tensor([render(s, IMAGE_SIZE) for s in train])
    targets = labels(train)
    classifier = AttributeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    classifier.train()
    for step in range(steps):
        index = torch.randint(0, train_size, (batch_size,), generator=generator)
        logits = classifier(degrade(pixels[index], generator))
        loss = sum(F.cross_entropy(logits[name], targets[name][index]) for name in HEADS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step + 1}/{steps}: loss {loss.item():.4f}")
    held_out = accuracy(classifier, classifier_scenes(2000, seed=seed + 1_000_000))
    return classifier.eval(), held_out


def save_classifier(classifier: AttributeClassifier, path: Path, held_out: dict[str, float], settings: dict) -> None:
    metadata = {"held_out_accuracy": json.dumps(held_out), "settings": json.dumps(settings), "heads": json.dumps(HEADS)}
    write_safetensors(Path(path), {k: v.contiguous() for k, v in classifier.state_dict().items()}, metadata)


def load_classifier(path: Path) -> tuple[AttributeClassifier, dict[str, float]]:
    tensors, metadata = read_safetensors(Path(path))
    if json.loads(metadata.get("heads", "{}")) != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"{path}: made for another toy world (its attribute lists differ from this version's)")
    classifier = AttributeClassifier()
    classifier.load_state_dict(tensors)
    return classifier.eval(), json.loads(metadata["held_out_accuracy"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    classifier, held_out = train_classifier(steps=args.steps, seed=args.seed)
    seconds = round(time.perf_counter() - started, 1)
    save_classifier(classifier, args.output, held_out, {"steps": args.steps, "seed": args.seed, "seconds": seconds})
    print("held-out accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in held_out.items()) + f" ({seconds} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
