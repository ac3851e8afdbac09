"""The DreamBooth training loop, read top to bottom: set-up, class images, models, data, loop, outputs.

accelerate handles devices, mixed precision, processes and checkpoints; diffusers the models,
the noise schedule and the pipeline; this module only wires them to the MoSLoRA adapter.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapter import AdapterConfig
from .data import (
    DataError,
    DreamBoothDataset,
    collate,
    epoch_batches,
    generate_class_images,
    scan_images,
    seeded_generator,
)
from .errors import AdapterError
from .formats import NATIVE_FILE, save_adapter
from .inference import restore_adapter_weights
from .model_card import write_model_card
from .options import settings_for_metadata
from .surgery import adapter_layers, inject_components

logger = logging.getLogger("dreambooth_moslora")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


# ---------------------------------------------------------------- prompts


def tokenize(tokenizers, prompts: list[str]) -> list[torch.Tensor]:
    return [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in tokenizers
    ]


def encode_prompts(text_encoders, token_ids: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: both encoders' penultimate hidden states side by side, and the
    second encoder's pooled (projected) embedding."""
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection model, the last encoder
    return torch.cat(hidden, dim=-1), pooled


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """accelerate's save_state into a temporary folder renamed when complete: a kill never leaves half a checkpoint."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its random states
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- the run


def train(args) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard" and not _has_module("tensorboard"):
        report_to = None  # tensorboard logs when it is installed, silently nothing otherwise
    accelerator = Accelerator(
        # On a machine without an accelerator, say so: under torchrun that selects gloo (multi-CPU).
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.INFO if accelerator.is_main_process else logging.ERROR)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    main = accelerator.is_main_process
    # Progress bars on the main process, unless tqdm's own TQDM_DISABLE says otherwise (an explicit
    # disable= argument would override it).
    show_bars = main and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")
    model_path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant

    # 1. Data first: a bad folder fails before any model is loaded.
    instance_images, skipped = scan_images(args.instance_data_dir, "instance")
    if skipped and main:
        logger.warning("skipping %d file(s) in %s: %s", len(skipped), args.instance_data_dir, "; ".join(skipped))
    if not instance_images:
        raise DataError(f"no usable image in {args.instance_data_dir}")

    # 2. Class images for prior preservation, generated by the base model on the main process only.
    class_images: list[Path] = []
    if args.with_prior_preservation:
        if main:
            existing, _ = scan_images(args.class_data_dir, "class") if args.class_data_dir.is_dir() else ([], [])
            missing = args.num_class_images - len(existing)
            if missing > 0:
                logger.info("generating %d class image(s) of %r into %s", missing, args.class_prompt, args.class_data_dir)
                bar = tqdm(total=missing, desc="class images", disable=not show_bars)

                def base_pipeline():
                    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, revision=revision, variant=variant)
                    pipe.set_progress_bar_config(disable=True)
                    if accelerator.device.type == "cuda":
                        pipe.to(torch.float16)
                    return pipe.to(accelerator.device)

                generate_class_images(
                    base_pipeline, args.class_data_dir, args.class_prompt, args.num_class_images,
                    args.sample_batch_size, args.seed, args.resolution, args.class_inference_steps, progress=bar,
                )  # fmt: skip
                bar.close()
                _free_memory()
        accelerator.wait_for_everyone()
        class_images, _ = scan_images(args.class_data_dir, "class")
        class_images = class_images[: args.num_class_images]

    # 3. Models. Frozen weights in the mixed-precision dtype, the VAE in fp32, the adapter in fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizers = [
        AutoTokenizer.from_pretrained(model_path, subfolder=sub, revision=revision, use_fast=False)
        for sub in ("tokenizer", "tokenizer_2")
    ]
    text_encoders = [
        CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", revision=revision, variant=variant),
        CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2", revision=revision, variant=variant),
    ]
    vae = load_vae(args)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", revision=revision, variant=variant)
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", revision=revision)
    prediction_type = noise_scheduler.config.prediction_type  # trained against the base model's own target
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32)
    for encoder in text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)

    adapter_config = AdapterConfig(
        rank=args.rank, alpha=args.lora_alpha, mixer=args.mixer, mixer_init=args.mixer_init, dropout=args.lora_dropout
    )
    components = {"unet": unet}
    if args.train_text_encoder:
        components.update(text_encoder=text_encoders[0], text_encoder_2=text_encoders[1])
    torch.manual_seed(args.seed)  # the adapter's initial A and M
    params = inject_components(components, adapter_config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()

    # 4. Optimizer: the UNet's adapter at --learning_rate, the text encoders' at --text_encoder_lr.
    lr_factor = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes if args.scale_lr else 1
    groups = [{"params": params["unet"], "lr": args.learning_rate * lr_factor, "weight_decay": args.adam_weight_decay}]
    if args.train_text_encoder:
        te_params = params["text_encoder"] + params["text_encoder_2"]
        groups.append({"params": te_params, "lr": args.text_encoder_lr * lr_factor, "weight_decay": args.adam_weight_decay_text_encoder})
    optimizer = make_optimizer(args, groups)

    # 5. Data: prompt embeddings computed once when the text encoders are frozen.
    dataset = DreamBoothDataset(
        instance_images, args.instance_prompt, args.resolution, class_images, args.class_prompt,
        args.caption_extension, args.center_crop, args.random_flip, args.aspect_ratio_buckets,
        bucket_step=64 if args.resolution >= 512 else 8, seed=args.seed,
    )  # fmt: skip
    prompt_cache = None
    if not args.train_text_encoder:
        captions = sorted(set(dataset.captions) | set(dataset.class_captions))
        with torch.no_grad():
            embeds, pooled = encode_prompts(text_encoders, tokenize(tokenizers, captions), accelerator.device)
        prompt_cache = {c: (embeds[i], pooled[i]) for i, c in enumerate(captions)}
        if args.validation_prompt is None:  # the encoders are needed again only for validation images
            for encoder in text_encoders:
                encoder.to("cpu")
            _free_memory()

    # Each epoch is cut to a whole number of optimizer steps per process (cycling its batches when
    # there are fewer than processes × accumulation), so all processes take the same steps.
    batches_in_epoch = len(epoch_batches(dataset, args.train_batch_size, 0, args.seed))
    per_process = math.ceil(batches_in_epoch / accelerator.num_processes)
    steps_per_epoch = math.ceil(per_process / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    latent_cache = None
    if args.cache_latents:  # every image encoded once (its first crop and flip), then the VAE is freed
        latent_cache = cache_latents(dataset, vae, accelerator.device)
        vae_config, vae = vae.config, None
        _free_memory()
    else:
        vae_config = vae.config
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )  # fmt: skip

    trained = [unet] + (text_encoders if args.train_text_encoder else [])
    unwrapped = dict(zip(components, trained))
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    unet = trained[0]
    if args.train_text_encoder:
        text_encoders = trained[1:]

    # Checkpoints hold the adapter (one native file), not the frozen models around it.
    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_adapter(folder, unwrapped, formats=["native"], base_model=model_path)
        weights.clear()

    def load_hook(models, folder):
        models.clear()
        restore_adapter_weights(unwrapped, Path(folder) / NATIVE_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    # 6. Resume: adapter, optimizer, scheduler and random states from accelerate; the data
    # order and the noise are functions of (seed, step), so they continue by themselves.
    global_step = 0
    if args.resume_from_checkpoint:
        found = checkpoint_dirs(output_dir)
        path = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint != "latest" else (found[-1] if found else None)
        if path is None:
            logger.info("no checkpoint in %s: starting a new run", output_dir)
        else:
            accelerator.load_state(str(path))
            global_step = int(path.name.split("-")[-1]) if path.name.split("-")[-1].isdigit() else 0
            logger.info("resumed from %s at step %d", path, global_step)

    if main:
        accelerator.init_trackers("dreambooth-moslora", config={k: v for k, v in settings_for_metadata(args).items() if isinstance(v, (int, float, str, bool))})
        logger.info(
            "training %d step(s): %d instance image(s), %d class image(s), batch %d × %d process(es) × %d accumulation",
            max_steps, len(instance_images), len(class_images), args.train_batch_size, accelerator.num_processes,
            args.gradient_accumulation_steps,
        )  # fmt: skip

    # 7. The loop.
    models = Models(unet, vae, vae_config, text_encoders, tokenizers, noise_scheduler, prompt_cache, weight_dtype, accelerator.device)
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not show_bars)
    last_loss, started = float("nan"), time.perf_counter()
    # One line per optimizer step, appended (a resumed run continues the file; a later line for a
    # step replaces an earlier one): the loss curve, without tensorboard.
    loss_log = open(output_dir / "loss.csv", "a", buffering=1) if main else None  # noqa: SIM115 — closed below
    if loss_log is not None and loss_log.tell() == 0:
        loss_log.write("step,loss,lr\n")
    _train_mode(unwrapped)
    first_epoch = global_step // steps_per_epoch
    try:
        for epoch in range(first_epoch, num_epochs):
            mine = process_batches(dataset, args, epoch, steps_per_epoch, accelerator.process_index, accelerator.num_processes)
            done = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
            for batch_number, batch in enumerate(batch_source(dataset, mine, done, epoch, latent_cache, args.dataloader_num_workers), start=done):
                with accelerator.accumulate(*trained):
                    # Every random draw of a batch comes from a generator seeded by its place in the run.
                    rng = seeded_generator(args.seed, epoch, batch_number, accelerator.process_index)
                    loss = batch_loss(models, batch, rng, args)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {global_step + 1}: stopping. The last good checkpoint "
                            "and adapter files are untouched; try a lower --learning_rate or --mixed_precision bf16"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for ps in params.values() for p in ps], args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                if accelerator.sync_gradients:
                    global_step += 1
                    last_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
                    lr = lr_scheduler.get_last_lr()[0]
                    progress.update(1)
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                    accelerator.log({"loss": last_loss, "lr": lr}, step=global_step)
                    if loss_log is not None:
                        loss_log.write(f"{global_step},{last_loss:.6g},{lr:.6g}\n")
                    if global_step % args.checkpointing_steps == 0 and global_step < max_steps:
                        save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                    if global_step >= max_steps:
                        break

            if args.validation_prompt and main and (epoch + 1) % args.validation_epochs == 0 and global_step < max_steps:
                _validate(args, accelerator, unwrapped, text_encoders, tokenizers, vae, noise_scheduler, output_dir / f"validation-step{global_step}.png")
            if global_step >= max_steps:
                break
    finally:
        progress.close()  # before any error message, so that message is the last line
        if loss_log is not None:
            loss_log.close()

    # 8. Outputs, written by the main process alone.
    accelerator.wait_for_everyone()
    if main:
        settings = settings_for_metadata(args)
        settings.update(
            max_train_steps=max_steps, prediction_type=prediction_type, final_loss=last_loss,
            num_train_images=len(instance_images), num_class_images=len(class_images),
        )  # fmt: skip
        files = save_adapter(output_dir, unwrapped, formats=args.output_formats, base_model=model_path, training=settings)
        grid = None
        if args.validation_prompt:
            grid = _validate(args, accelerator, unwrapped, text_encoders, tokenizers, vae, noise_scheduler, output_dir / "validation.png")
        write_model_card(output_dir, settings, files, grid)
        logger.info("done: %d steps in %.1f s, final loss %.4f; adapters in %s", global_step, time.perf_counter() - started, last_loss, output_dir)
    accelerator.end_training()
    return output_dir


# ---------------------------------------------------------------- one batch


@dataclass
class Models:
    """What a training step reads, besides the batch."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None  # None once latents are cached
    vae_config: object
    text_encoders: list
    tokenizers: list
    noise_scheduler: object
    prompt_cache: dict | None  # caption → (hidden states, pooled) while the text encoders are frozen
    weight_dtype: torch.dtype
    device: torch.device


