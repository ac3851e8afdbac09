"""The prepared GPU run: what the mixer costs at full size, and the trainer's memory and speed on SDXL at 1024 px.

    bash benchmarks/gpu_suite.sh              # on the GPU machine (installs the carried wheels, then this)
    python benchmarks/gpu_suite.py --smoke    # the same code path on a CPU, tiny model, a few minutes

1. Builds SDXL base's real architecture with random weights (toyworld.tiny_sdxl.save_full_size_sdxl):
   no hub download, the real layer names, sizes and memory.
2. The adapter's cost (benchmarks/adapter_overhead.py --full-size, bf16, 1024 px, gradient checkpointing): PEFT's
   LoRA against MoSLoRA with the mixer learned, frozen and none, interleaved rounds, op counts per step.
3. The trainer itself (train_dreambooth.py's code, each run a fresh process): 1024 px, batch 1, gradient
   checkpointing, cached latents; fp16 and bf16; UNet adapters alone and with text-encoder adapters;
   8-bit Adam where bitsandbytes is installed; MoSLoRA (learned mixer) against --mixer none. Peak GPU
   memory (torch.cuda.max_memory_allocated, the whole process) and steps/s over the steps after the
   first (from loss.csv's per-step times).

It prints one table and writes results.json; the README records the figures with the card named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dreambooth_moslora.training.loop import read_loss_log, steps_per_second

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import json, sys, torch
from dreambooth_moslora.runtime import quiet_libraries
from dreambooth_moslora.training import parse_args, train
quiet_libraries()
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
train(parse_args(json.loads(sys.argv[1])))
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("RESULT", json.dumps({"peak_bytes": peak}))
"""


def trainer_configs(smoke: bool, eight_bit: bool) -> list[dict]:
    """(name, options) of each trainer run: pairs that differ in the mixer alone, so their ratio is the mixer's cost."""
    precisions = ["no"] if smoke else ["fp16", "bf16"]
    configs = []
    for precision in precisions:
        for mixer in ("learned", "none"):
            configs.append(dict(precision=precision, mixer=mixer, text_encoders=False, eight_bit=False))
    last = precisions[-1]
    for mixer in ("learned", "none"):
        configs.append(dict(precision=last, mixer=mixer, text_encoders=True, eight_bit=False))
    if eight_bit:
        for mixer in ("learned", "none"):
            configs.append(dict(precision=last, mixer=mixer, text_encoders=False, eight_bit=True))
    return configs


def train_argv(model: Path, subject: Path, out: Path, config: dict, resolution: int, steps: int) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(subject), "--instance_prompt", "a sks circle",
        "--resolution", str(resolution), "--train_batch_size", "1", "--gradient_checkpointing", "--cache_latents",
        "--mixed_precision", config["precision"], "--max_train_steps", str(steps), "--rank", "4", "--mixer", config["mixer"],
        "--output_formats", "native", "--checkpointing_steps", "100000", "--report_to", "none", "--output_dir", str(out),
    ]  # fmt: skip
    if config["text_encoders"]:
        argv.append("--train_text_encoder")
    if config["eight_bit"]:
        argv.append("--use_8bit_adam")
    return argv


def run_trainer(argv: list[str], out: Path, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(argv)], capture_output=True, text=True, env=env,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at the time budget after {timeout:.0f} s", "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return {"error": lines[-1][:300] if lines else f"exit code {done.returncode}", "seconds": seconds}
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # after the first two steps (allocation, autotuning)
    speed = steps_per_second(read_loss_log(out / "loss.csv"), skip=2)
    return {**result, "steps_per_second": speed, "seconds": seconds}


def adapter_overhead(smoke: bool, timeout: float) -> str:
    # with gradient checkpointing, as the trainer runs below: the interleaved, paired comparison of their setting
    argv = ["--device", "cpu", "--rounds", "2"] if smoke else ["--device", "cuda", "--full-size", "--dtype", "bf16", "--rounds", "6"]
    argv.append("--gradient-checkpointing")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_overhead.py"), *argv], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"adapter_overhead.py stopped at the time budget after {timeout:.0f} s"
    return (done.stdout if done.returncode == 0 else f"adapter_overhead.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}").strip()


