"""Pretrains a small SDXL-architecture model on the toy world, from scratch.

    python -m toyworld.pretrain --output_dir assets/toy-sdxl

Two phases, as for any latent diffusion model: the VAE alone (reconstruction + a small KL term, on
the world's scenes and as many random patterned shapes, so that it can encode what the world never
shows), then the UNet and both text encoders together on the frozen VAE's latents, with
v-prediction, min-SNR weighting, caption dropout to zero embeddings (so that classifier-free guidance
works the way SDXL's pipelines do it) and an EMA of
the weights, which is what gets saved. The result is an ordinary diffusers folder:
``StableDiffusionXLPipeline.from_pretrained`` runs it, and the trainer fine-tunes it.

Nothing depends on the total number of steps (constant learning rate after a fixed warm-up, the EMA's
decay and the data order depend on the step alone), so the snapshot a long run saves at step N is the
model a run of N steps saves. UNet and VAE weights are stored in float16 (half the size); loading
gives float32 unless asked otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_moslora.runtime import quiet_libraries, seed_from
from dreambooth_moslora.safe_files import atomic_path, save_image, write_text
from dreambooth_moslora.sdxl import encode_prompts, square_time_ids, tokenize, unet_prediction

from .tiny_sdxl import tiny_sdxl_components
from .world import SHAPES, draw_shape, render, scenes, training_caption, vocabulary

CODEC_IMAGES = 1  # the seed scheme's stream of the VAE's extra images

# ~8M-parameter UNet, two 64-wide 3-layer text encoders, a 1M-parameter VAE with 4× downsampling
# (32 px images → 8×8 latents). In float16 the whole pipeline is ~19 MB.
WORLD_MODEL = dict(block_out_channels=(32, 64, 128), text_hidden=64, text_layers=3, vae_channels=(32, 64, 64))
WARMUP_STEPS = 200


def render_all(draw, calls: list[tuple], workers: int = 1) -> torch.Tensor:
    """``draw(*call)`` for each call, as uint8 pixels N×3×H×W; identical for any number of workers."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            images = list(pool.map(draw, *zip(*calls), chunksize=512))
    else:
        images = [draw(*call) for call in calls]
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()


def render_dataset(count: int, size: int, seed: int, workers: int = 1):
    """``count`` scenes and their pixels (uint8, N×3×size×size)."""
    scene_list = scenes(count, seed=seed)
    return scene_list, render_all(render, [(s, size) for s in scene_list], workers)


