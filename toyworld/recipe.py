"""DreamBooth on the toy world: the settings, data and judgements the demo and the quality benchmark share.

The subject is the purple circle in ``assets/subject``; the base model the pretrained toy world in
``assets/toy-sdxl``; the attribute classifier in ``assets/toy-world-classifier.safetensors`` reads
generated images back into shape, colour and background.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import torch

from dreambooth_moslora.safe_files import save_image, write_text

from .classifier import classify, generate
from .world import (BACKGROUNDS, CLASS_PROMPT, INSTANCE_BACKGROUNDS, SUBJECT_CLASS, SUBJECT_COLOUR, SUBJECT_PROMPT,
                    SUBJECT_TOKEN)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WORLD_MODEL_DIR = ASSETS / "toy-sdxl"
CLASSIFIER_FILE = ASSETS / "toy-world-classifier.safetensors"
# the subject's masks, same file names (toyworld.world.write_subject makes them)
SUBJECT_MASKS = ASSETS / "subject_masks"
NEW_BACKGROUNDS = [name for name in BACKGROUNDS if name not in INSTANCE_BACKGROUNDS]
# The trainer's sample (validation) prompt in the demo and the web demo: the subject on a background its photos never
# show. The captions always name a background, so a bare "a sks circle" leaves the model guessing one (murky).
TOY_SAMPLE_PROMPT = f"{SUBJECT_PROMPT} on a {NEW_BACKGROUNDS[0]} background"
SAMPLE_SEEDS = 8  # images per prompt and background in the demo's grid
VARIETY_SEEDS = 48  # images of the class prompt per background, with and without the adapter, for its variety
# Prior preservation's class images, 25 per background (diffusers' default count): with 20 the adapter drew "a circle"
# in one colour per background (total-variation distance 0.75 from the base model's over 48 seeds); with 100,
# 0.25-0.26 over three seeds (docs/toy-world.md).
NUM_CLASS_IMAGES = 100
# in the demo's class folder: which base model and seed drew its images (not a caption, not an image)
MADE_BY = ".made_by"
# The demo's training settings, shared by the quality benchmark and the web demo's toy-world preset. A is
# the trainer's default, diffusers' Gaussian (std 1/r). The text encoders learn faster than the UNet:
# "sks" is a word the base model reads as nothing, and the subject is bound to it there (at 1e-3 they
# bound it for some seeds only; README, quick start).
TOY_TRAINING = dict(max_train_steps=150, learning_rate=1e-3, text_encoder_lr=3e-3, rank=4, lora_alpha=8.0,
                    lora_init="gaussian")
# The demo and the quality benchmark train on the subject's pixels only (its masks, SUBJECT_MASKS): its five
# photos show two backgrounds, and on the whole image the adapter also learned them — on gray the subject
# drifted to blue or to a cross. The web demo's preset trains on whole images unless told to mask (alpha channels).
TOY_MASKED_LOSS = True


def shows_subject(found: dict) -> bool:
    return found["shape"] == SUBJECT_CLASS and found["colour"] == SUBJECT_COLOUR


def shows_ordinary_member(found: dict) -> bool:
    """A member of the subject's class that is not the subject: what prior preservation keeps."""
    return found["shape"] == SUBJECT_CLASS and not shows_subject(found)


def toy_dreambooth_argv(subject: Path, output_dir: Path, steps: int, lr: float, rank: int, alpha: float, seed: int,
                        class_dir: Path | None = None, text_encoder_lr: float | None = None,
                        mask_dir: Path | None = None, lora_init: str = TOY_TRAINING["lora_init"],
                        num_class_images: int = NUM_CLASS_IMAGES, prior_loss_weight: float = 1.0,
                        pivotal: bool = False) -> list[str]:
    """train_dreambooth.py's arguments for DreamBooth on the toy world (the demo's, shared by the
    quality benchmark): prior preservation when ``class_dir`` is given, adapters on the text encoders
    too when ``text_encoder_lr`` is, or with ``pivotal`` new tokens for "sks" learned at that rate instead.
    The mixer is left to the caller.

    The subject's photos are captioned with their backgrounds ("a sks circle on a black background"),
    and so are the class images (see ``write_class_images``): when the class images carried the bare
    class prompt, the background words drifted instead ("a circle on a black background" drew the
    purple subject)."""
    argv = [
        "--pretrained_model_name_or_path", str(WORLD_MODEL_DIR), "--instance_data_dir", str(subject),
        "--instance_prompt", SUBJECT_PROMPT, "--caption_extension", ".txt", "--resolution", "32", "--cache_latents",
        "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", str(lr),
        "--rank", str(rank), "--lora_alpha", str(alpha), "--lora_init", lora_init, "--seed", str(seed), "--report_to",
            "none",
        "--output_dir", str(output_dir),
    ]
    if class_dir is not None:  # made by write_class_images
        argv += ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--class_data_dir", str(class_dir),
                 "--num_class_images", str(num_class_images), "--prior_loss_weight", str(prior_loss_weight)]
    if text_encoder_lr is not None:
        argv += ["--text_encoder_lr", str(text_encoder_lr)]
        argv += ["--train_text_encoder_ti", "--token_abstraction",
                 SUBJECT_TOKEN] if pivotal else ["--train_text_encoder"]
    if mask_dir is not None:  # masked loss: the subject's pixels count, its photos' backgrounds do not
        argv += ["--mask_dir", str(mask_dir)]
    return argv


