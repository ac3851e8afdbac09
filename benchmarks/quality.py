"""Plain LoRA vs MoSLoRA, on the pretrained toy world: does the learned mixer personalize better?

    python benchmarks/quality.py                 # 4 variants × 5 seeds (about 8 minutes on 2 CPU cores)
    python benchmarks/quality.py --quick         # 4 variants × 2 seeds, short runs (a few minutes)
    python benchmarks/quality.py --variants lora,moslora-kaiming --learning_rate 3e-3 --text_encoder_lr 3e-3 \
        --output_dir outputs/quality-lr3e-3      # the same at another learning rate

Every variant trains a DreamBooth adapter on the same subject (the purple circle in assets/subject)
with the same rank, α, learning rate, steps, data and seeds, through train_dreambooth.py's own code,
at the demo's settings: prior preservation on 20 images of "a circle" made by the base model,
adapters on the UNet and both text encoders, and the loss on the subject's pixels (its masks)
(--no-with_prior_preservation, --no-train_text_encoder and --no-masked_loss turn each off). Only the
mixer differs:

  lora                 --mixer none                 (plain LoRA through the same layer)
  moslora-kaiming      --mixer learned --mixer_init kaiming      (the paper's choice)
  moslora-orthogonal   --mixer learned --mixer_init orthogonal
  frozen-mixer         --mixer frozen  --mixer_init kaiming      (the paper's fixed-mixer variant)

At checkpoints along the run, images are generated with the same seeds and read back by the toy
world's attribute classifier:

  subject fidelity     share of "a sks circle on a <bg> background" images that show a purple circle
  prompt fidelity      share of those images on the prompted background (gray and blue: backgrounds
                       the subject's photos never show)
  class kept           share of "a circle on a <bg> background" images that show an ordinary circle
                       (not purple): how much of the class the adapter leaves alone; the base model's
                       figure is measured too
  class as base        share of those images with the shape, colour and background the base model drew
                       from the same noise: the class's variety kept, not only its kind

--variants lora,moslora-kaiming,lora-ema,moslora-ema compares the adapters with their moving average (--use_ema).
--variants where compares where the subject's word is learned: text-encoder adapters (lora, moslora-kaiming),
pivotal tuning's new tokens (lora-pivotal, moslora-pivotal) or nowhere (lora-unet-only, moslora-unet-only).

Behind --variants, the knobs Adam is not invariant to and masked loss: moslora-mixer-lr10 (the mixer at
10× the learning rate), lora-kaiming-a and moslora-kaiming-a (A kaiming-uniform, as nn.Linear, instead
of the trainer's default Gaussian with std 1/r), lora-rank16 and moslora-rank16 (α scaled with the rank),
lora-unmasked and moslora-unmasked (the loss on every pixel instead of the subject's, as without --masked_loss).

It prints mean ± std over seeds at the last step and, paired by seed (same data, noise and evaluation
images), each variant minus plain LoRA with a 95% confidence interval (Student's t); writes
results.json, the loss curves (loss.csv of each run) and a plot of subject fidelity and class kept
against steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dreambooth_moslora.safe_files import save_image, write_text
from dreambooth_moslora.training.loop import read_loss_log
from toyworld.recipe import NUM_CLASS_IMAGES, TOY_MASKED_LOSS, TOY_TRAINING, VARIETY_SEEDS

ROOT = Path(__file__).resolve().parents[1]  # outputs go under the checkout

@dataclass(frozen=True)
class Variant:
    """One way of training: the trainer's flags (from the benchmark's options), whether its loss takes the
    subject masks when --masked_loss is on, whether it is in the default set, and its colour in the plot."""

    flags: Callable[[argparse.Namespace], list[str]]
    colour: tuple[int, int, int]
    masked: bool = True
    default: bool = False
    text_encoder: bool = True  # adapters on the text encoders when --train_text_encoder is on


def pivotal(mixer: str) -> Callable[[argparse.Namespace], list[str]]:
    """Pivotal tuning: new tokens for "sks" (learned at the text encoders' rate for half the steps) and the UNet's
    adapter; no text-encoder adapters."""
    return lambda a: ["--mixer", mixer, "--train_text_encoder_ti", "--token_abstraction", "sks",
                      "--text_encoder_lr", str(a.text_encoder_lr)]


VARIANTS = {
    # the default set: the mixer against plain LoRA, all else equal
    "lora": Variant(lambda a: ["--mixer", "none"], (90, 90, 90), default=True),
    "moslora-kaiming": Variant(lambda a: ["--mixer", "learned", "--mixer_init", "kaiming"], (220, 60, 40),
                               default=True),
    "moslora-orthogonal": Variant(lambda a: ["--mixer", "learned", "--mixer_init", "orthogonal"], (40, 110, 220),
                                  default=True),
    "frozen-mixer": Variant(lambda a: ["--mixer", "frozen", "--mixer_init", "kaiming"], (40, 160, 70), default=True),
    # behind --variants: the knobs Adam is not invariant to (mixer lr, A's init, rank), and masked loss
    "moslora-mixer-lr10": Variant(lambda a: ["--mixer", "learned", "--mixer_lr", str(10 * a.learning_rate)],
                                  (240, 160, 0)),
    "lora-kaiming-a": Variant(lambda a: ["--mixer", "none", "--lora_init", "kaiming"], (150, 150, 150)),
    "moslora-kaiming-a": Variant(lambda a: ["--mixer", "learned", "--lora_init", "kaiming"], (240, 130, 170)),
    "lora-rank16": Variant(lambda a: ["--mixer", "none", "--rank", "16", "--lora_alpha", str(4 * a.lora_alpha)],
                           (30, 30, 30)),
    "moslora-rank16": Variant(lambda a: ["--mixer", "learned", "--rank", "16", "--lora_alpha", str(4 * a.lora_alpha)],
                              (130, 40, 20)),
    "lora-unmasked": Variant(lambda a: ["--mixer", "none"], (170, 50, 200), masked=False),
    "moslora-unmasked": Variant(lambda a: ["--mixer", "learned", "--mixer_init", "kaiming"], (0, 170, 170),
                                masked=False),
    # where the subject's word is learned: text-encoder adapters (above), pivotal tuning's new tokens, or nowhere
    "lora-unet-only": Variant(lambda a: ["--mixer", "none"], (120, 80, 40), text_encoder=False),
    "moslora-unet-only": Variant(lambda a: ["--mixer", "learned", "--mixer_init", "kaiming"], (200, 140, 80),
                                 text_encoder=False),
    "lora-pivotal": Variant(pivotal("none"), (60, 60, 160), text_encoder=False),
    "moslora-pivotal": Variant(pivotal("learned"), (120, 120, 255), text_encoder=False),
}
VARIANTS |= {  # an exponential moving average of the adapter saved in its place (--use_ema, default decay)
    "lora-ema": Variant(lambda a: ["--mixer", "none", "--use_ema"], (160, 160, 60)),
    "moslora-ema": Variant(lambda a: ["--mixer", "learned", "--mixer_init", "kaiming", "--use_ema"], (250, 120, 60)),
}
# issue 26's comparison: subject fidelity and class variety by where the word is learned, with and without the mixer
WHERE_THE_WORD_IS_LEARNED = ["lora", "moslora-kaiming", "lora-pivotal", "moslora-pivotal", "lora-unet-only",
                             "moslora-unet-only"]
DEFAULT_VARIANTS = [name for name, v in VARIANTS.items() if v.default]
# Student's t for a two-sided 95% interval, by degrees of freedom (paired differences over n seeds: n − 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def variant_flags(variant: str, args) -> list[str]:
    return VARIANTS[variant].flags(args)


def paired_difference(values: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its 95% confidence interval (Student's t)."""
    diffs = [v - r for v, r in zip(values, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


METRICS = ("subject", "prompt", "class_kept", "class_as_base")
FINAL_METRICS = (*METRICS, "class_tv")  # the class's variety is measured after the last step only (96 images a run)


def settings(quick: bool) -> dict:
    if quick:
        return dict(seeds=2, steps=40, eval_every=20, images_per_prompt=2, sample_steps=10, variety_seeds=4)
    steps = TOY_TRAINING["max_train_steps"]
    return dict(seeds=5, steps=steps, eval_every=steps // 2, images_per_prompt=8, sample_steps=20,
                variety_seeds=VARIETY_SEEDS)


def prompts(images_per_prompt: int):
    from toyworld.recipe import NEW_BACKGROUNDS
    from toyworld.world import BACKGROUNDS, CLASS_PROMPT, SUBJECT_PROMPT

    subject = [(f"{SUBJECT_PROMPT} on a {bg} background", bg) for bg in NEW_BACKGROUNDS
               for _ in range(images_per_prompt)]
    klass = [(f"{CLASS_PROMPT} on a {bg} background", bg)
             for bg in BACKGROUNDS for _ in range(max(1, images_per_prompt // 2))]
    return subject, klass


@dataclass
class Evaluation:
    """The fixed evaluation: prompts, sampling steps and starting noise (the same for every variant, seed and
    step), and what the base model drew for each class prompt from that noise, the reference of class_as_base."""

    subject_prompts: list[tuple[str, str]]
    class_prompts: list[tuple[str, str]]
    sample_steps: int
    variety_seeds: int = 0  # images of "a circle on a <bg> background" per unseen background, for the class's variety
    seed: int = 1_000
    base_class: list[dict] | None = None
    base_variety: dict | None = None

    def measure_base(self, pipe, classifier) -> dict:
        found = self._classify(pipe, classifier)
        self.base_class = found[len(self.subject_prompts) :]
        self.base_variety = self._variety(pipe, classifier)
        return {**self._metrics(found), "class_tv": 0.0}

    def measure(self, pipe, classifier, final: bool = False, rewrite=lambda prompt: prompt) -> dict:
        """The measures of an adapter now in the pipeline (its prompts through ``rewrite``: pivotal tuning's tokens);
        with ``final``, the class's variety too: the total-variation distance between its shapes and colours and the
        base model's from the same noise (toyworld.recipe)."""
        metrics = self._metrics(self._classify(pipe, classifier, rewrite))
        if final and self.variety_seeds:
            from toyworld.recipe import class_variety

            metrics["class_tv"] = class_variety(self.base_variety, self._variety(pipe, classifier), reps=1)["tv"]
        return metrics

    def _variety(self, pipe, classifier) -> dict[str, list[dict]]:
        from toyworld.classifier import classify, generate
        from toyworld.recipe import NEW_BACKGROUNDS
        from toyworld.world import CLASS_PROMPT

        return {bg: classify(classifier, generate(pipe, [f"{CLASS_PROMPT} on a {bg} background"] * self.variety_seeds,
                                                  seed=self.seed, steps=self.sample_steps)) for bg in NEW_BACKGROUNDS}

    def _classify(self, pipe, classifier, rewrite=lambda prompt: prompt) -> list[dict]:
        from toyworld.classifier import classify, generate

        texts = [rewrite(p) for p, _ in self.subject_prompts] + [rewrite(p) for p, _ in self.class_prompts]
        return classify(classifier, generate(pipe, texts, seed=self.seed, steps=self.sample_steps))

    def _metrics(self, found: list[dict]) -> dict:
        from toyworld.recipe import shows_ordinary_member, shows_subject

        mine, theirs = found[: len(self.subject_prompts)], found[len(self.subject_prompts) :]
        return {
            "subject": sum(map(shows_subject, mine)) / len(mine),
            "prompt": sum(f["background"] == bg for f, (_, bg) in zip(mine, self.subject_prompts)) / len(mine),
            "class_kept": sum(map(shows_ordinary_member, theirs)) / len(theirs),
            # the same shape, colour and background as the base model drew from the same noise: prior preservation
            # keeps the class's variety too, not only its kind ("a circle" turning green every time keeps the kind)
            "class_as_base": sum(f == b for f, b in zip(theirs, self.base_class or theirs)) / len(theirs),
        }


def train_one(out: Path, variant: str, seed: int, s: dict, args, class_dir: Path):
    from dreambooth_moslora.training import parse_args, train
    from toyworld.recipe import ASSETS, SUBJECT_MASKS, toy_dreambooth_argv

    masked = args.masked_loss and VARIANTS[variant].masked
    argv = toy_dreambooth_argv(ASSETS / "subject", out, s["steps"], args.learning_rate, args.rank, args.lora_alpha,
                               seed, class_dir if args.with_prior_preservation else None,
                               args.text_encoder_lr if args.train_text_encoder and VARIANTS[variant].text_encoder
                               else None,
                               SUBJECT_MASKS if masked else None,
                               num_class_images=args.num_class_images, prior_loss_weight=args.prior_loss_weight)
    train(parse_args([*argv, *variant_flags(variant, args), "--checkpointing_steps", str(s["eval_every"]),
                      "--output_formats", "native"]))


def adapter_files(out: Path, steps: int) -> dict[int, Path]:
    from dreambooth_moslora.formats import NATIVE_FILE

    found = {int(p.parent.name.split("-")[1]): p for p in out.glob(f"checkpoint-*/{NATIVE_FILE}")}
    found[steps] = out / NATIVE_FILE
    return dict(sorted(found.items()))


def read_loss(out: Path) -> list[float]:
    return [row.loss for row in read_loss_log(out / "loss.csv")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results: dict, base: dict, path: Path) -> None:
    """Subject fidelity and class kept against steps, one line per variant (mean over seeds); PIL only."""
    from PIL import Image, ImageDraw

    panels = [("subject fidelity", "subject"), ("class kept (grey line: base model)", "class_kept")]
    w, h, pad = 360, 240, 40
    image = Image.new("RGB", (len(panels) * (w + pad) + pad, h + 2 * pad + 20 * len(results)), "white")
    draw = ImageDraw.Draw(image)
    steps = sorted({int(k) for r in results.values() for k in r["by_step"]})
    x_of = lambda step: pad + (step - 0) / max(steps) * (w - 10)  # noqa: E731
    for p, (title, key) in enumerate(panels):
        left = p * (w + pad)
        y_of = lambda v: pad + (1 - v) * h  # noqa: E731
        draw.rectangle((left + pad, pad, left + pad + w - 10, pad + h), outline="black")
        draw.text((left + pad, 10), title, fill="black")
        for v in (0, 0.5, 1):
            draw.text((left + 8, y_of(v) - 6), f"{v:.1f}", fill="black")
        for step in steps:
            draw.text((left + x_of(step) - 8, pad + h + 4), str(step), fill="black")
        if key == "class_kept":
            draw.line([(left + pad, y_of(base[key])), (left + pad + w - 10, y_of(base[key]))], fill=(150, 150, 150),
                      width=1)
        for name, r in results.items():
            points = [(left + x_of(0), y_of(base[key]))] + [
                (left + x_of(int(step)), y_of(statistics.fmean(m[key] for m in per_seed)))
                for step, per_seed in sorted(r["by_step"].items(), key=lambda kv: int(kv[0]))
            ]
            draw.line(points, fill=VARIANTS[name].colour, width=2)
    for i, name in enumerate(results):
        y = h + 2 * pad + 20 * i
        draw.line([(pad, y + 6), (pad + 30, y + 6)], fill=VARIANTS[name].colour, width=3)
        draw.text((pad + 40, y), name, fill="black")
    save_image(image, path)


def print_paired(results: dict, steps: int) -> dict:
    """Each variant minus plain LoRA, seed by seed (same data, noise and evaluation), with a 95% interval."""
    if "lora" not in results:
        return {}
    reference = results["lora"]["by_step"][steps]
    print(f"\npaired by seed, variant − lora after {steps} steps: mean difference [95% confidence interval]")
    paired = {}
    for variant, r in results.items():
        if variant == "lora":
            continue
        final = r["by_step"][steps]
        paired[variant] = {m: paired_difference([x[m] for x in final], [x[m] for x in reference])
                           for m in FINAL_METRICS}
        print(f"{variant:19s} " + "  ".join(f"{m} {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                                            for m, (d, lo, hi) in paired[variant].items()))
    return paired


def options(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 40 steps, few images (for the test)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated, from " + ", ".join(VARIANTS) + " (default: the first four); 'where' "
                             "for " + ", ".join(WHERE_THE_WORD_IS_LEARNED))
    parser.add_argument("--learning_rate", type=float, default=TOY_TRAINING["learning_rate"])
    parser.add_argument("--rank", type=int, default=TOY_TRAINING["rank"])
    parser.add_argument("--lora_alpha", type=float, default=TOY_TRAINING["lora_alpha"])
    parser.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=True,
                        help="train on the base model's images of 'a circle' too (the demo's setting)")
    parser.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="adapters on both text encoders too (the demo's setting)")
    parser.add_argument("--text_encoder_lr", type=float, default=TOY_TRAINING["text_encoder_lr"])
    parser.add_argument("--prior_loss_weight", type=float, default=1.0,
                        help="the class images' share of the loss (the trainer's)")
    parser.add_argument("--num_class_images", type=int, default=NUM_CLASS_IMAGES,
                        help="class images the base model draws for prior preservation (the demo's: %(default)s)")
    parser.add_argument("--masked_loss", action=argparse.BooleanOptionalAction, default=TOY_MASKED_LOSS,
                        help="the loss on the subject's pixels only, assets/subject_masks (the demo's setting)")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "quality")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.replace("where", ",".join(WHERE_THE_WORD_IS_LEARNED)).split(",")
                     if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def train_and_measure(args, s: dict, pipe, classifier, evaluation: Evaluation) -> dict:
    """Every variant × seed: train, then measure the adapter at each checkpoint; variant → by_step, loss curves."""
    from dreambooth_moslora.inference import load_adapter, unload_adapter

    out_root, results = args.output_dir, {}
    for variant in args.variants:
        results[variant] = {"by_step": {}, "loss": []}
        for seed in range(s["seeds"]):
            out = out_root / variant / f"seed{seed}"
            shutil.rmtree(out, ignore_errors=True)  # an earlier run's checkpoints and loss.csv would mix in
            run_started = time.perf_counter()
            train_one(out, variant, seed, s, args, out_root / "class_images")
            for step, path in adapter_files(out, s["steps"]).items():
                adapter = load_adapter(pipe, path)  # with pivotal tuning's tokens, which "sks" is rewritten as
                m = evaluation.measure(pipe, classifier, final=step == s["steps"], rewrite=adapter.rewrite)
                unload_adapter(pipe)
                results[variant]["by_step"].setdefault(step, []).append(m)
            results[variant]["loss"].append(read_loss(out))
            last = results[variant]["by_step"][s["steps"]][-1]
            print(f"{variant:19s} seed {seed}: subject {last['subject']:.2f}, prompt {last['prompt']:.2f}, "
                  f"class kept {last['class_kept']:.2f}, as base {last['class_as_base']:.2f}, "
                  f"class TV {last['class_tv']:.2f} "
                  f"({time.perf_counter() - run_started:.0f} s)", flush=True)
    return results


def print_summary(results: dict, base: dict, s: dict, counts: tuple[int, int]) -> dict:
    """Mean ± std over seeds of each measure after the last step, and of the final loss; variant → summary."""
    print(f"\nafter {s['steps']} steps, mean ± std over {s['seeds']} seed(s); {counts[0]} subject and "
          f"{counts[1]} class images per run, classified by the toy world's attribute classifier")
    print(f"{'variant':19s} " + "  ".join(f"{m:>13s}" for m in FINAL_METRICS) + f"  {'final loss':>13s}")
    print(f"{'base model':19s} " + "  ".join(f"{base[m]:13.2f}" for m in FINAL_METRICS))
    summary = {}
    for variant, r in results.items():
        final = r["by_step"][s["steps"]]
        summary[variant] = {m: mean_std([x[m] for x in final]) for m in FINAL_METRICS}
        tail = max(1, s["steps"] // 10)  # the mean of the last tenth of each curve: single steps are noisy
        summary[variant]["final_loss"] = mean_std([statistics.fmean(curve[-tail:]) for curve in r["loss"]])
        print(f"{variant:19s} " + "  ".join(f"{summary[variant][m][0]:6.2f} ± {summary[variant][m][1]:4.2f}"
                                            for m in (*FINAL_METRICS, "final_loss")))
    return summary


def main(argv=None) -> int:
    args = options(argv)
    s = settings(args.quick)
    if args.seeds:
        s["seeds"] = args.seeds

    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # twenty progress bars would bury the table
    from dreambooth_moslora.runtime import quiet_libraries

    quiet_libraries()
    from diffusers import StableDiffusionXLPipeline

    from toyworld.classifier import load_classifier
    from toyworld.recipe import CLASSIFIER_FILE, WORLD_MODEL_DIR, write_class_images

    started = time.perf_counter()
    out_root = args.output_dir
    out_root.mkdir(parents=True, exist_ok=True)
    classifier, _ = load_classifier(CLASSIFIER_FILE)
    pipe = StableDiffusionXLPipeline.from_pretrained(WORLD_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    if args.with_prior_preservation:  # the demo's captioned class images, made once for every run
        write_class_images(pipe, out_root / "class_images", count=args.num_class_images)
    evaluation = Evaluation(*prompts(s["images_per_prompt"]), sample_steps=s["sample_steps"],
                            variety_seeds=s["variety_seeds"])
    base = evaluation.measure_base(pipe, classifier)
    print(f"base model: subject {base['subject']:.2f}, prompt {base['prompt']:.2f}, "
          f"class kept {base['class_kept']:.2f}", flush=True)

    results = train_and_measure(args, s, pipe, classifier, evaluation)
    summary = print_summary(results, base, s, (len(evaluation.subject_prompts), len(evaluation.class_prompts)))
    paired = print_paired(results, s["steps"])
    seconds = time.perf_counter() - started
    print(f"\n{seconds / 60:.1f} minutes")
    record = {"settings": {**s, "learning_rate": args.learning_rate, "rank": args.rank, "lora_alpha": args.lora_alpha,
                           "with_prior_preservation": args.with_prior_preservation, "masked_loss": args.masked_loss,
                           "num_class_images": args.num_class_images if args.with_prior_preservation else 0,
                           "prior_loss_weight": args.prior_loss_weight if args.with_prior_preservation else None,
                           "text_encoder_lr": args.text_encoder_lr if args.train_text_encoder else None},
              "base": base, "summary": summary, "paired_vs_lora": paired, "results": results,
              "seconds": round(seconds, 1)}
    write_text(out_root / "results.json", json.dumps(record, indent=1))
    plot(results, base, out_root / "quality.png")
    print(f"results: {out_root / 'results.json'}; plot: {out_root / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
