"""The prepared GPU run: the trainer's speed and memory on the full-size SDXL at 1024 px, against diffusers' script.

    bash benchmarks/gpu_suite.sh              # on the GPU machine (installs the carried wheels, then this)
    python benchmarks/gpu_suite.py --smoke    # the same code path on a CPU, tiny model, 64 px

It builds SDXL base's real architecture with random weights (no hub), then runs, each in its own process and each
timed the same way (benchmarks/vs_diffusers.py: an optimizer-step hook after a synchronize; steps/s after the
first two steps; peak = torch.cuda.max_memory_allocated), in order of importance, within --time_budget:

1. diffusers' train_dreambooth_lora_sdxl.py and ours at the same settings (1024 px, batch 1, rank 4, bf16, no
   checkpointing, latents not cached, no prior preservation): vs_diffusers.
2. ours at batch 1 with cached latents (a --profile_steps 3 window: kernels, launches, syncs, GPU busy share),
   and with gradient checkpointing;
3. the low-memory setting: --memory_budget_gib 7.5, batch 1, UNet adapters: its peak;
4. --mixer none against the learned mixer, alternating (learned, none, …, none, learned): mixer_time_ratio;
5. --torch_compile in its reduce-overhead (CUDA graphs) and default modes, batch 1, between them
6. batches 8, 16 and 4: images/s and MFU (images/s × 13.5 TFLOP per 1024-px image ÷ the card's dense bf16 peak).

It prints a table and writes gpu-suite-<card>-<date>.json (its "summary" holds the figures the GPU issue names)
into --output_dir and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

from vs_diffusers import REFERENCE, ROOT, run

TFLOP_PER_IMAGE = 13.5  # a LoRA training step on one 1024-px image: UNet forward 6.76 TFLOP (FlopCounterMode), ×2
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}


def card_peak(card: str) -> float | None:
    return next((tflops for name, tflops in DENSE_BF16_TFLOPS.items() if name in card), None)


class Suite:
    def __init__(self, a, model: Path, subject: Path):
        self.a, self.model, self.subject = a, model, subject
        self.started = time.perf_counter()
        self.results: dict[str, dict] = {}
        self.last_seconds = 0.0

    def left(self) -> float:
        return self.a.time_budget - (time.perf_counter() - self.started)

    def ours(self, name: str, *extra: str, batch: int = 1, steps: int | None = None, skip: int = 2) -> dict:
        argv = ["--pretrained_model_name_or_path", str(self.model), "--instance_data_dir", str(self.subject),
                "--instance_prompt", "a sks circle", "--resolution", str(self.a.resolution), "--train_batch_size",
                str(batch), "--max_train_steps", str(steps or self.a.steps), "--rank", "4", "--learning_rate", "1e-4",
                "--report_to", "none", "--output_formats", "native", "--checkpointing_steps", str(10**6),
                "--output_dir", str(self.a.work_dir / name.replace(" ", "-")), *self.precision(), *extra]
        return self.timed(name, ROOT / "train_dreambooth.py", argv, batch, skip)

    def diffusers(self, name: str) -> dict:
        argv = ["--pretrained_model_name_or_path", str(self.model), "--instance_data_dir", str(self.subject),
                "--instance_prompt", "a sks circle", "--resolution", str(self.a.resolution), "--train_batch_size", "1",
                "--max_train_steps", str(self.a.steps), "--rank", "4", "--learning_rate", "1e-4", "--seed", "0",
                "--checkpointing_steps", str(10**6), "--report_to", "tensorboard",
                "--output_dir", str(self.a.work_dir / "diffusers"), *self.precision()]
        return self.timed(name, self.a.reference, argv, 1)

    def precision(self) -> list[str]:
        return [] if self.a.smoke else ["--mixed_precision", "bf16"]

    def timed(self, name: str, script: Path, argv: list[str], batch: int, skip: int = 2) -> dict:
        if self.left() < max(0.8 * self.last_seconds, 1):
            result = {"error": f"skipped: {max(self.left(), 0):.0f} s of the time budget left"}
        else:
            began = time.perf_counter()
            result = run(script, argv, timeout=self.left(), skip=skip)
            self.last_seconds = result["seconds"] = time.perf_counter() - began
            if result.get("steps_per_second"):
                result["images_per_second"] = result["steps_per_second"] * batch
        self.results[name] = result
        print(f"  {name}: { {k: v for k, v in result.items() if k != 'profile'} }", flush=True)
        return result


def run_all(s: Suite) -> None:
    """In order of importance: what is skipped at the time budget matters least."""
    s.diffusers("diffusers")
    s.ours("ours")
    # profiled steps 3-5 are not timed: steps/s counts from step 7 (step 6 writes the trace)
    s.ours("bs1", "--cache_latents", "--profile_steps", "3", steps=s.a.steps + 4, skip=6)
    profile = s.a.work_dir / "bs1" / "profile.json"
    if profile.is_file():
        s.results["bs1"]["profile"] = json.loads(profile.read_text())
    s.ours("bs1 ckpt", "--cache_latents", "--gradient_checkpointing")
    s.ours("low memory", "--cache_latents", "--memory_budget_gib", "7.5")
    s.ours("mixer none", "--cache_latents", "--mixer", "none")
    # compilation and CUDA-graph recording fall in the first steps: steps/s counts from step 5
    compiled = dict(steps=s.a.steps + 2, skip=4)
    s.ours("compiled reduce-overhead", "--cache_latents", "--torch_compile", "--torch_compile_mode",
           "reduce-overhead", **compiled)
    for batch in (8, 16):
        s.ours(f"batch {batch}", "--cache_latents", batch=batch)
    s.ours("compiled", "--cache_latents", "--torch_compile", **compiled)
    s.ours("mixer none 2", "--cache_latents", "--mixer", "none")
    s.ours("mixer learned 2", "--cache_latents")
    s.ours("batch 4", "--cache_latents", batch=4)


def planned_peaks(a, model: Path, results: dict) -> dict:
    """The memory planner's peak for the runs whose settings it models, beside the measured one (GiB): what the next
    recalibration of memory_plan.Figures starts from."""
    from dreambooth_moslora import AdapterConfig
    from dreambooth_moslora.training.memory_plan import Job, Setting, parameter_counts, peak_gib

    counts = parameter_counts(str(model), AdapterConfig(rank=4), train_text_encoder=False)
    job = Job(counts["unet"], counts["text_encoders"], counts["vae"], counts["adapter"], a.resolution,
              "fp32" if a.smoke else "bf16", cache_latents=True)
    runs = {"bs1": Setting(False, "auto", 1), "bs1 ckpt": Setting(True, "auto", 1),
            **{f"batch {b}": Setting(False, "auto", b) for b in (4, 8, 16)}}
    return {name: {"planned_gib": round(peak_gib(job, setting), 3),
                   "measured_gib": round(results[name]["peak_bytes"] / 2**30, 3)
                   if results.get(name, {}).get("peak_bytes") else None} for name, setting in runs.items()}


def speed(results: dict, name: str, key: str = "steps_per_second") -> float | None:
    return results.get(name, {}).get(key)


def summary(results: dict, card: str) -> dict:
    best = max((r.get("images_per_second") or 0, name) for name, r in results.items() if name != "diffusers")
    peak = card_peak(card)
    learned = [v for v in (speed(results, "bs1"), speed(results, "mixer learned 2")) if v]
    none = [v for v in (speed(results, "mixer none"), speed(results, "mixer none 2")) if v]
    low = results.get("low memory", {}).get("peak_bytes")
    ours, theirs = speed(results, "ours"), speed(results, "diffusers")
    return {
        "card": card, "date": datetime.date.today().isoformat(),
        "bs1_steps_per_second": speed(results, "bs1"),
        "bs1_ckpt_steps_per_second": speed(results, "bs1 ckpt"),
        "best_images_per_second": best[0] or None, "best_run": best[1],
        "best_mfu": best[0] * TFLOP_PER_IMAGE / peak if peak and best[0] else None,
        "dense_bf16_tflops": peak, "tflop_per_image": TFLOP_PER_IMAGE,
        "low_memory_peak_gib": low / 2**30 if low else None,
        "vs_diffusers": ours / theirs if ours and theirs else None,
        # time per step, learned over none: the pooled steps/s of the alternating runs, inverted
        "mixer_time_ratio": statistics.mean(none) / statistics.mean(learned) if learned and none else None,
    }


def table(results: dict) -> str:
    lines = ["| run | steps/s | images/s | peak GPU memory |", "|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | |")
            continue
        memory = (f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes")
                  else f"RSS {r['rss_bytes'] / 2**30:.2f} GiB")
        sps, ips = r.get("steps_per_second"), r.get("images_per_second")
        lines.append(f"| {name} | {sps or 0:.3f} | {ips or 0:.2f} | {memory} |")
    return "\n".join(lines)


def build_model(a) -> Path:
    import torch

    from toyworld.tiny_sdxl import save_full_size_sdxl, save_tiny_sdxl

    model = a.model_dir.with_name(a.model_dir.name + "-tiny") if a.smoke else a.model_dir
    if (model / "model_index.json").is_file():
        return model
    print(f"building {'the tiny' if a.smoke else 'the full-size'} SDXL with random weights in {model} …", flush=True)
    if a.smoke:
        return save_tiny_sdxl(model)
    return save_full_size_sdxl(model, device="cuda" if torch.cuda.is_available() else "cpu")


def options(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a CPU check of the same code path: tiny model, 64 px")
    p.add_argument("--model_dir", type=Path, default=Path("/tmp/full-size-sdxl"))
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "gpu-suite", help="the JSON goes here")
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/gpu-suite-runs"), help="the runs' own outputs")
    p.add_argument("--reference", type=Path, default=None, help="diffusers' script (default: the carried copy, "
                   "else ../shared/reference/)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--time_budget", type=float, default=450, help="seconds for the whole suite: a run that would "
                   "start past it is skipped, one running at it is stopped, so the summary always prints")
    a = p.parse_args(argv)
    if a.reference is None:
        carried = ROOT / ".gpu-wheels" / REFERENCE.name
        a.reference = carried if carried.is_file() else REFERENCE
    a.resolution = 64 if a.smoke else 1024
    if a.smoke:
        a.steps = min(a.steps, 6)
    return a


def main(argv=None) -> int:
    a = options(argv)
    import torch

    from dreambooth_moslora.runtime import quiet_libraries
    from toyworld.world import write_subject

    quiet_libraries()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    began = time.perf_counter()
    model = build_model(a)
    print(f"model ready in {time.perf_counter() - began:.0f} s", flush=True)
    subject = a.work_dir / "subject"
    write_subject(subject, count=16, size=a.resolution)  # enough images for a batch of 16
    for caption in subject.glob("*.txt"):
        caption.unlink()
    suite = Suite(a, model, subject)
    run_all(suite)
    result = {"summary": summary(suite.results, card), "runs": suite.results, "steps": a.steps,
              "memory_plan_check": planned_peaks(a, model, suite.results),
              "resolution": a.resolution, "torch": torch.__version__, "seconds": time.perf_counter() - began}
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") if not a.smoke else "cpu-smoke"
    name = f"gpu-suite-{slug}-{result['summary']['date']}.json"
    text = json.dumps(result, indent=1)
    for folder in (a.output_dir,) if a.smoke else (a.output_dir, ROOT / "benchmarks" / "results"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    print(f"\n## GPU suite on {card} ({a.resolution} px, rank 4, {a.steps} steps per run; torch {torch.__version__}; "
          f"{result['seconds']:.0f} s in all)\n\n{table(suite.results)}\n")
    print(json.dumps(result["summary"], indent=1))
    print("memory plan vs measured:", json.dumps(result["memory_plan_check"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
