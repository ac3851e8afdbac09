"""What the trainer's tests share: a tiny SDXL and subject on disk, the trainer's arguments, a fresh accelerate."""

import pytest

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


