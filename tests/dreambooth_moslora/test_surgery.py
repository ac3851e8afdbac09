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
    trainable_parameters,
)
from dreambooth_moslora.sdxl import max_abs_diff, meta_components, sdxl_forward
from toyworld.tiny_sdxl import build_tiny_sdxl

from tests.conftest import PROMPT, randomize_adapter_


def test_full_size_sdxl_target_counts_on_meta_device():
    layout = meta_components()
    unet, clip_l, clip_g = layout["unet"], layout["text_encoder"], layout["text_encoder_2"]
    assert len(find_targets(unet, UNET_TARGETS)) == 560
    assert len(find_targets(clip_l, TEXT_ENCODER_TARGETS)) == 48
    assert len(find_targets(clip_g, TEXT_ENCODER_TARGETS)) == 128
    params = inject_adapter(unet, AdapterConfig(rank=4, mixer="learned"))
    # every layer's A, then B and M stacked per width (640 and 1280): one tensor each, not one per layer
    assert len(params) == 560 + 2 * 2
    layers = adapter_layers(unet).values()
    assert sum(p.numel() for p in params) == sum(4 * (l.in_features + l.out_features + 4) for l in layers)
    layer = adapter_layers(unet)["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"]
    assert (layer.in_features, layer.out_features, layer.lora_A.device.type) == (2048, 1280, "meta")


def test_inject_returns_trainable_parameters_per_mode(tiny_pipe):
    unet = tiny_pipe.unet
    n_layers = len(find_targets(unet, UNET_TARGETS))
    # with a mixer, B and M are stacked in one bank for the tiny UNet's one width (M frozen: not trainable)
    for mixer, count in (("learned", n_layers + 2), ("frozen", n_layers + 1), ("none", 2 * n_layers)):
        params = inject_adapter(unet, AdapterConfig(rank=2, mixer=mixer))
        assert len(params) == count and all(p.requires_grad for p in params)
        adapter = [p for n, p in unet.named_parameters() if "lora_" in n or n.startswith("moslora_mixer_banks.")]
        assert {id(p) for p in unet.parameters()
                if p.requires_grad} == {id(p) for p in params} <= {id(p) for p in adapter}
        remove_adapter(unet)
        assert not any(p.requires_grad for p in unet.parameters()) and not hasattr(unet, "moslora_mixer_banks")


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


# ---------------------------------------------------------------- the mixer at LoRA's cost (issue 11)


def _unet_batch(unet, seed=0, batch=2):
    from dreambooth_moslora.sdxl import square_time_ids

    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                           "time_ids": square_time_ids(size * 2, batch)},
    )


def _step(unet, params, optimizer, batch):
    loss = unet(**batch).sample.square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _operations(unet, params, batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the trainer's: one call for all tensors
    _step(unet, params, optimizer, batch)  # the optimizer's state exists from here on
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(unet, params, optimizer, batch)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_a_training_step_dispatches_what_a_peft_lora_step_dispatches():
    peft = pytest.importorskip("peft")
    counts = {}
    for name in ("peft", "none", "frozen", "learned"):
        unet = build_tiny_sdxl(seed=0).unet.train()
        if name == "peft":
            unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            params = [p for p in unet.parameters() if p.requires_grad]
        else:
            params = inject_adapter(unet, AdapterConfig(rank=4, mixer=name))
        counts[name] = _operations(unet, params, _unet_batch(unet))
    assert counts["none"] <= 1.02 * counts["peft"], counts
    assert counts["learned"] <= 1.02 * counts["peft"], counts  # was 1.25× with a B·M per layer
    assert counts["frozen"] <= counts["learned"], counts


def test_batched_products_train_exactly_like_per_layer_ones():
    """Gradient checkpointing and accumulation (two forwards before a step) included."""
    unets, params = [], []
    for banked in (True, False):
        unet = build_tiny_sdxl(seed=0).unet.train()
        torch.manual_seed(0)
        inject_adapter(unet, AdapterConfig(rank=4, mixer="learned"))
        if not banked:
            from dreambooth_moslora.surgery import unbank_mixers

            unbank_mixers(unet)  # every layer its own B and M again, each computing its own B·M
        params.append(trainable_parameters(unet))
        unet.enable_gradient_checkpointing()
        unets.append(unet)
    assert len(unets[0].moslora_mixer_banks) == 1 and not hasattr(unets[1], "moslora_mixer_banks")  # all 64 wide
    optimizers = [torch.optim.AdamW(p, lr=1e-2) for p in params]
    for step in range(3):
        for unet, optimizer in zip(unets, optimizers):
            for micro in range(2):
                (unet(**_unet_batch(unet, seed=10 * step + micro)).sample.square().mean() / 2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (path, a), b in zip(adapter_layers(unets[0]).items(), adapter_layers(unets[1]).values()):
        for part in ("lora_A", "lora_B", "lora_M"):
            torch.testing.assert_close(getattr(a, part), getattr(b, part), atol=1e-6, rtol=1e-5, msg=f"{path} {part}")
    # a layer called on its own, after a (fused: no version bump) step and outside the model's forward,
    # uses its current weights
    fused = torch.optim.AdamW(trainable_parameters(unets[0]), lr=1e-2, fused=True)
    unets[0](**_unet_batch(unets[0])).sample.square().mean().backward()
    fused.step()
    layer = next(iter(adapter_layers(unets[0]).values()))
    x = torch.randn(3, layer.in_features)
    expected = layer.base_layer(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
