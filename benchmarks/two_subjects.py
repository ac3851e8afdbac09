"""Two subjects in one adapter on the toy world, from a kohya-style tree, against each subject trained alone.

    python benchmarks/two_subjects.py              # 3 seeds × (both, circle alone, square alone), about 6 minutes
    python benchmarks/two_subjects.py --seeds 1    # one seed each

The subjects: the demo's purple circle ("sks circle") and a yellow square named by a word the toy world never
wrote ("zqx square"; the base model draws "a zqx square" in any colour). Both are photographed on black and white
only. The data is laid out as kohya users lay it out:
- train/20_sks circle and train/20_zqx square, each holding 5 images and their captions;
- reg/1_circle and reg/1_square, each holding 100 class images the base model draws.

It trains through train_dreambooth.py with --train_data_dir/--reg_data_dir, the demo's recipe (pivotal tuning:
new tokens for "sks" and "zqx", a MoSLoRA adapter on the UNet, masked loss, prior preservation), for 300 steps
with both subjects and 150 with one, so each subject's images are drawn as often.

The toy world's classifier then reads, on gray and blue (backgrounds no subject photo shows), 8 seeds each:
- each subject's fidelity: "a sks circle on a <bg> background" shows a purple circle; "a zqx square …" a yellow
  square;
- each class kept: "a circle …" and "a square …" show that shape in another colour than the subject's.

It prints mean ± std over seeds, and the paired difference between both subjects in one adapter and each one
alone, with a 95% interval (Student's t), and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from dreambooth_moslora.safe_files import save_image, write_text
from quality import paired_difference  # benchmarks/ is this script's folder, as gpu_suite imports vs_diffusers
from toyworld.recipe import NEW_BACKGROUNDS, TOY_TRAINING
from toyworld.world import INSTANCE_BACKGROUNDS, Scene, render, render_mask

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = {  # word, shape, colour
    "circle": ("sks", "circle", "purple"),
    "square": ("zqx", "square", "yellow"),
}
RUNS = {"both": ("circle", "square"), "circle alone": ("circle",), "square alone": ("square",)}
IMAGES_PER_PROMPT = 8


def write_second_subject(folder: Path, masks: Path, count: int = 5, size: int = 32) -> None:
    """The yellow square on the demo subject's backgrounds, each with its caption and mask."""
    word, shape, colour = SUBJECTS["square"]
    rng = random.Random(20_000)
    for i in range(count):
        radius = rng.uniform(0.24, 0.36)
        center = (rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius))
        scene = Scene(shape, colour, INSTANCE_BACKGROUNDS[i % len(INSTANCE_BACKGROUNDS)], radius, center)
        path = folder / f"{word}_{shape}_{i}.png"
        write_text(path.with_suffix(".txt"), f"a {word} {shape} on a {scene.background} background\n")
        save_image(render_mask(scene, size), masks / path.name)
        save_image(render(scene, size), path)


def make_tree(pipe, root: Path, seed: int) -> Path:
    """The subjects' folders, their masks, and each class's images drawn by the base model (kept between runs)."""
    from toyworld.recipe import ASSETS, SUBJECT_MASKS, write_class_images

    data = root / "data"
    circle, square, masks = data / "20_sks circle", data / "20_zqx square", root / "masks"
    for folder in (circle, square, masks):
        folder.mkdir(parents=True, exist_ok=True)
    for path in (ASSETS / "subject").iterdir():
        shutil.copy2(path, circle / path.name)
    for path in SUBJECT_MASKS.iterdir():
        shutil.copy2(path, masks / path.name)
    write_second_subject(square, masks)
    for shape in ("circle", "square"):
        write_class_images(pipe, root / "class" / f"1_{shape}", seed=seed, class_prompt=f"a {shape}")
    return masks


def layout(root: Path, run: str) -> tuple[Path, Path]:
    """train/ and reg/ folders holding this run's subjects and classes (links into the shared ones)."""
    train, reg = root / "runs" / run / "train", root / "runs" / run / "reg"
    for folder in (train, reg):
        shutil.rmtree(folder, ignore_errors=True)
    train.mkdir(parents=True)
    reg.mkdir(parents=True)
    for subject in RUNS[run]:
        word, shape, _ = SUBJECTS[subject]
        (train / f"20_{word} {shape}").symlink_to(root / "data" / f"20_{word} {shape}")
        (reg / f"1_{shape}").symlink_to(root / "class" / f"1_{shape}")
    return train, reg