def batch_loss(m: Models, batch: dict, rng: torch.Generator, args) -> torch.Tensor:
    """SDXL's denoising loss on a batch: instance examples, plus λ × the class examples after them."""
    from diffusers.training_utils import compute_snr

    scale, shift = m.vae_config.scaling_factor, getattr(m.vae_config, "shift_factor", None) or 0.0
    if "latent_mean" in batch:
        latents = batch["latent_mean"] + batch["latent_std"] * torch.randn(batch["latent_mean"].shape, generator=rng)
    else:
        with torch.no_grad():
            latents = m.vae.encode(batch["pixels"].to(m.device, m.vae.dtype)).latent_dist.sample(generator=rng)
    latents = ((latents - shift) * scale).to(m.device, m.weight_dtype)
    noise = torch.randn(latents.shape, generator=rng).to(latents)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=rng).to(noise)
    steps = m.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=rng).to(m.device)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)

    if m.prompt_cache is not None:
        embeds = torch.stack([m.prompt_cache[c][0] for c in batch["captions"]]).to(m.device, m.weight_dtype)
        pooled = torch.stack([m.prompt_cache[c][1] for c in batch["captions"]]).to(m.device, m.weight_dtype)
    else:
        embeds, pooled = encode_prompts(m.text_encoders, tokenize(m.tokenizers, batch["captions"]), m.device)
    # SDXL's micro-conditioning, per example: its original size, its crop's top-left, the target size
    factor = 2 ** (len(m.vae_config.block_out_channels) - 1)
    target_size = [latents.shape[-2] * factor, latents.shape[-1] * factor]
    time_ids = torch.tensor(
        [[*original, *crop, *target_size] for original, crop in zip(batch["original_sizes"], batch["crops_top_left"])],
        device=m.device, dtype=m.weight_dtype,
    )  # fmt: skip
    prediction = m.unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    prediction_type = m.noise_scheduler.config.prediction_type  # the base model's own target
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:  # min-SNR weighting, in the form for the model's target
        snr = compute_snr(m.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma)
        if prediction_type == "epsilon":
            weights = weights / snr
        elif prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        per_example = per_example * weights
    n = batch["num_instance"]
    loss = per_example[:n].mean()
    if per_example.shape[0] > n:
        loss = loss + args.prior_loss_weight * per_example[n:].mean()
    return loss