def codec_image(index: int, size: int, seed: int):
    """A random patterned shape in random colours: what the VAE trains on besides the world's scenes.

    A VAE is a general image codec (SDXL's reconstructs photos of anything). Trained on the world's
    flat colours alone it cannot represent anything new, and a DreamBooth subject with a pattern
    could never be generated. The diffusion model never sees these images.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed_from(seed, CODEC_IMAGES, index))
    big = size * 4
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    image = Image.new("RGB", (big, big), colour())
    fill = Image.new("RGB", (big, big), colour())
    draw, second = ImageDraw.Draw(fill), colour()
    r = rng.uniform(0.2, 0.4) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    pattern = rng.choice(("plain", "stripes", "halves", "ring", "checks"))
    if pattern == "stripes":
        width, slope = r / rng.uniform(1.2, 4.0), rng.uniform(-1.5, 1.5) * big
        for k in range(-int(3 * big / width), int(3 * big / width), 2):
            draw.polygon([(k * width, 0), ((k + 1) * width, 0), ((k + 1) * width + slope, big),
                          (k * width + slope, big)], fill=second)
    elif pattern == "halves":
        draw.rectangle((0, cy, big, big), fill=second)
    elif pattern == "ring":
        q = r * rng.uniform(0.3, 0.7)
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=second)
    elif pattern == "checks":
        cell = r / rng.uniform(1.0, 3.0)
        for i in range(int(big / cell) + 1):
            for j in range(int(big / cell) + 1):
                if (i + j) % 2:
                    draw.rectangle((i * cell, j * cell, (i + 1) * cell, (j + 1) * cell), fill=second)
    mask = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(mask), rng.choice(SHAPES), cx, cy, r)
    image.paste(fill, (0, 0), mask)
    return image.resize((size, size), Image.LANCZOS)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, log) -> float:
    """Trains the VAE; returns the PSNR (dB) of its reconstructions over the last 50 steps."""
    device = next(vae.parameters()).device
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    recent = []
    for step in range(steps):
        batch = to_unit_range(pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)].to(device))
        dist = vae.encode(batch).latent_dist
        reconstruction = vae.decode(dist.sample()).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + 1e-3 * dist.kl().mean() / batch[0].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - 50:
            recent.append(mse.item())
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: loss {loss.item():.4f}, PSNR {psnr(mse.item()):.1f} dB")
    vae.eval().requires_grad_(False)
    return psnr(sum(recent) / len(recent))


@torch.no_grad()
def decoded_psnr(vae, pixels: torch.Tensor, means: torch.Tensor, batch_size: int = 512) -> float:
    """PSNR (dB) of ``pixels`` decoded back from their posterior means (``encode_dataset``'s)."""
    errors = []
    for start in range(0, len(pixels), batch_size):
        batch = to_unit_range(pixels[start : start + batch_size])
        decoded = vae.decode(means[start : start + batch_size]).sample
        errors.append(F.mse_loss(decoded, batch).item() * len(batch))
    return psnr(sum(errors) / len(pixels))


def psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-10))  # pixel range [-1, 1] spans 2