def train_run(root: Path, run: str, seed: int, masks: Path) -> Path:
    from dreambooth_moslora.training import parse_args, train
    from toyworld.recipe import WORLD_MODEL_DIR

    train_dir, reg_dir = layout(root, run)
    out = root / "runs" / run / f"seed{seed}"
    words = ",".join(SUBJECTS[s][0] for s in RUNS[run])
    t = TOY_TRAINING
    argv = ["--pretrained_model_name_or_path", str(WORLD_MODEL_DIR), "--train_data_dir", str(train_dir),
            "--reg_data_dir", str(reg_dir), "--mask_dir", str(masks), "--resolution", "32", "--cache_latents",
            "--train_batch_size", "2", "--max_train_steps", str(t["max_train_steps"] * len(RUNS[run])),
            "--learning_rate", str(t["learning_rate"]), "--rank", str(t["rank"]), "--lora_alpha", str(t["lora_alpha"]),
            "--lora_init", t["lora_init"], "--seed", str(seed), "--report_to", "none", "--output_dir", str(out),
            "--train_text_encoder_ti", "--token_abstraction", words, "--text_encoder_lr", str(t["text_encoder_lr"]),
            "--mixer", "learned", "--mixer_init", "kaiming", "--output_formats", "native",
            "--checkpointing_steps", "100000"]
    train(parse_args(argv))
    return out / "moslora_adapter.safetensors"


def measure(pipe, classifier, adapter: Path, seed: int) -> dict:
    """Each subject's fidelity and each class kept, on the backgrounds no photo shows."""
    from dreambooth_moslora.inference import load_adapter, unload_adapter
    from toyworld.classifier import classify, generate

    loaded = load_adapter(pipe, adapter)
    metrics = {}
    for subject, (word, shape, colour) in SUBJECTS.items():
        for kind, prompt in (("subject", f"a {word} {shape}"), ("class kept", f"a {shape}")):
            prompts = [loaded.rewrite(f"{prompt} on a {bg} background") for bg in NEW_BACKGROUNDS
                       for _ in range(IMAGES_PER_PROMPT)]
            found = classify(classifier, generate(pipe, prompts, seed=1_000 + seed))
            wanted = (lambda f: f["shape"] == shape and f["colour"] == colour) if kind == "subject" else \
                (lambda f: f["shape"] == shape and f["colour"] != colour)
            metrics[f"{subject} {kind}"] = sum(map(wanted, found)) / len(found)
    unload_adapter(pipe)
    return metrics


def paired(a: list[float], b: list[float]) -> str:
    """The quality benchmark's paired difference (Student's t), as text."""
    mean, low, high = paired_difference(a, b)
    return f"{mean:+.2f}" if math.isnan(low) else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def report(results: dict) -> dict:
    metrics = list(next(iter(results["both"])))
    print(f"\n{'run':14s} " + "  ".join(f"{m:>18s}" for m in metrics))
    for run, per_seed in results.items():
        cells = [(statistics.fmean(x[m] for x in per_seed), statistics.stdev(x[m] for x in per_seed)
                  if len(per_seed) > 1
                  else 0.0) for m in metrics]
        print(f"{run:14s} " + "  ".join(f"{mean:10.2f} ± {std:4.2f}" for mean, std in cells))
    print("\npaired by seed, both subjects in one adapter − each alone [95% CI]:")
    differences = {}
    for subject in SUBJECTS:
        alone = results[f"{subject} alone"]
        for m in (f"{subject} subject", f"{subject} class kept"):
            differences[m] = paired([x[m] for x in results["both"]], [x[m] for x in alone])
            print(f"  {m:22s} {differences[m]}")
    return differences


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "two-subjects")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir.resolve()  # the runs' folders link into it
    from dreambooth_moslora.runtime import quiet_libraries

    quiet_libraries()
    from diffusers import StableDiffusionXLPipeline

    from toyworld.classifier import load_classifier
    from toyworld.recipe import CLASSIFIER_FILE, WORLD_MODEL_DIR

    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(WORLD_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    classifier, _ = load_classifier(CLASSIFIER_FILE)
    masks = make_tree(pipe, args.output_dir, seed=0)
    results = {run: [] for run in RUNS}
    for seed in range(args.seeds):
        for run in RUNS:
            results[run].append(measure(pipe, classifier, train_run(args.output_dir, run, seed, masks), seed))
            print(f"{run:14s} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[run][-1].items()),
                  flush=True)
    differences = report(results)
    seconds = time.perf_counter() - started
    print(f"\n{seconds / 60:.1f} minutes")
    write_text(args.output_dir / "results.json", json.dumps({"results": results, "paired_both_minus_alone": differences,
                                                              "seconds": round(seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
