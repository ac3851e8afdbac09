"""--use_ema: the average of the adapter's weights is the adapter, the live weights beside it; exact resume."""

import torch
from safetensors.torch import load_file

from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.training import main
from dreambooth_moslora.training.ema import AdapterEMA

from .conftest import argv

EMA = ("--use_ema", "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--output_formats", "native", "kohya")


def test_the_average_follows_diffusers_decay_and_swaps_back_exactly():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([weight], decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 30):
        with torch.no_grad():
            weight.add_(1.0)
        ema.update()
        d = min(0.9, (1 + (step - 1)) / (10 + (step - 1)))  # diffusers' EMAModel: 0.1 at the first step, then up to 0.9
        expected = d * expected + (1 - d) * weight.detach()
        assert torch.allclose(ema.shadow[0], expected, rtol=1e-6), step
    live = weight.detach().clone()
    with ema.swapped():
        assert torch.equal(weight.detach(), ema.shadow[0])
    assert torch.equal(weight.detach(), live)
    warm = AdapterEMA([weight], decay=0.999, warmup=True)
    assert warm.decay_at(1) == 0.0 and 0.99 < warm.decay_at(10_000) <= 0.999


def test_decay_zero_saves_exactly_the_live_weights(world, tmp_path):
    out = tmp_path / "run"
    assert main(argv(world, out, *EMA, "--ema_decay", "0", steps=3)) == 0
    average, live = load_file(out / "moslora_adapter.safetensors"), load_file(out / "moslora_adapter_live.safetensors")
    assert average.keys() == live.keys() and all(torch.equal(average[k], live[k]) for k in live)
    assert (out / "pytorch_lora_weights_kohya_live.safetensors").is_file()


def test_the_average_is_saved_and_resumes_bit_exactly(world, tmp_path):
    out = tmp_path / "run"
    assert main(argv(world, out, *EMA, "--ema_decay", "0.9", steps=4)) == 0
    names = ("moslora_adapter.safetensors", "moslora_adapter_live.safetensors")
    finished = [load_file(out / n) for n in names]
    assert any(not torch.equal(finished[0][k], finished[1][k]) for k in finished[0])  # the average is not the weights
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
    for name in names:
        (out / name).unlink()
    assert main(argv(world, out, *EMA, "--ema_decay", "0.9", "--resume_from_checkpoint", str(out / "checkpoint-2"),
                     steps=4)) == 0
    for before, name in zip(finished, names):
        again = load_file(out / name)
        assert all(torch.equal(before[k], again[k]) for k in before), name
    _, metadata = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert metadata["ss_use_ema"] == "True" and metadata["ss_ema_decay"] == "0.9"
