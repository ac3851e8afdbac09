"""The three files: what they hold, and that every way of loading them reproduces the live adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora import (
    AdapterConfig,
    adapter_layers,
    inject_components,
    load_adapter,
    pipeline_components,
    read_adapter,
    save_adapter,
    set_scale,
    unload_adapter,
)
from dreambooth_moslora.formats import read_safetensors, sgm_unet_path
from dreambooth_moslora.sdxl import sdxl_forward
from toyworld.tiny_sdxl import build_tiny_sdxl

from tests.conftest import PROMPT, randomize_adapter_

TOLERANCE = 1e-5  # fp32, the project's promise


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SDXL with a random non-zero MoSLoRA (alpha ≠ rank) on UNet and both text encoders."""
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    torch.manual_seed(0)
    inject_components(components, AdapterConfig(rank=4, alpha=7.0, mixer="learned"))
    randomize_adapter_(components)
    live = sdxl_forward(pipe, PROMPT, seed=3)
    out = tmp_path_factory.mktemp("adapter")
    files = save_adapter(out, components, base_model="random-sdxl", training={"max_train_steps": 10})
    return {"pipe": pipe, "live": live, "files": files, "dir": out}


def assert_reproduces(live, got):
    # prompt_embeds holds both encoders' hidden states side by side: check each half on its own
    width = live["prompt_embeds"].shape[-1] // 2
    parts = {
        "text_encoder": (live["prompt_embeds"][..., :width], got["prompt_embeds"][..., :width]),
        "text_encoder_2": (live["prompt_embeds"][..., width:], got["prompt_embeds"][..., width:]),
        "pooled (text_encoder_2)": (live["pooled_prompt_embeds"], got["pooled_prompt_embeds"]),
        "unet": (live["noise_prediction"], got["noise_prediction"]),
    }
    for name, (a, b) in parts.items():
        diff = float((a - b).abs().max())
        assert diff <= TOLERANCE, f"{name} differs by {diff:.2e}"


def test_the_adapter_changes_every_output(saved):
    base = sdxl_forward(build_tiny_sdxl(seed=0), PROMPT, seed=3)
    for key in base:
        assert float((base[key] - saved["live"][key]).abs().max()) > 1e-3, key


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
@pytest.mark.parametrize("fuse", [False, True], ids=["live", "fused"])
def test_load_adapter_reproduces_the_live_adapter(saved, fmt, fuse):
    pipe = build_tiny_sdxl(seed=0)
    adapter = load_adapter(pipe, saved["files"][fmt], fuse=fuse)
    assert adapter.format == fmt
    assert_reproduces(saved["live"], sdxl_forward(pipe, PROMPT, seed=3))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_stock_diffusers_load_lora_weights_reproduces_the_live_adapter(saved, fmt):
    pytest.importorskip("peft")
    pipe = build_tiny_sdxl(seed=0)
    pipe.load_lora_weights(str(saved["dir"]), weight_name=saved["files"][fmt].name)
    assert_reproduces(saved["live"], sdxl_forward(pipe, PROMPT, seed=3))


def test_diffusers_file_holds_only_keys_stock_diffusers_reads(saved):
    tensors = load_file(saved["files"]["diffusers"])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(tensors) == 2 * (136 + 12 + 12)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.2.self_attn.v_proj.lora_A.weight" in tensors
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight" in tensors


def test_kohya_file_uses_sgm_names_alpha_and_ss_metadata(saved):
    tensors, metadata = read_safetensors(saved["files"]["kohya"])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight" in tensors
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == 160 and all(a.ndim == 0 and float(a) == 7.0 for a in alphas)
    assert not any("down_blocks" in k or "mid_block" in k for k in tensors)  # one layout only
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "7"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_max_train_steps"] == "10"


def test_sgm_names_of_the_full_size_sdxl_unet():
    assert sgm_unet_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_unet_path("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert sgm_unet_path("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v", 2) == (
        "output_blocks.2.1.transformer_blocks.9.attn2.to_v"
    )
    assert sgm_unet_path("up_blocks.1.attentions.0.proj_out", 2) == "output_blocks.3.1.proj_out"
    assert sgm_unet_path("mid_block.attentions.0.transformer_blocks.3.attn1.to_k", 2) == (
        "middle_block.1.transformer_blocks.3.attn1.to_k"
    )
    assert sgm_unet_path("time_embedding.linear_1", 2) is None


