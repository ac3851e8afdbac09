"""SDXL-architecture models built offline: a tiny one with a fixed seed, and the full-size layout.

Same architecture as SDXL base — a UNet with text_time conditioning, CLIP-L-style and
OpenCLIP-bigG-style text encoders (the second with a projection), a KL VAE, an Euler
scheduler — only narrower and shallower, so tests and the offline demo run on a CPU in
seconds. Real users point the toolkit at the hub id instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from dreambooth_moslora.sdxl import SDXL_UNET_CONFIG

DEFAULT_WORDS = (
    "a an the photo picture painting drawing of in on at with and sks dog cat person man woman toy "
    "red green blue yellow black white beach forest city snow park room background style portrait circle gray"
).split()


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for raw bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer_files(directory: str | os.PathLike, words=DEFAULT_WORDS) -> Path:
    """Writes vocab.json and merges.txt of a CLIP BPE tokenizer that knows ``words`` as whole tokens.

    Any other text still tokenizes, one byte-symbol at a time, as in CLIP.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    # Learn BPE merges on the word list itself, until every word is one symbol: encoding replays
    # the merges in the order they were learned, so each listed word comes out as a single token.
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(w.lower() for w in words)]
    merges: list[str] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # the most frequent; ties alphabetically
        merges.append(f"{best[0]} {best[1]}")
        vocab.append(best[0] + best[1])
        words = [_merge(word, best) for word in words]
    vocab_ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    vocab_ids["<|startoftext|>"] = len(vocab_ids)
    vocab_ids["<|endoftext|>"] = len(vocab_ids)
    (directory / "vocab.json").write_text(json.dumps(vocab_ids, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_tokenizer(words=DEFAULT_WORDS):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp, words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def tiny_sdxl_components(
    seed: int = 0, words=DEFAULT_WORDS, sample_size: int = 32, block_out_channels=(32, 64, 64), text_hidden: int = 32,
    text_layers: int = 3, vae_channels=(32, 64), prediction_type: str = "epsilon",
) -> dict:
    """The seven parts of an SDXL pipeline, tiny and seeded (widths adjustable, e.g. for mismatch tests)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(words)
    vocab_size = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")

    def text_config(hidden: int, layers: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection, hidden_act="gelu",
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(hidden=text_hidden, layers=text_layers, projection=text_hidden))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(hidden=text_hidden, layers=text_layers,
                                                             projection=text_hidden))
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(**dict(
        SDXL_UNET_CONFIG,  # SDXL's layout, narrower and shallower
        sample_size=sample_size,
        block_out_channels=tuple(block_out_channels),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=2 * text_hidden,  # both encoders' hidden states, concatenated as in SDXL
        addition_time_embed_dim=addition_time_embed_dim,
        # six micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_hidden,
        norm_num_groups=32,
    ))
    vae = AutoencoderKL(
        block_out_channels=tuple(vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        norm_num_groups=min(32, *vae_channels),
        sample_size=sample_size * 2 ** (len(vae_channels) - 1),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
    }


def build_tiny_sdxl(seed: int = 0, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))


def save_tiny_sdxl(path: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Saves a tiny SDXL so that ``StableDiffusionXLPipeline.from_pretrained(path)`` runs offline."""
    path = Path(path)
    build_tiny_sdxl(seed, **kwargs).save_pretrained(path)
    return path


# The published configs of SDXL base's VAE and scheduler (the UNet's and text encoders' are in dreambooth_moslora.sdxl).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, force_upcast=True,
)
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", prediction_type="epsilon",
)


def save_full_size_sdxl(path: str | os.PathLike, seed: int = 0, words=DEFAULT_WORDS, device: str = "cpu") -> Path:
    """SDXL base's real architecture with random weights, as a diffusers folder (~8.5 GB): the real
    layer names, sizes and memory without the hub. Builds one model at a time (peak about 11 GB of RAM);
    `device="cuda"` draws the random weights on a GPU (seconds instead of minutes)."""
    import gc

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_moslora.safe_files import atomic_path
    from dreambooth_moslora.sdxl import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG

    tokenizer = build_tokenizer(words)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos)
    builders = {
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG, **ids)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG, **ids)),
    }
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.0.0",
             "force_zeros_for_empty_prompt": True}
    with atomic_path(path, directory=True) as tmp:
        torch.manual_seed(seed)
        for name, build in builders.items():
            # UNet and VAE in fp16 (half the size); text encoders in fp32: transformers keeps a checkpoint's dtype,
            # diffusers makes fp32, and a plain from_pretrained must give parts that multiply
            with torch.device(device):
                model = build().to(torch.float16 if name in ("unet", "vae") else torch.float32)
            model.save_pretrained(tmp / name)
            library = "diffusers" if name in ("unet", "vae") else "transformers"
            index[name] = [library, type(model).__name__]
            del model
            gc.collect()
        EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer.save_pretrained(tmp / name)
            index[name] = ["transformers", "CLIPTokenizer"]
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return Path(path)
