"""The MoSLoRA layer on its own: the math, the modes, merging, gradients and dtypes."""

import math

import pytest
import torch
from torch import nn

from dreambooth_moslora import AdapterConfig, AdapterError, MoSLoRALinear


def make_layer(mixer="learned", mixer_init="kaiming", rank=4, alpha=6.0, in_f=24, out_f=16, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    layer = MoSLoRALinear(base, AdapterConfig(rank=rank, alpha=alpha, mixer=mixer, mixer_init=mixer_init, **kw))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def test_initialization_follows_diffusers_and_the_paper():
    assert torch.count_nonzero(MoSLoRALinear(nn.Linear(64, 16), AdapterConfig(rank=8)).lora_B) == 0
    torch.manual_seed(0)
    gaussian = MoSLoRALinear(nn.Linear(2048, 640), AdapterConfig(rank=8)).lora_A  # the default, as PEFT's "gaussian"
    assert abs(float(gaussian.detach().std()) - 1 / 8) < 0.01 and abs(float(gaussian.detach().mean())) < 0.01
    layer = make_layer(rank=8, in_f=64, lora_init="kaiming")
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert layer.lora_M.abs().max() <= 1 / math.sqrt(8)
    orthogonal = make_layer(mixer_init="orthogonal", rank=8).lora_M
    torch.testing.assert_close(orthogonal @ orthogonal.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(make_layer(mixer_init="identity").lora_M, torch.eye(4))


def test_zero_up_matrix_means_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = MoSLoRALinear(base, AdapterConfig(rank=4))
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_output_is_base_plus_scaled_b_m_a():
    layer = make_layer(alpha=6.0, rank=4)
    x = torch.randn(5, 7, 24)
    delta = (6.0 / 4) * layer.lora_B @ layer.lora_M @ layer.lora_A
    expected = layer.base_layer(x) + x @ delta.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_identity_mixer_equals_plain_lora():
    mos = make_layer(mixer_init="identity", mixer="learned")
    lora = make_layer(mixer="none")
    with torch.no_grad():
        lora.lora_A.copy_(mos.lora_A)
        lora.lora_B.copy_(mos.lora_B)
    x = torch.randn(4, 24)
    torch.testing.assert_close(mos(x), lora(x), atol=1e-7, rtol=0)
    assert lora.lora_M is None and "lora_M" not in dict(lora.named_parameters())


def test_plain_lora_mode_matches_peft_lora():
    peft = pytest.importorskip("peft")
    layer = make_layer(mixer="none", alpha=12.0, rank=4)
    base = nn.Sequential(nn.Linear(24, 16))
    base[0].load_state_dict(layer.base_layer.state_dict())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12.0, target_modules=["0"]))
    peft_layer = model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(6, 24)
    torch.testing.assert_close(layer(x), model(x), atol=1e-6, rtol=0)


def test_merge_equals_live_and_unmerge_restores_the_base():
    layer = make_layer()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 24)
    live = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), live, atol=1e-6, rtol=0)
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge()
    assert (layer.base_layer.weight - original).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), live, atol=1e-6, rtol=0)


def test_scale_and_enable():
    layer = make_layer()
    x = torch.randn(4, 24)
    base, full = layer.base_layer(x), layer(x)
    layer.scale = 0.5
    torch.testing.assert_close(layer(x), base + 0.5 * (full - base), atol=1e-6, rtol=0)
    layer.scale = 0.0
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)
    layer.scale = 1.0
    layer.enabled = False
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)
    layer.enabled = True
    layer.merge()
    layer.scale = 0.5  # changing the scale of a merged layer re-merges at the new scale
    torch.testing.assert_close(layer(x), base + 0.5 * (full - base), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mixer", ["learned", "frozen", "none"])
def test_gradients_reach_the_trainable_matrices(mixer):
    layer = make_layer(mixer=mixer)
    layer(torch.randn(8, 24)).pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    if mixer == "learned":
        assert layer.lora_M.requires_grad and layer.lora_M.grad.abs().sum() > 0
    elif mixer == "frozen":
        assert not layer.lora_M.requires_grad and layer.lora_M.grad is None
    else:
        assert layer.lora_M is None
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"} | ({"lora_M"} if mixer == "learned" else set())


def test_mixer_gradient_matches_finite_differences():
    layer = make_layer(alpha=3.0).double()
    x = torch.randn(5, 24, dtype=torch.float64)
    layer(x).sin().sum().backward()
    grad = layer.lora_M.grad.clone()
    eps = 1e-6
    with torch.no_grad():
        layer.lora_M[1, 2] += eps
        up = layer(x).sin().sum()
        layer.lora_M[1, 2] -= 2 * eps
        down = layer(x).sin().sum()
    assert abs((up - down) / (2 * eps) - grad[1, 2]) < 1e-6


def test_no_activation_is_saved_for_the_mixer():
    """The mixer must cost what LoRA costs: what autograd keeps grows with the batch exactly as for LoRA."""

    def saved_bytes(layer, batch):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(torch.randn(batch, 24)).sum()
        return sum(sizes)

    def per_sample(layer):  # the activation part: weights saved once cancel out
        return (saved_bytes(layer, 128) - saved_bytes(layer, 64)) / 64

    mos, lora = make_layer(mixer="learned"), make_layer(mixer="none")
    assert per_sample(mos) == per_sample(lora) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_adapter(dtype):
    layer = make_layer()
    reference = make_layer()
    layer.base_layer.to(dtype)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 24)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(x), atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_M.grad.dtype == torch.float32
    layer.merge()
    assert layer.base_layer.weight.dtype == dtype


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(32, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=-1.0), "alpha"),
        (dict(mixer="bogus"), "unknown mixer"),
        (dict(mixer_init="xavier"), "unknown mixer_init"),
        (dict(lora_init="zeros"), "unknown lora_init"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        AdapterConfig(**kwargs)


def test_only_linear_layers_are_wrapped():
    with pytest.raises(AdapterError, match="nn.Linear"):
        MoSLoRALinear(nn.Conv2d(3, 3, 1), AdapterConfig())
