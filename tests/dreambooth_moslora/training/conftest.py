"""What the trainer's tests share: a tiny SDXL and subject on disk, the trainer's arguments, a fresh accelerate,
and the one-line error of a refused command line."""

import pytest

from dreambooth_moslora.training.options import parse_args

from toyworld.tiny_sdxl import save_tiny_sdxl
from toyworld.world import write_subject

PROMPT = "a sks circle"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    model = save_tiny_sdxl(root / "random-sdxl", seed=0)
    subject = root / "subject"
    write_subject(subject, count=5, size=64)
    return {"model": model, "subject": subject, "root": root}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def argv(world, output_dir, *extra, steps=6):
    return [
        "--pretrained_model_name_or_path", str(world["model"]), "--instance_data_dir", str(world["subject"]),
        "--instance_prompt", PROMPT, "--caption_extension", ".txt", "--resolution", "64",
        "--train_batch_size", "2", "--max_train_steps", str(steps), "--output_dir", str(output_dir),
        "--report_to", "none", "--seed", "0", *extra,
    ]




@pytest.fixture
def base_argv(tmp_path):
    """A command line for a hub model that is never loaded: for options that fail or parse before any model."""
    instance = tmp_path / "dog"
    instance.mkdir()
    return [
        "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0",
        "--instance_data_dir", str(instance), "--instance_prompt", "a photo of sks dog",
        "--output_dir", str(tmp_path / "out"),
    ]


def error_of(argv, capsys) -> str:
    """The one error line of a command line that parsing refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_dreambooth.py: error:")]
    assert len(lines) == 1
    return lines[0]
