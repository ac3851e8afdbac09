"""Finding SDXL targets, injecting, removing and fusing."""

import pytest
import torch
from torch import nn

from dreambooth_moslora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    AdapterConfig,
    AdapterError,
    MoSLoRALinear,
    adapter_layers,
    find_targets,
    fuse_adapter,
    inject_adapter,
    inject_components,
    pipeline_components,
    remove_adapter,
)
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
from dreambooth_moslora.sdxl import meta_components

from tests.conftest import PROMPT, randomize_adapter_


def test_full_size_sdxl_target_counts_on_meta_device():
    layout = meta_components()
    unet, clip_l, clip_g = layout["unet"], layout["text_encoder"], layout["text_encoder_2"]
    assert len(find_targets(unet, UNET_TARGETS)) == 560
    assert len(find_targets(clip_l, TEXT_ENCODER_TARGETS)) == 48
    assert len(find_targets(clip_g, TEXT_ENCODER_TARGETS)) == 128
    params = inject_adapter(unet, AdapterConfig(rank=4, mixer="learned"))
    assert len(params) == 560 * 3  # A, M and B of every layer
    layer = adapter_layers(unet)["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"]
    assert (layer.in_features, layer.out_features, layer.lora_A.device.type) == (2048, 1280, "meta")


def test_inject_returns_trainable_parameters_per_mode(tiny_pipe):
    unet = tiny_pipe.unet
    n_layers = len(find_targets(unet, UNET_TARGETS))
    for mixer, per_layer in (("learned", 3), ("frozen", 2), ("none", 2)):
        params = inject_adapter(unet, AdapterConfig(rank=2, mixer=mixer))
        assert len(params) == n_layers * per_layer and all(p.requires_grad for p in params)
        assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
        remove_adapter(unet)


def test_refuses_to_inject_twice(tiny_pipe):
    inject_adapter(tiny_pipe.unet, AdapterConfig())
    with pytest.raises(AdapterError, match="already carries"):
        inject_adapter(tiny_pipe.unet, AdapterConfig())
    with pytest.raises(AdapterError, match="already carries"):
        inject_components(pipeline_components(tiny_pipe), AdapterConfig())
    assert not adapter_layers(tiny_pipe.text_encoder)  # the refusal touched no other model


def test_remove_restores_the_original_modules(tiny_pipe):
    unet = tiny_pipe.unet
    originals = {name: m for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    keys = set(unet.state_dict())
    before = sdxl_forward(tiny_pipe, PROMPT)
    components = pipeline_components(tiny_pipe)
    inject_components(components, AdapterConfig(rank=4))
    randomize_adapter_(components)
    assert max_abs_diff(before, sdxl_forward(tiny_pipe, PROMPT)) > 1e-3
    assert sum(remove_adapter(m) for m in components.values()) == 136 + 12 + 12
    assert {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)} == originals
    assert set(unet.state_dict()) == keys
    assert max_abs_diff(before, sdxl_forward(tiny_pipe, PROMPT)) == 0.0


def test_extra_targets_by_name_pattern(tiny_pipe):
    unet = tiny_pipe.unet
    inject_adapter(unet, AdapterConfig(), extra_targets=[r"\.ff\.net\.2$", r"proj_in$"])
    names = set(adapter_layers(unet))
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in names
    assert "mid_block.attentions.0.proj_in" in names
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    with pytest.raises(AdapterError, match="no nn.Linear layer"):
        inject_adapter(tiny_pipe.text_encoder, AdapterConfig(), targets=[r"nothing_like_this"])


def test_fuse_then_remove(adapted_pipe):
    components = pipeline_components(adapted_pipe)
    live = sdxl_forward(adapted_pipe, PROMPT)
    for model in components.values():
        fuse_adapter(model)
        assert not adapter_layers(model)
        assert not any(isinstance(m, MoSLoRALinear) for m in model.modules())
    assert max_abs_diff(live, sdxl_forward(adapted_pipe, PROMPT)) <= 1e-5
    for model in components.values():
        remove_adapter(model)
    base = sdxl_forward(adapted_pipe, PROMPT)
    assert max_abs_diff(live, base) > 1e-3
    # the base weights are back to what they were
    fresh = type(adapted_pipe)(**{k: v for k, v in adapted_pipe.components.items()})
    assert max_abs_diff(base, sdxl_forward(fresh, PROMPT)) == 0.0


def test_adapter_weights_stay_fp32_on_a_half_model(tiny_pipe):
    unet = tiny_pipe.unet.to(torch.bfloat16)
    params = inject_adapter(unet, AdapterConfig())
    assert {p.dtype for p in params} == {torch.float32}
