"""The DreamBooth loss on one batch: SDXL's denoising loss on the instance examples, plus λ × that
on the class examples (prior preservation), with min-SNR weighting and noise offset when asked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..sdxl import encode_prompts, time_ids, tokenize, unet_prediction


@dataclass
class StepModels:
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
    # What a step reads that does not change from step to step, made on the device once: time ids by the batch's
    # sizes and crops, the SNR of every timestep. A step then copies nothing from the host.
    constants: dict = field(default_factory=dict)

    def time_ids(self, batch: dict, latent_shape) -> torch.Tensor:
        """The batch's time ids, from a row per (original size, crop, target) made once."""
        factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        target = (latent_shape[-2] * factor, latent_shape[-1] * factor)
        rows = []
        for size, crop in zip(batch["original_sizes"], batch["crops_top_left"]):
            key = ("time_ids", tuple(size), tuple(crop), target)
            if key not in self.constants:
                self.constants[key] = time_ids([size], [crop], target, self.device, self.weight_dtype)[0]
            rows.append(self.constants[key])
        return torch.stack(rows)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio ᾱ/(1-ᾱ) at each timestep (what diffusers' compute_snr gives), from a table."""
        if "snr" not in self.constants:
            alphas = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
            self.constants["snr"] = alphas / (1.0 - alphas)
        return self.constants["snr"][timesteps]


@dataclass(frozen=True)
class LossSettings:
    prior_loss_weight: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    masked_loss_background_weight: float = 0.0  # where a mask is 0; 1 would ignore masks


def batch_latents(m: StepModels, batch: dict, rng: torch.Generator) -> torch.Tensor:
    """A sample of each example's latent distribution, scaled as the UNet expects."""
    scale, shift = m.vae_config.scaling_factor, getattr(m.vae_config, "shift_factor", None) or 0.0
    if "latent_mean" in batch:
        mean = batch["latent_mean"]
        latents = mean + batch["latent_std"] * torch.randn(mean.shape, generator=rng, device=mean.device,
                                                           dtype=mean.dtype)
    else:
        with torch.no_grad():
            pixels = batch["pixels"].to(m.device, m.vae.dtype, non_blocking=True)  # pinned by the data loader
            latents = m.vae.encode(pixels).latent_dist.sample(generator=rng)
    return ((latents - shift) * scale).to(m.device, m.weight_dtype)


def batch_conditioning(m: StepModels, batch: dict, latent_shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text hidden states, pooled embedding, time ids) of each example."""
    if m.prompt_cache is not None:  # on the device, in the weights' dtype
        embeds = torch.stack([m.prompt_cache[c][0] for c in batch["captions"]])
        pooled = torch.stack([m.prompt_cache[c][1] for c in batch["captions"]])
    else:
        embeds, pooled = encode_prompts(m.text_encoders, tokenize(m.tokenizers, batch["captions"]), m.device)
    return embeds, pooled, m.time_ids(batch, latent_shape)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR weighting of timesteps whose SNR is ``snr``, in the form for the model's target."""
    weights = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights


def masked_mean(per_pixel: torch.Tensor, masks: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Each example's loss weighted by its mask, brought to the latents' size: weight 1 where the mask is 1,
    ``background_weight`` where it is 0; normalised by the weights, so a masked example weighs as much as a whole
    one."""
    masks = F.interpolate(masks.float(), size=per_pixel.shape[-2:], mode="area")
    weights = background_weight + (1.0 - background_weight) * masks  # N×1×h×w, the same for every channel
    total = (per_pixel * weights).sum(dim=(1, 2, 3))
    return total / (weights.sum(dim=(1, 2, 3)) * per_pixel.shape[1]).clamp_min(1e-8)


def batch_loss(m: StepModels, batch: dict, rng: torch.Generator, settings: LossSettings) -> torch.Tensor:
    """The loss of one batch; every random draw comes from ``rng``, a generator on the step's device."""
    latents = batch_latents(m, batch, rng)
    noise = torch.randn(latents.shape, generator=rng, device=m.device).to(latents.dtype)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=rng,
                                                     device=m.device).to(noise)
    steps = m.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=rng, device=m.device)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet_prediction(m.unet, noisy, timesteps, *batch_conditioning(m, batch, latents.shape))

    prediction_type = m.noise_scheduler.config.prediction_type  # the base model's own target
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    per_pixel = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if "masks" in batch:
        masks = batch["masks"].to(per_pixel.device, non_blocking=True)
        per_example = masked_mean(per_pixel, masks, settings.masked_loss_background_weight)
    else:
        per_example = per_pixel.mean(dim=(1, 2, 3))
    if settings.snr_gamma is not None:
        per_example = per_example * min_snr_weights(m.snr(timesteps), settings.snr_gamma, prediction_type)
    n = batch["num_instance"]
    loss = per_example[:n].mean()
    if per_example.shape[0] > n:
        loss = loss + settings.prior_loss_weight * per_example[n:].mean()
    return loss