def test_native_file_keeps_a_m_b_and_the_settings(saved):
    tensors, metadata = read_safetensors(saved["files"]["native"])
    assert metadata["format"] == "dreambooth-moslora" and metadata["format_version"] == "1"
    assert json.loads(metadata["adapter_config"]) == {
        "rank": 4, "alpha": 7.0, "mixer": "learned", "mixer_init": "kaiming", "dropout": 0.0, "lora_init": "gaussian",
    }
    assert metadata["base_model"] == "random-sdxl"
    assert json.loads(metadata["training"]) == {"max_train_steps": 10}
    assert len(json.loads(metadata["targets"])["unet"]) == 136
    assert all(t.startswith("text_model.") for t in json.loads(metadata["targets"])["text_encoder"])
    for component, model in pipeline_components(saved["pipe"]).items():
        for path, layer in adapter_layers(model).items():
            # text-encoder layers are written under text_model., whatever the transformers version
            known = path.startswith(("text_model", "down", "mid", "up"))
            key = f"{component}.{path if known else 'text_model.' + path}"
            for part in "ABM":
                assert torch.equal(tensors[f"{key}.moslora_{part}"], getattr(layer, f"lora_{part}"))


@pytest.mark.parametrize("mixer", ["learned", "frozen", "none"])
def test_native_reload_is_a_trainable_adapter_of_the_same_mode(tmp_path, mixer):
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    inject_components(components, AdapterConfig(rank=2, alpha=3.0, mixer=mixer, mixer_init="orthogonal"))
    randomize_adapter_(components)
    files = save_adapter(tmp_path, components, formats=["native"])
    assert set(files) == {"native"} and sorted(p.name for p in tmp_path.iterdir()) == [files["native"].name]
    fresh = build_tiny_sdxl(seed=0)
    adapter = load_adapter(fresh, files["native"])
    assert adapter.config == AdapterConfig(rank=2, alpha=3.0, mixer=mixer, mixer_init="orthogonal")
    for c, model in pipeline_components(fresh).items():
        reloaded, original = adapter_layers(model), adapter_layers(components[c])
        assert reloaded.keys() == original.keys()
        for path, layer in reloaded.items():
            assert layer.config.mixer == mixer and layer.alpha == 3.0
            assert torch.equal(layer.lora_A, original[path].lora_A)
            assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
            if mixer == "none":
                assert layer.lora_M is None
            else:
                assert torch.equal(layer.lora_M, original[path].lora_M)
                assert layer.lora_M.requires_grad == (mixer == "learned")


def test_scale_and_unload(saved):
    pipe = build_tiny_sdxl(seed=0)
    base = sdxl_forward(pipe, PROMPT, seed=3)
    load_adapter(pipe, saved["files"]["native"], scale=0.0)
    assert_reproduces(base, sdxl_forward(pipe, PROMPT, seed=3))
    load_adapter(pipe, saved["files"]["kohya"], scale=1.0)  # replaces the first one
    assert_reproduces(saved["live"], sdxl_forward(pipe, PROMPT, seed=3))
    set_scale(pipe, 0.5)
    half = sdxl_forward(pipe, PROMPT, seed=3)["noise_prediction"]
    full, none = saved["live"]["noise_prediction"], base["noise_prediction"]
    assert (half - full).abs().max() > 1e-4 and (half - none).abs().max() > 1e-4
    assert unload_adapter(pipe) == 160  # loaded twice, unloaded once: nothing left behind
    assert_reproduces(base, sdxl_forward(pipe, PROMPT, seed=3))
    assert not any(adapter_layers(m) for m in pipeline_components(pipe).values())


def test_read_adapter_reports_format_and_config(saved):
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    for fmt, path in saved["files"].items():
        adapter = read_adapter(path, components)
        assert adapter.format == fmt
        assert adapter.config.rank == 4
        assert sum(len(v) for v in adapter.layers.values()) == 160
    assert read_adapter(saved["files"]["kohya"], components).config.alpha == 7.0
    # the diffusers file carries α/r inside lora_B: its own alpha is the rank
    assert read_adapter(saved["files"]["diffusers"], components).config.alpha == 4.0


def test_the_recorded_noise_schedule_reads_our_settings_and_sd_scripts_keys():
    from dreambooth_moslora.formats import recorded_schedule

    ours = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert recorded_schedule(ours, {}) == ours
    kohya = {"modelspec.prediction_type": "v", "ss_zero_terminal_snr": "True"}
    assert recorded_schedule({}, kohya) == ours
    assert recorded_schedule({}, {"ss_v_parameterization": "False"}) == {"prediction_type": "epsilon"}
    assert recorded_schedule({}, {}) == {}  # an older file says nothing: the base model's own schedule applies
