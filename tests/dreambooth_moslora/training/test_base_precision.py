"""--base_precision: frozen weights stored in fp8 (or bf16/fp16) and upcast layer by layer; what it trains reloads."""

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
from torch import nn

from dreambooth_moslora import load_adapter
from dreambooth_moslora.sdxl import sdxl_forward
from dreambooth_moslora.training import main
from dreambooth_moslora.training.base_precision import FP8, StoredConv2d, StoredLinear, store_weights
from dreambooth_moslora.training.models import load_base_model

from .conftest import argv


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp8_layers_keep_a_scale_per_channel_and_compute_close_to_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 32))
    with torch.no_grad():
        model[2].weight[:4] *= 1e-3  # small channels: where an unscaled cast to e4m3 loses most
    model.requires_grad_(False)
    x = torch.randn(2, 8, 4, 4)
    expected = model(x)
    small = model[2].weight[:4].clone()
    saved = store_weights(model, FP8, torch.float32)
    assert isinstance(model[0], StoredConv2d) and isinstance(model[2], StoredLinear)
    assert model[0].weight.dtype == model[2].weight.dtype == FP8
    assert saved == (model[0].weight.numel() + model[2].weight.numel()) * 3  # 4 bytes each became 1
    assert model[0].bias.dtype == torch.float32  # biases stay in the compute dtype
    assert relative_error(model(x), expected) < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3% per weight
    upcast = model[2].weight[:4].float() * model[2].weight_scale[:4]
    assert relative_error(upcast, small) < 0.05
    assert relative_error(small.to(FP8).float(), small) > 0.2  # kohya's unscaled cast, for comparison


def test_the_base_model_loads_with_its_frozen_weights_in_fp8(world):
    base = load_base_model(str(world["model"]), None, None, None, "cpu", torch.float32, "fp8")
    for model in (base.unet, *base.text_encoders):
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(m.weight.dtype == FP8 for m in layers)
        assert all(isinstance(m, (StoredLinear, StoredConv2d)) for m in layers)
    norms = [m for m in base.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert base.vae.dtype == torch.float32  # the VAE is not stored low


def test_training_on_an_fp8_base_reloads_on_a_bf16_base_within_fp8s_error(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--base_precision", "fp8", "--learning_rate", "1e-2", "--output_formats", "native",
                     steps=6)) == 0
    adapter = out / "moslora_adapter.safetensors"
    assert max(t.abs().max().item() for k, t in load_file(adapter).items() if k.endswith("moslora_B")) > 1e-3

    def pipeline(dtype=torch.float32, fp8=False, adapted=True):
        pipe = StableDiffusionXLPipeline.from_pretrained(world["model"], torch_dtype=dtype)
        if fp8:  # the model as training saw it
            for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
                store_weights(model.requires_grad_(False), FP8, torch.float32)
        if adapted:
            load_adapter(pipe, adapter)
        return sdxl_forward(pipe, "a sks circle")["noise_prediction"]

    expected = pipeline(fp8=True)
    reloaded = pipeline(torch.bfloat16)
    fp8_error = relative_error(pipeline(fp8=True, adapted=False), pipeline(adapted=False))  # the base model's alone
    assert 0.01 < fp8_error < 0.15
    assert relative_error(reloaded, expected) < 1.2 * fp8_error + 0.02  # fp8's error (and bf16's), no more
    assert relative_error(pipeline(adapted=False), expected) > relative_error(reloaded, expected)  # it learned more