def process_batches(dataset, args, epoch: int, steps_per_epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of an epoch: a whole number of optimizer steps, the same for every process.

    The epoch's batches are cycled when there are fewer than processes × accumulation steps.
    """
    batches = epoch_batches(dataset, args.train_batch_size, epoch, args.seed)
    needed = steps_per_epoch * args.gradient_accumulation_steps * world
    batches = (batches * math.ceil(needed / len(batches)))[:needed]
    return batches[rank::world]


# ---------------------------------------------------------------- helpers of the loop


def make_optimizer(args, groups):
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise TrainingError("--optimizer prodigy needs prodigyopt: pip install 'dreambooth-moslora[optim]'") from None
        if any(group["lr"] < 0.1 for group in groups):  # Prodigy finds its own step size; lr multiplies it
            logger.warning("with --optimizer prodigy the learning rate is a multiplier: around 1.0 is usual")
        return prodigyopt.Prodigy(
            groups, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3, eps=args.adam_epsilon,
            decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )  # fmt: skip
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install 'dreambooth-moslora[optim]'") from None
        return bnb.optim.AdamW8bit(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    try:  # the fused kernel: one call for all of the adapter's many small tensors (6× faster on CPU here)
        return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)
    except (RuntimeError, TypeError):  # a device or torch without it
        return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def _train_mode(models: dict) -> None:
    for model in models.values():
        for layer in adapter_layers(model).values():
            layer.train()


def batch_source(dataset, batches, skip, epoch, latent_cache, num_workers):
    """The batches of this process for one epoch, from the first not yet trained on."""
    if latent_cache is not None:
        for indices in batches[skip:]:
            yield collate_cached([latent_cache[i] for i in indices])
        return
    yield from torch.utils.data.DataLoader(
        dataset, batch_sampler=[[(epoch, i) for i in b] for b in batches[skip:]], collate_fn=collate,
        num_workers=num_workers,
        # its own generator: a loader drawing its workers' seed from the global one would shift
        # dropout's random numbers in a resumed run, which starts its loader mid-epoch
        generator=seeded_generator(epoch, -3),
    )


@torch.no_grad()
def cache_latents(dataset, vae, device) -> dict:
    """Each item's latent distribution (mean, std) and conditioning, from its epoch-0 crop and flip."""
    cache = {}
    for index in range(len(dataset)):
        batch = collate([dataset[(0, index)]])
        dist = vae.encode(batch["pixels"].to(device, vae.dtype)).latent_dist
        cache[index] = {
            "latent_mean": dist.mean.cpu(), "latent_std": dist.std.cpu(), "num_instance": 1,
            **{k: batch[k] for k in ("original_sizes", "crops_top_left", "captions")},
        }  # fmt: skip
    return cache


def collate_cached(items: list[dict]) -> dict:
    """Like data.collate: every instance example first, then every class example."""
    def ordered(key):
        return [x[key][0] for x in items] + [x[key][1] for x in items if len(x[key]) > 1]

    def stack(key):
        return torch.cat([x[key][:1] for x in items] + [x[key][1:] for x in items if x[key].shape[0] > 1])

    return {
        "latent_mean": stack("latent_mean"), "latent_std": stack("latent_std"), "num_instance": len(items),
        "original_sizes": ordered("original_sizes"), "crops_top_left": ordered("crops_top_left"),
        "captions": ordered("captions"),
    }  # fmt: skip


def load_vae(args):
    """The base model's VAE, or the separately given one (e.g. an fp16-safe VAE)."""
    from diffusers import AutoencoderKL

    separate = args.pretrained_vae_model_name_or_path
    if separate:
        return AutoencoderKL.from_pretrained(separate, revision=args.revision)
    return AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
    )