def table(results: list[tuple[dict, dict]]) -> str:
    lines = ["| precision | adapters | optimizer | mixer | peak GPU memory | steps/s | time vs --mixer none |", "|---|---|---|---|---|---|---|"]
    speed = {(c["precision"], c["text_encoders"], c["eight_bit"], c["mixer"]): r.get("steps_per_second") for c, r in results}
    for c, r in results:
        where = "UNet + text encoders" if c["text_encoders"] else "UNet"
        optimizer = "8-bit AdamW" if c["eight_bit"] else "AdamW"
        if "error" in r:
            why = r["error"] if r["error"].startswith("skipped") else f"failed: {r['error']}"
            lines.append(f"| {c['precision']} | {where} | {optimizer} | {c['mixer']} | {why} | | |")
            continue
        memory = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else "n/a (CPU)"
        sps = r.get("steps_per_second")
        base = speed.get((c["precision"], c["text_encoders"], c["eight_bit"], "none"))
        ratio = f"{base / sps:.3f}×" if sps and base and c["mixer"] != "none" else ""
        lines.append(f"| {c['precision']} | {where} | {optimizer} | {c['mixer']} | {memory} | {sps:.3f} | {ratio} |"
                     if sps else f"| {c['precision']} | {where} | {optimizer} | {c['mixer']} | {memory} | ? | |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a CPU check of the same code path: tiny model, 64 px, 4 steps")
    parser.add_argument("--model_dir", type=Path, default=Path("/tmp/full-size-sdxl"))
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "gpu-suite")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip_overhead", action="store_true")
    parser.add_argument("--time_budget", type=float, default=480,
                        help="seconds for the whole suite: a part that would start or run past it is skipped or stopped, "
                             "so the table always prints (a device call has a hard limit)")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    from dreambooth_moslora.runtime import has_module, quiet_libraries
    from toyworld.tiny_sdxl import save_full_size_sdxl, save_tiny_sdxl
    from toyworld.world import write_subject

    quiet_libraries()
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    resolution, steps = (64, 4) if args.smoke else (1024, args.steps)
    model = args.model_dir.with_name(args.model_dir.name + "-tiny") if args.smoke else args.model_dir
    if not (model / "model_index.json").is_file():
        print(f"building {'the tiny' if args.smoke else 'the full-size'} SDXL with random weights in {model} …", flush=True)
        if args.smoke:
            save_tiny_sdxl(model)
        elif torch.cuda.is_available():
            try:
                save_full_size_sdxl(model, device="cuda")
            except Exception as error:  # a one-shot device call: a slower build beats no figures
                print(f"building on the GPU failed ({error}); building on the CPU", flush=True)
                save_full_size_sdxl(model)
        else:
            save_full_size_sdxl(model)
    build_seconds = time.perf_counter() - started
    subject = args.output_dir / "subject"
    write_subject(subject, count=4, size=resolution)

    def left() -> float:
        return args.time_budget - (time.perf_counter() - started)

    # the overhead table gets at most a third of what is left; the trainer runs the rest, in order of importance
    overhead = "" if args.skip_overhead else adapter_overhead(args.smoke, timeout=max(left() / 3, 1))
    print(overhead, flush=True)
    results, last_seconds = [], 0.0
    for i, config in enumerate(trainer_configs(args.smoke, eight_bit=has_module("bitsandbytes") and not args.smoke)):
        if left() < 0.8 * last_seconds or left() < 1:
            result = {"error": f"skipped: {max(left(), 0):.0f} s of the time budget left"}
        else:
            out = args.output_dir / f"run{i}"
            result = run_trainer(train_argv(model, subject, out, config, resolution, steps), out, timeout=left())
            last_seconds = result["seconds"]
        results.append((config, result))
        print(f"  {config} → {result}", flush=True)

    report = table(results)
    print(f"\n## GPU suite on {device} ({resolution} px, batch 1, gradient checkpointing, cached latents, rank 4, {steps} steps; "
          f"torch {torch.__version__}; model built in {build_seconds:.0f} s; {time.perf_counter() - started:.0f} s in all)\n")  # fmt: skip
    print(overhead + "\n\n" + report)
    (args.output_dir / "results.json").write_text(json.dumps({"device": device, "overhead": overhead, "results": [
        {"config": c, "result": r} for c, r in results], "seconds": time.perf_counter() - started}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
