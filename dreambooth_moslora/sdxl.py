"""SDXL's conditioning, in one place: prompts to token ids to text embeddings, and the micro-conditioning.

SDXL conditions its UNet on both text encoders' penultimate hidden states side by side, on the
second encoder's pooled (projected) embedding, and on six numbers per image ("time ids"): the
original size, the crop's top-left corner and the target size. The trainer, pretraining, the
exactness checks and the benchmarks all build them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the adaptable models of an SDXL pipeline

# The published configs of stabilityai/stable-diffusion-xl-base-1.0 (the fields that shape the layers).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_ENCODER_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
    hidden_act="gelu", vocab_size=49408, max_position_embeddings=77,
)


def meta_components(base: str | None = None) -> dict[str, torch.nn.Module]:
    """The adaptable models of SDXL base (or of the diffusers folder ``base``, from its configs alone) on the
    meta device: the real layer names and shapes, without a byte of weights and without the hub."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if base is None:
        unet_config = SDXL_UNET_CONFIG
        te_configs = [CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG), CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)]
    else:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
        te_configs = [CLIPTextConfig.from_pretrained(base, subfolder=sub) for sub in ("text_encoder", "text_encoder_2")]
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(unet_config),
            "text_encoder": CLIPTextModel(te_configs[0]),
            "text_encoder_2": CLIPTextModelWithProjection(te_configs[1]),
        }


def tokenize(tokenizers, prompts: list[str]) -> list[torch.Tensor]:
    """Each tokenizer's ids for the prompts, padded to its full length as SDXL's encoders expect."""
    return [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in tokenizers
    ]


def encode_prompts(text_encoders, token_ids: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of both encoders concatenated, pooled embedding of the second)."""
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection model, the last encoder
    return torch.cat(hidden, dim=-1), pooled


def time_ids(
    original_sizes: Sequence[Sequence[int]],
    crops_top_left: Sequence[Sequence[int]],
    target_size: Sequence[int],
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """The micro-conditioning, one row per image: (original h, w, crop top, left, target h, w)."""
    rows = [[*original, *crop, *target_size] for original, crop in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, device=device, dtype=dtype)


def square_time_ids(size: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Time ids of ``batch`` uncropped square images of side ``size``."""
    return time_ids([(size, size)] * batch, [(0, 0)] * batch, (size, size), device, dtype)


def unet_prediction(unet, noisy, timesteps, embeds, pooled, ids) -> torch.Tensor:
    return unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@torch.no_grad()
def sdxl_forward(pipe, prompt: str, seed: int = 0, timestep: int = 500, size: int | None = None) -> dict:
    """One deterministic pass through both text encoders and the UNet, for exactness checks.

    The prompt goes through diffusers' own ``encode_prompt``, so the checks compare against the
    library's conditioning, not against ours. Returns the text conditioning and the UNet's
    prediction for seeded noise.
    """
    device = pipe.unet.device
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
    generator = torch.Generator("cpu").manual_seed(seed)
    latent_size = size // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, latent_size, latent_size, generator=generator)
    ids = square_time_ids(size, 1, device, prompt_embeds.dtype)
    prediction = unet_prediction(pipe.unet, latents.to(device, prompt_embeds.dtype), timestep, prompt_embeds, pooled,
                                 ids)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "noise_prediction": prediction}


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest elementwise difference between two ``sdxl_forward`` results."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
