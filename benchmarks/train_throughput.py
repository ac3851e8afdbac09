"""How fast the trainer trains: steps/s, wall time, peak memory and where a step's time goes.

    python benchmarks/train_throughput.py            # the fixed tiny job, CPU
    python benchmarks/train_throughput.py --steps 30 # shorter

The job: the tiny SDXL at 64 px, prior preservation (8 class images), rank 4, batch 2, 100 steps,
run through train_dreambooth.py's own code in a fresh process per run (so peak RSS is the run's
own), once with the MoSLoRA mixer and once with --mixer none, alternating. Then a breakdown of one
step into its parts (data, VAE, text encoders, UNet forward, backward, optimizer) timed on the same
components over the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def job_argv(model: Path, subject: Path, class_dir: Path, out: Path, steps: int, mixer: str, extra=()) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(subject),
        "--instance_prompt", "a sks circle", "--caption_extension", ".txt",
        "--with_prior_preservation", "--class_prompt", "a circle", "--class_data_dir", str(class_dir),
        "--num_class_images", "8", "--class_inference_steps", "10", "--resolution", "64", "--train_batch_size", "2",
        "--max_train_steps", str(steps), "--rank", "4", "--mixer", mixer, "--learning_rate", "1e-4",
        "--checkpointing_steps", str(10**9), "--report_to", "none", "--output_formats", "native",
        "--output_dir", str(out), *extra,
    ]


RUNNER = """
import json, resource, sys, time
from dreambooth_moslora.runtime import quiet_libraries
from dreambooth_moslora.training import parse_args, train
quiet_libraries()
args = parse_args(json.loads(sys.argv[1]))
start = time.perf_counter()
train(args)
wall = time.perf_counter() - start
print("RESULT", json.dumps({"wall": wall, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_job(argv: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argv)], env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"the training run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def breakdown(model: Path, subject: Path, class_dir: Path, steps: int, mixer: str) -> dict:
    """Times each part of a training step, on the trainer's own components."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_moslora import AdapterConfig, inject_components
    from dreambooth_moslora.sdxl import encode_prompts, square_time_ids, tokenize, unet_prediction
    from dreambooth_moslora.training.data import DreamBoothDataset, collate, epoch_batches, scan_images
    from dreambooth_moslora.training.models import make_optimizer

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    tes = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
           CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")]
    toks = [AutoTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae, *tes):
        m.requires_grad_(False)
    params = inject_components({"unet": unet}, AdapterConfig(rank=4, mixer=mixer))["unet"]
    optimizer = make_optimizer("adamw", [{"params": params, "lr": 1e-4}])
    instance, _ = scan_images(subject)
    classes, _ = scan_images(class_dir)
    ds = DreamBoothDataset(instance, "a sks circle", 64, classes[:8], "a circle", ".txt")
    batches = epoch_batches(ds, 2, 0, 0)
    parts = {k: [] for k in ("data", "vae", "text encoders", "unet forward", "backward", "optimizer")}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        parts[name].append(time.perf_counter() - start)
        return result

    for step in range(steps):
        indices = batches[step % len(batches)]
        batch = timed("data", lambda: collate([ds[(0, i)] for i in indices]))
        with torch.no_grad():
            latents = timed("vae", lambda: vae.encode(batch["pixels"]).latent_dist.sample() * vae.config.scaling_factor)
            embeds, pooled = timed("text encoders",
                                   lambda: encode_prompts(tes, tokenize(toks, batch["captions"]), "cpu"))
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        time_ids = square_time_ids(64, latents.shape[0])
        pred = timed("unet forward",
                     lambda: unet_prediction(unet, sched.add_noise(latents, noise, t), t, embeds, pooled, time_ids))
        loss = torch.nn.functional.mse_loss(pred, noise)
        timed("backward", loss.backward)
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {k: statistics.median(v[2:]) * 1e3 for k, v in parts.items()}  # ms, after two warm-up steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
    args = parser.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from dreambooth_moslora.runtime import quiet_libraries
    from toyworld.tiny_sdxl import save_tiny_sdxl
    from toyworld.world import write_subject

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_sdxl(tmp / "random-sdxl")
        subject = tmp / "subject"
        write_subject(subject, size=64)
        class_dir = tmp / "class"
        # one short run first: it generates the class images every later run shares, and warms the disk cache
        run_job(job_argv(model, subject, class_dir, tmp / "warm", 2, "learned"))

        results = {"learned": [], "none": []}
        for r in range(args.repeats):
            for mixer in ("learned", "none") if r % 2 == 0 else ("none", "learned"):
                short = run_job(job_argv(model, subject, class_dir, tmp / f"s{mixer}{r}", 5, mixer))
                full = run_job(job_argv(model, subject, class_dir, tmp / f"f{mixer}{r}", args.steps, mixer))
                # steps/s of the loop alone: the difference of a long and a short run cancels start-up
                full["steps_per_s"] = (args.steps - 5) / max(full["wall"] - short["wall"], 1e-9)
                results[mixer].append(full)

        print(f"tiny job: 64 px, prior preservation, rank 4, batch 2 (+2 class images), {args.steps} steps, CPU")
        print(f"{'variant':16s} {'steps/s':>8s} {'wall s':>7s} {'peak RSS MiB':>13s}")
        summary = {}
        for mixer, runs in results.items():
            sps = statistics.median(r["steps_per_s"] for r in runs)
            wall = statistics.median(r["wall"] for r in runs)
            rss = max(r["maxrss_mib"] for r in runs)
            summary[mixer] = sps
            print(f"{'mixer=' + mixer:16s} {sps:8.2f} {wall:7.1f} {rss:13.0f}")
        print(f"MoSLoRA / plain LoRA steps/s: {summary['learned'] / summary['none']:.3f}")
        print("for reference: the goal names ~6 it/s for diffusers' "
              "train_dreambooth_lora_sdxl.py on a tiny job on these "
              "machines; that script is not run here, and its tiny model is not this one, so no ratio is claimed")

        print("\nwhere a step's time goes (median ms over the steps, same components; the trainer itself encodes each")
        print("prompt once while the text encoders are frozen, and with --cache_latents each image once):")
        rows = {mixer: breakdown(model, subject, class_dir, 20, mixer) for mixer in ("learned", "none")}
        print(f"{'part':16s} {'learned':>9s} {'none':>9s}")
        for part in rows["learned"]:
            print(f"{part:16s} {rows['learned'][part]:9.1f} {rows['none'][part]:9.1f}")
        print(f"{'total':16s} {sum(rows['learned'].values()):9.1f} {sum(rows['none'].values()):9.1f}")


if __name__ == "__main__":
    main()