def model_fingerprint(pipe) -> str:
    """A short hash of a pipeline's UNet and text-encoder weights: which base model drew a set of images."""
    digest = hashlib.sha256()
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_class_images(pipe, folder: Path, seed: int = 0, count: int = NUM_CLASS_IMAGES,
                       class_prompt: str = CLASS_PROMPT) -> list[Path]:
    """The class images for prior preservation: the base model's own "a circle on a <bg> background"
    for every background, each saved with its prompt as caption. ``folder`` is the demo's own: images
    already made by this base model with this seed (stamped in the folder: ``model_fingerprint``, the
    seed, and another class's prompt) are kept; anything else in it is removed (the trainer would count
    it as a class image, and images of another model are not this model's prior)."""
    backgrounds = list(BACKGROUNDS)
    prompts = [f"{class_prompt} on a {backgrounds[i % len(backgrounds)]} background" for i in range(count)]
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    stamp = folder / MADE_BY
    made_by = f"{model_fingerprint(pipe)} seed {seed}" + (f" {class_prompt}" if class_prompt != CLASS_PROMPT else "")
    folder.mkdir(parents=True, exist_ok=True)
    current = stamp.is_file() and stamp.read_text().strip() == made_by
    keep = {*paths, *(p.with_suffix(".txt") for p in paths), stamp} if current else set()
    for stale in folder.iterdir():
        if stale not in keep and stale.is_file():
            stale.unlink()
    if all(p.is_file() and p.with_suffix(".txt").is_file() for p in paths):
        return paths
    for path, prompt, image in zip(paths, prompts, generate(pipe, prompts, seed=seed, steps=25)):
        write_text(path.with_suffix(".txt"), prompt + "\n")
        save_image(image, path)  # the image last: an image present always has its caption
    write_text(stamp, made_by + "\n")
    return paths


def total_variation(a: list, b: list) -> float:
    """Half the L1 distance between the empirical distributions of two samples of labels: 0 the same, 1 disjoint."""
    pa, pb = Counter(a), Counter(b)
    return 0.5 * sum(abs(pa[k] / len(a) - pb[k] / len(b)) for k in pa.keys() | pb.keys())


def class_variety(base: dict[str, list], adapted: dict[str, list], reps: int = 2000, seed: int = 0) -> dict:
    """How far an adapter moves the class: per background, the total-variation distance between what the classifier
    reads (shape and colour) in the base model's images of the class prompt and the adapter's, from the same seeds;
    overall, their mean, with a 95% bootstrap interval (seeds resampled, the same ones for both models)."""
    def labels(found: list[dict]) -> list[tuple]:
        return [(f["shape"], f["colour"]) for f in found]

    per_background = {bg: total_variation(labels(base[bg]), labels(adapted[bg])) for bg in base}
    rng, draws = random.Random(seed), []
    for _ in range(reps):
        tvs = []
        for bg in base:
            picks = [rng.randrange(len(base[bg])) for _ in base[bg]]
            tvs.append(total_variation([labels(base[bg])[i] for i in picks], [labels(adapted[bg])[i] for i in picks]))
        draws.append(sum(tvs) / len(tvs))
    draws.sort()
    colours = {bg: (Counter(f["colour"] for f in base[bg]), Counter(f["colour"] for f in adapted[bg])) for bg in base}
    return {"tv": sum(per_background.values()) / len(per_background), "tv_interval": (draws[int(0.025 * reps)],
            draws[int(0.975 * reps) - 1]), "per_background": per_background, "colours": colours}


def base_class_reads(pipe, classifier, cache: Path, seed: int = 0) -> tuple[dict, dict]:
    """What the base model draws for the class prompt on each of NEW_BACKGROUNDS, read by the classifier: images
    0…VARIETY_SEEDS−1 (paired with the adapter's) and as many more (the noise floor: the base model against
    itself on other seeds). Kept in ``cache`` for this model and seed: the base model's images never change."""
    key = f"{model_fingerprint(pipe)} seed {seed} seeds {VARIETY_SEEDS}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["paired"], cached["others"]
    except (OSError, ValueError, AttributeError):
        pass
    paired, others = {}, {}
    for bg in NEW_BACKGROUNDS:
        prompts = [f"{CLASS_PROMPT} on a {bg} background"] * 2 * VARIETY_SEEDS
        found = classify(classifier, generate(pipe, prompts, seed=seed))
        paired[bg], others[bg] = found[:VARIETY_SEEDS], found[VARIETY_SEEDS:]
    write_text(cache, json.dumps({"key": key, "paired": paired, "others": others}))
    return paired, others


def describe_variety(variety: dict, floor: dict) -> list[str]:
    """The class-variety figures in words: the distance, its interval, the noise floor, the colours per background."""
    low, high = variety["tv_interval"]
    per_bg = ", ".join(f"{bg} {tv:.2f}" for bg, tv in variety["per_background"].items())
    lines = [f"the class ({CLASS_PROMPT!r}, {VARIETY_SEEDS} seeds per background): total-variation distance "
             f"between the base model's and the adapter's shapes and colours {variety['tv']:.2f} "
             f"[95% {low:.2f}, {high:.2f}] ({per_bg}); the base model against itself on other seeds: {floor['tv']:.2f}"]
    for bg, (base, adapted) in variety["colours"].items():
        def spread(counts):
            return ", ".join(f"{colour} {n}" for colour, n in counts.most_common())

        lines.append(f"colours on {bg}: base model {spread(base)}; with the adapter {spread(adapted)}")
    return lines