@torch.no_grad()
def encode_dataset(vae, pixels: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's posterior (mean, std) for every image; sampling from it each step is cheap."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(to_unit_range(pixels[start : start + batch_size].to(device))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class CaptionTokens:
    """Token ids of each distinct caption, computed once (the world has a few hundred)."""

    def __init__(self, tokenizers, device):
        self.tokenizers, self.device, self.cache = tokenizers, device, {}

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for caption, *ids in zip(missing, *(t.to(self.device) for t in tokenize(self.tokenizers, missing))):
                self.cache[caption] = ids
        return [torch.stack([self.cache[c][k] for c in captions]) for k in range(len(self.tokenizers))]


def caption_embeddings(text_encoders, token_ids: list[torch.Tensor],
                       kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's text conditioning; zeros for the captions not ``kept`` (caption dropout). Zeros, as in
    SDXL's training: its pipelines (force_zeros_for_empty_prompt) guide with zeros, not with the encoded
    empty prompt, so a model trained on the encoded "" would meet an input it never saw in every guided step."""
    embeds, pooled = encode_prompts(text_encoders, token_ids, kept.device)
    return embeds * kept.view(-1, 1, 1), pooled * kept.view(-1, 1)


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, params, 1 - decay)


def train_diffusion(c: dict, scene_list, latent_mean, latent_std, steps: int, batch_size: int, lr: float, seed: int,
                    log, on_snapshot=None, snapshot_steps=(), max_seconds: float | None = None,
                    caption_dropout: float = 0.1, snr_gamma: float = 5.0, ema_decay: float = 0.999) -> tuple[dict, int]:
    """Trains UNet and text encoders jointly; returns their EMA copies and the number of steps taken.

    ``on_snapshot(step, ema)`` is called at each of ``snapshot_steps``.
    """
    from diffusers import DDPMScheduler

    device = latent_mean.device
    scheduler = DDPMScheduler.from_config(c["scheduler"].config)
    names = ("unet", "text_encoder", "text_encoder_2")
    models = {k: c[k].train().requires_grad_(True) for k in names}
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in models.items()}
    params = [p for k in names for p in models[k].parameters()]
    ema_params = [p for k in names for p in ema[k].parameters()]
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=fused)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    tokens = CaptionTokens([c["tokenizer"], c["tokenizer_2"]], device)
    rng = random.Random(seed)
    generator = torch.Generator(device).manual_seed(seed)
    scale = c["vae"].config.scaling_factor
    size = c["vae"].config.sample_size
    time_ids = square_time_ids(size, batch_size, device)
    alphas = scheduler.alphas_cumprod.to(device)
    started, step = time.perf_counter(), 0
    while step < steps:
        index = torch.tensor([rng.randrange(len(scene_list)) for _ in range(batch_size)])
        captions = [training_caption(scene_list[i], rng) for i in index.tolist()]
        kept = torch.tensor([rng.random() >= caption_dropout for _ in captions], device=device)
        index = index.to(device)
        mean = latent_mean[index]
        latents = (mean + latent_std[index] * torch.randn(mean.shape, generator=generator, device=device)) * scale
        embeds, pooled = caption_embeddings([models["text_encoder"], models["text_encoder_2"]], tokens(captions), kept)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                                  device=device)
        alpha = alphas[timesteps]
        a, s = alpha.sqrt().view(-1, 1, 1, 1), (1 - alpha).sqrt().view(-1, 1, 1, 1)
        noisy, target = a * latents + s * noise, a * noise - s * latents  # v-prediction's target
        prediction = unet_prediction(models["unet"], noisy, timesteps, embeds, pooled, time_ids)
        snr = alpha / (1 - alpha)
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)  # min-SNR, in its v-prediction form
        loss = (F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema_params, params, min(ema_decay, (1 + step) / (10 + step)))
        step += 1
        if step % 250 == 0 or step == 1 or step == steps:
            rate = step / (time.perf_counter() - started)
            log(f"diffusion step {step}/{steps}: loss {loss.item():.4f} ({rate:.1f} steps/s)")
        if step in snapshot_steps and on_snapshot is not None:
            on_snapshot(step, ema)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            log(f"stopping at step {step}: the time limit of {max_seconds:.0f} s is reached")
            break
    return ema, step


def load_trained_vae(vae_dir: Path, expected_config):
    """An earlier run's VAE, in float32, checked to have this world model's layout."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    for key in ("block_out_channels", "latent_channels", "sample_size"):
        if tuple(np.atleast_1d(vae.config[key])) != tuple(np.atleast_1d(expected_config[key])):
            raise ValueError(f"{vae_dir}: its {key} is {vae.config[key]}, "
                             f"this world model needs {expected_config[key]}")
    return vae.eval().requires_grad_(False)


def load_world_weights(c: dict, model_dir: Path) -> dict:
    """Puts a saved world model's UNet and text encoders (float32) into ``c``; returns its pretraining.json."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for name, kind in kinds.items():
        saved = kind.from_pretrained(model_dir / name, torch_dtype=torch.float32)
        try:
            c[name].load_state_dict(saved.state_dict())
        except RuntimeError as exc:  # missing, unexpected or differently shaped weights
            reason = str(exc).splitlines()[0]
            raise ValueError(f"{model_dir / name}: not this world model's layout ({reason})") from None
    record = model_dir / "pretraining.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def world_pipeline(c: dict, ema: dict):
    """A StableDiffusionXLPipeline on CPU in float32 from the trained parts (EMA UNet and text encoders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = dict(c)
    parts.update({k: copy.deepcopy(m).to("cpu", torch.float32) for k, m in ema.items()})
    parts["vae"] = copy.deepcopy(c["vae"]).to("cpu", torch.float32)
    parts["scheduler"] = EulerDiscreteScheduler.from_config(c["scheduler"].config)
    return StableDiffusionXLPipeline(**parts)


def save_world_model(pipe, output_dir: Path, settings: dict, grid=None) -> Path:
    """``save_pretrained`` in float16 (UNet and VAE; ``pipe`` is converted) plus ``pretraining.json`` and a sample grid;
    written whole or not at all."""
    pipe.to(torch.float16)
    # transformers keeps a checkpoint's dtype when loading, diffusers makes float32: text encoders stored
    # in float16 would feed float16 into a float32 UNet. They are small, so they are stored in float32.
    pipe.text_encoder.to(torch.float32)
    pipe.text_encoder_2.to(torch.float32)
    with atomic_path(output_dir, directory=True) as tmp:
        pipe.save_pretrained(tmp)
        write_text(tmp / "pretraining.json", json.dumps(settings, indent=2, default=list))
        if grid is not None:
            save_image(grid, tmp / "samples.png")
    return Path(output_dir)


def evaluate_world_model(pipe, classifier, device: str, count: int, guidances=(5.0,), log=print):
    """Attribute accuracy of generated images at each guidance scale, and a grid of the last one's images."""
    from .classifier import attribute_accuracy, image_grid

    pipe.to(device)
    results, images = {}, []
    for guidance in guidances:
        accuracy, _, images = attribute_accuracy(pipe, classifier, count=count, guidance=guidance)
        results[f"guidance {guidance:g}"] = {k: round(v, 4) for k, v in accuracy.items()}
        log(f"  guidance {guidance:g}: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    pipe.to("cpu")
    return results, image_grid(images[:64], columns=8)


def pretrain(output_dir: Path, vae_steps: int, steps: int, batch_size: int, size: int, lr: float, vae_lr: float,
             seed: int, device: str, dataset_size: int = 100_000, workers: int = 1, snapshot_steps=(),
             max_seconds: float | None = None, classifier_path: Path | None = None, eval_count: int = 256,
             eval_guidances=(5.0,), vae_dir: Path | None = None, init_from: Path | None = None, log=print) -> Path:
    """Pretrains and saves the world model; snapshots go to ``<output_dir>-step<N>`` beside it.

    With ``vae_dir`` (an earlier run's ``vae`` folder) that VAE is kept as it is and only the diffusion
    phase runs: the VAE is a general codec, and it is the slow half on a CPU. With ``init_from`` (an
    earlier world model) its VAE is kept and its UNet and text encoders are trained further.

    With a classifier, each saved model is evaluated (prompted-attribute accuracy) and the figures
    recorded in its ``pretraining.json``.
    """
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    output_dir = Path(output_dir)
    classifier = None
    if classifier_path is not None:
        from .classifier import load_classifier

        classifier, _ = load_classifier(classifier_path)
    latent = size // 2 ** (len(WORLD_MODEL["vae_channels"]) - 1)
    c = tiny_sdxl_components(seed=seed, words=vocabulary(), sample_size=latent, prediction_type="v_prediction",
                             **WORLD_MODEL)
    earlier = {}
    if init_from is not None:
        earlier, vae_dir = load_world_weights(c, Path(init_from)), Path(init_from) / "vae"
    started = time.perf_counter()
    # before CUDA starts: rendering forks
    scene_list, pixels = render_dataset(dataset_size, size, seed=seed, workers=workers)
    if vae_dir is None:
        codec_pixels = render_all(codec_image, [(i, size, seed) for i in range(dataset_size // 2)], workers)
    else:
        c["vae"] = load_trained_vae(vae_dir, c["vae"].config)
    for k in ("unet", "vae", "text_encoder", "text_encoder_2"):
        c[k].to(device)
    pixels = pixels.to(device)
    log(f"rendered {dataset_size} scenes in {time.perf_counter() - started:.1f} s")
    if vae_dir is None:
        vae_psnr = train_vae(c["vae"], torch.cat([pixels, codec_pixels.to(device)]), vae_steps, batch_size, vae_lr,
                             seed, log)
        del codec_pixels
    latent_mean, latent_std = encode_dataset(c["vae"], pixels)
    if vae_dir is not None:  # a kept VAE's reconstructions of this dataset, from the means just computed
        vae_psnr = decoded_psnr(c["vae"], pixels[:4096], latent_mean[:4096])
    # Unit-variance latents: the noise schedule assumes them (SD's 0.18215 is right for SD's VAE only).
    # A model trained further keeps the scale its UNet learned with.
    scaling_factor = (c["vae"].config.scaling_factor if init_from is not None
                      else round(1.0 / latent_mean.std().item(), 5))
    c["vae"].register_to_config(scaling_factor=scaling_factor)
    log(f"VAE: PSNR {vae_psnr:.1f} dB, scaling_factor {scaling_factor}")
    settings = dict(vae_steps=vae_steps, batch_size=batch_size, image_size=size, lr=lr, vae_lr=vae_lr, seed=seed,
                    dataset_size=dataset_size, device=device, model=WORLD_MODEL, vae_psnr_db=round(vae_psnr, 2))
    if vae_dir is not None:  # its own steps and settings are those of the run that made it
        settings.update(vae_steps=0, vae_lr=None, vae_from=earlier.get("vae_from", str(vae_dir)))
    if init_from is not None:
        settings.update(continued_from=str(init_from),
                        earlier_steps=earlier.get("earlier_steps", 0) + earlier.get("steps", 0))

    def save(ema: dict, where: Path, step: int) -> None:
        seconds = round(time.perf_counter() - started, 1)
        pipe = world_pipeline(c, ema)
        pipe.to(torch.float16).to(torch.float32)  # evaluate what is stored: float16 weights
        record, grid = {**settings, "steps": step, "seconds": seconds}, None
        if classifier is not None:
            log(f"evaluating step {step} on {eval_count} prompts")
            record["evaluation"], grid = evaluate_world_model(pipe, classifier, device, eval_count, eval_guidances, log)
        save_world_model(pipe, where, record, grid)
        log(f"step {step} saved to {where}")

    def snapshot(step: int, ema: dict) -> None:
        save(ema, output_dir.with_name(f"{output_dir.name}-step{step}"), step)

    ema, done = train_diffusion(c, scene_list, latent_mean, latent_std, steps, batch_size, lr, seed, log,
                                on_snapshot=snapshot, snapshot_steps=set(snapshot_steps), max_seconds=max_seconds)
    save(ema, output_dir, done)
    log(f"done after {time.perf_counter() - started:.1f} s ({done} diffusion steps)")
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--vae_steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1107,
                        help="UNet + text-encoder steps (the committed model stopped at 1107)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae_lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="processes that render the dataset")
    parser.add_argument("--snapshot_steps", default="", help="comma-separated steps at which to save a snapshot too")
    parser.add_argument("--max_minutes", type=float, default=None, help="stop the diffusion phase after this long")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="evaluate each saved model with this attribute classifier")
    parser.add_argument("--eval_count", type=int, default=256, help="prompts per evaluation")
    parser.add_argument("--eval_guidance", default="5", help="comma-separated guidance scales to evaluate at")
    parser.add_argument("--vae", type=Path, default=None,
                        help="keep this trained VAE (a world model's vae folder) and run the diffusion phase only")
    parser.add_argument("--init_from", type=Path, default=None,
                        help="train this world model further (its UNet and text encoders; its VAE is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.image_size % 8 or args.image_size < 16:
        parser.error("--image_size must be a multiple of 8, at least 16")
    if args.vae is not None and not (args.vae / "config.json").is_file():
        parser.error(f"--vae {args.vae}: not a VAE folder (no config.json)")
    if args.init_from is not None and not (args.init_from / "model_index.json").is_file():
        parser.error(f"--init_from {args.init_from}: not a world model's folder (no model_index.json)")
    if args.init_from is not None and args.vae is not None:
        parser.error("--init_from keeps its own VAE: leave out --vae")
    quiet_libraries()
    snapshots = [int(s) for s in args.snapshot_steps.split(",") if s.strip()]
    try:
        pretrain(args.output_dir, args.vae_steps, args.steps, args.batch_size, args.image_size, args.lr, args.vae_lr,
                 args.seed, args.device, args.dataset_size, args.workers, snapshots,
                 None if args.max_minutes is None else args.max_minutes * 60, args.classifier, args.eval_count,
                 [float(g) for g in args.eval_guidance.split(",")], args.vae, args.init_from,
                 log=lambda m: print(m, flush=True))
    except (ValueError, OSError) as exc:  # a VAE or model of another layout, or a folder missing its files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
