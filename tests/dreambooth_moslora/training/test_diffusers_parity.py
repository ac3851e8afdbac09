"""A command line pasted from diffusers' train_dreambooth_lora_sdxl.py moves the weights as far here as there.

The reference is that script's training step, reduced to what sets how far a LoRA moves: PEFT LoRA on
the UNet's attention projections with ``init_lora_weights="gaussian"`` and α = rank, AdamW (β 0.9/0.999,
weight decay 1e-4, ε 1e-8), gradient clipping at 1, the ε-prediction MSE on VAE latents, the same images,
captions, rank, learning rate and steps. Both runs start from the same tiny SDXL; what is compared is
each layer's ‖ΔW‖, since the random draws (A's init, noise, timesteps) differ between the two.
"""

import statistics

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora.sdxl import square_time_ids, unet_prediction
from dreambooth_moslora.training import main
from dreambooth_moslora.training.data import load_image, prepare

from .conftest import argv

STEPS, LR, RANK = 30, 1e-4, 4


def reference_deltas(world) -> dict[str, torch.Tensor]:
    """ΔW of each adapted UNet layer after the reference run, by module path."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig

    pipe = StableDiffusionXLPipeline.from_pretrained(world["model"])
    unet, vae = pipe.unet, pipe.vae
    for model in (unet, vae, pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    paths = sorted(world["subject"].glob("*.png"))
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([prepare(load_image(p), (64, 64), True, False, g)[0] for p in paths])
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    unet.train()
    for step in range(STEPS):
        batch = [(2 * step + i) % len(paths) for i in range(2)]
        with torch.no_grad():
            latents = vae.encode(pixels[batch]).latent_dist.sample(g) * vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt([captions[i] for i in batch], device="cpu",
                                                      do_classifier_free_guidance=False)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (2,), generator=g)
        prediction = unet_prediction(unet, scheduler.add_noise(latents, noise, timesteps), timesteps, embeds, pooled,
                                     square_time_ids(64, 2))
        torch.nn.functional.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        name: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach()
        for name, m in unet.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }


@pytest.fixture(scope="module")
def reference(world):
    pytest.importorskip("peft")
    return reference_deltas(world)


def our_deltas(world, out, *extra) -> dict[str, torch.Tensor]:
    assert main(argv(world, out, "--learning_rate", str(LR), "--rank", str(RANK), "--output_formats", "diffusers",
                     "--lr_scheduler", "constant", *extra, steps=STEPS)) == 0
    tensors = load_file(out / "pytorch_lora_weights.safetensors")  # lora_B carries α/r and the mixer
    return {k[len("unet."): -len(".lora_A.weight")]: tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
            for k in tensors if k.startswith("unet.") and k.endswith(".lora_A.weight")}


def median_ratio(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys() and len(ours) == 136
    return statistics.median(float(ours[k].norm() / reference[k].norm()) for k in ours)


@pytest.mark.parametrize("mixer", ["learned", "none"])
def test_a_pasted_diffusers_command_line_moves_the_weights_as_far(world, tmp_path, reference, mixer):
    ratio = median_ratio(our_deltas(world, tmp_path / mixer, "--mixer", mixer), reference)
    assert 0.5 <= ratio <= 2.0, ratio


def test_kaiming_init_of_a_moves_the_weights_less(world, tmp_path, reference):
    """The old default: A's scale 1/√(3·in) instead of 1/r, so the same learning rate means much less."""
    ratio = median_ratio(our_deltas(world, tmp_path / "kaiming", "--mixer", "none", "--lora_init", "kaiming"),
                         reference)
    assert ratio < 0.5, ratio