@torch.no_grad()
def _validate(args, accelerator, unwrapped, text_encoders, tokenizers, vae, scheduler, path: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from .demo import labelled_grid

    if vae is None:  # freed after caching latents: load it again for the pictures
        vae = load_vae(args).to(accelerator.device)
    for layer in (l for m in unwrapped.values() for l in adapter_layers(m).values()):
        layer.eval()
    for encoder in text_encoders:
        encoder.to(accelerator.device)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=accelerator.unwrap_model(text_encoders[0]), text_encoder_2=accelerator.unwrap_model(text_encoders[1]),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unwrapped["unet"],
        scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(accelerator.device.type) if accelerator.mixed_precision != "no" else nullcontext()
    images = []
    with autocast:
        for i in range(args.num_validation_images):
            generator = torch.Generator(accelerator.device).manual_seed(args.seed + i)
            images.append(
                pipe(args.validation_prompt, num_inference_steps=args.num_validation_inference_steps,
                     height=args.resolution, width=args.resolution, generator=generator).images[0]
            )  # fmt: skip
    grid = labelled_grid(images, [f"seed {args.seed + i}" for i in range(len(images))])
    tmp = path.with_suffix(".partial.png")
    grid.save(tmp)
    os.replace(tmp, path)
    _train_mode(unwrapped)
    return path


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_libraries() -> None:
    """Our progress bar and log lines, not every library's loading bars and notices."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    from .options import parse_args

    args = parse_args(argv)  # bad options end here, with argparse's one-line message
    quiet_libraries()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR") and not os.environ.get("WORLD_SIZE"):
        # accelerate launch --cpu --num_processes N sets these, then starts one process unless given an MPI hostfile
        print("warning: accelerate launch --cpu starts a single process without --mpirun_hostfile; for several CPU "
              "processes use: torchrun --nproc_per_node N train_dreambooth.py ...", file=sys.stderr)
    try:
        train(args)
    except (DataError, AdapterError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint and any adapter files already written are intact", file=sys.stderr)
        return 130
    return 0
