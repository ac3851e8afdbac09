"""The trainer on SDXL base's real architecture (random weights) on this CPU: real layer names, sizes, memory.

    python benchmarks/full_size_cpu.py                      # builds outputs/full-size-sdxl once (~7 GB on disk)

Runs train_dreambooth.py in a fresh process on the full-size model at 64 px with prior preservation
(2 class images drawn by the model), MoSLoRA on the UNet and both text encoders, 4 steps; then, in
another process, reloads the adapter the ways users do (this package's loader for the native file,
stock diffusers' load_lora_weights for the diffusers and kohya files) and compares the UNet prediction
and text conditioning with the trained adapter's. Reports wall times, each process's peak RSS, the
files' key counts and the largest differences. With --single_file it then writes the model as one fp16
checkpoint in the original SDXL layout (as community bases ship) and trains 2 steps from that file, its peak RSS
beside the folder's. Needs about 18 GB of RAM: run it alone, never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import json, resource, sys, time
from dreambooth_moslora.runtime import quiet_libraries
from dreambooth_moslora.training import parse_args, train
quiet_libraries()
start = time.perf_counter()
train(parse_args(json.loads(sys.argv[1])))
peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT", json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib}))
"""

WRITE_FILE = """
import json, resource, sys, time, torch
from diffusers import StableDiffusionXLPipeline
from dreambooth_moslora.runtime import quiet_libraries
from dreambooth_moslora.single_file import save_single_file
quiet_libraries()
start = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
parts = {part: getattr(pipe, part) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
save_single_file(parts, sys.argv[2], dtype=torch.float16)
peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT", json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib}))
"""

RELOAD = """
import json, resource, sys
import torch
from diffusers import StableDiffusionXLPipeline
from dreambooth_moslora import load_adapter, unload_adapter
from dreambooth_moslora.runtime import quiet_libraries
from dreambooth_moslora.safe_files import read_header
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
quiet_libraries()
model, out = sys.argv[1], sys.argv[2]
pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32)
check = lambda: sdxl_forward(pipe, "a sks circle", size=64)
load_adapter(pipe, out + "/moslora_adapter.safetensors")
trained = check()
unload_adapter(pipe)
report = {}
for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
    pipe.load_lora_weights(out, weight_name=name)
    report[name] = {"keys": len(read_header(out + "/" + name)[0]), "max_abs_diff": max_abs_diff(trained, check())}
    pipe.unload_lora_weights()
report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT", json.dumps(report))
"""


def run(code: str, *argv: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, default=ROOT / "outputs" / "full-size-sdxl")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "full-size-run")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--single_file", action="store_true", help="also train 2 steps from the model as one file")
    args = parser.parse_args(argv)

    from toyworld.tiny_sdxl import save_full_size_sdxl
    from toyworld.world import write_subject

    if not (args.model_dir / "model_index.json").is_file():
        started = time.perf_counter()
        save_full_size_sdxl(args.model_dir)
        print(f"built the full-size SDXL (random weights) in {time.perf_counter() - started:.0f} s: {args.model_dir}")
    subject = args.output_dir / "subject"
    write_subject(subject, size=64)
    adapter = args.output_dir / "adapter"
    train_argv = [
        "--pretrained_model_name_or_path", str(args.model_dir), "--instance_data_dir", str(subject),
        "--instance_prompt", "a sks circle", "--resolution", "64", "--train_batch_size", "1",
        "--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images", "2",
        "--class_inference_steps", "2", "--class_data_dir", str(args.output_dir / "class"), "--train_text_encoder",
        "--max_train_steps", str(args.steps), "--learning_rate", "1e-4", "--report_to", "none",
        "--output_dir", str(adapter),
    ]
    trained = run(TRAIN, json.dumps(train_argv))
    print(f"trained {args.steps} steps at 64 px in {trained['seconds']:.0f} s, peak RSS "
          f"{trained['peak_rss_gib']:.1f} GiB")
    reload = run(RELOAD, str(args.model_dir), str(adapter))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        r = reload[name]
        print(f"stock load_lora_weights({name}): {r['keys']:,d} keys, max |difference| {r['max_abs_diff']:.2e}")
    print(f"reload process peak RSS {reload['peak_rss_gib']:.1f} GiB")
    if args.single_file:
        single_file_run(args, train_argv, trained)
    return 0


def single_file_run(args, folder_argv: list[str], folder: dict) -> None:
    """The same model as one fp16 checkpoint file: written, then trained from for 2 steps (--base_config the folder)."""
    checkpoint = args.output_dir / "full-size-sdxl.safetensors"
    if not checkpoint.is_file():
        written = run(WRITE_FILE, str(args.model_dir), str(checkpoint))
        print(f"wrote {checkpoint.stat().st_size / 2**30:.2f} GiB in {written['seconds']:.0f} s "
              f"(peak RSS {written['peak_rss_gib']:.1f} GiB)")
    argv = list(folder_argv)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(checkpoint)
    argv[argv.index("--max_train_steps") + 1] = "2"
    argv[argv.index("--output_dir") + 1] = str(args.output_dir / "adapter-from-file")
    argv += ["--base_config", str(args.model_dir)]
    trained = run(TRAIN, json.dumps(argv))
    ratio = trained["peak_rss_gib"] / folder["peak_rss_gib"]
    print(f"from the single file: trained 2 steps in {trained['seconds']:.0f} s, peak RSS "
          f"{trained['peak_rss_gib']:.1f} GiB ({ratio:.2f}x the folder run's {folder['peak_rss_gib']:.1f})")


if __name__ == "__main__":
    sys.exit(main())
