"""--network_weights (sd-scripts' flag): training starts from an adapter file's ΔW, exactly, from any of the three
formats and whatever the new run's --mixer and --lora_alpha."""

import pytest
import torch

from dreambooth_moslora.formats import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, read_adapter
from dreambooth_moslora.training import main

from .conftest import argv


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """An adapter with a learned mixer, α 2 at rank 4, moved well away from its start."""
    out = tmp_path_factory.mktemp("first")
    assert main(argv(world, out, "--mixer", "learned", "--lora_alpha", "2", "--learning_rate", "1e-2", steps=4)) == 0
    return out


def deltas(path) -> dict:
    adapter = read_adapter(path, None)
    return {(c, p): w.delta() for c, layers in adapter.layers.items() for p, w in layers.items()}


@pytest.mark.parametrize("file, flags", [
    (NATIVE_FILE, ("--mixer", "learned", "--lora_alpha", "2")),
    (KOHYA_FILE, ("--mixer", "learned", "--lora_alpha", "8")),  # M folded in the file: here M = I, B scaled by 2/8
    (DIFFUSERS_FILE, ("--mixer", "none", "--lora_alpha", "1")),
    (NATIVE_FILE, ("--mixer", "none",)),  # the file's M folded into B
])
def test_the_run_starts_from_the_files_update(world, trained, tmp_path, file, flags):
    out = tmp_path / "second"
    # a step of 1e-12 moves nothing visible: what is saved is where the run started
    assert main(argv(world, out, "--network_weights", str(trained / file), *flags, "--learning_rate", "1e-12",
                     "--output_formats", "native", steps=1)) == 0
    before, after = deltas(trained / NATIVE_FILE), deltas(out / NATIVE_FILE)
    assert before.keys() == after.keys()
    worst = max(float((after[k] - before[k]).abs().max() / before[k].abs().max()) for k in before)
    assert worst < 1e-5
    assert max(float(d.abs().max()) for d in before.values()) > 1e-3  # the first run did move: the check can fail


@pytest.mark.parametrize("flags, message", [
    (("--rank", "2"), "its rank is 4, this run's 2: give --rank 4"),
])
def test_a_file_that_does_not_fit_is_one_line(world, trained, tmp_path, capsys, flags, message):
    out = tmp_path / "second"
    assert main(argv(world, out, "--network_weights", str(trained / NATIVE_FILE), *flags, steps=1)) == 1
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / NATIVE_FILE).exists()


def test_text_encoder_layers_need_text_encoder_training(world, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(argv(world, first, "--train_text_encoder", "--output_formats", "native", steps=1)) == 0
    assert main(argv(world, tmp_path / "second", "--network_weights", str(first / NATIVE_FILE), steps=1)) == 1
    assert "(add --train_text_encoder)" in capsys.readouterr().err.strip().splitlines()[-1]
    assert torch.is_tensor(next(iter(deltas(first / NATIVE_FILE).values())))
