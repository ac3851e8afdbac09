"""--profile_steps: what a training step dispatches and waits for, counted on the CPU, so a step that starts waiting
on the device again (an .item(), an `if` on a tensor, a tensor made on the host) fails here without a GPU."""

import gc
import json

import torch

from dreambooth_moslora.training import main
from dreambooth_moslora.training.profiling import StepProfile

from .conftest import argv


def test_a_training_step_reads_nothing_from_the_device_and_makes_nothing_on_the_host(world, tmp_path):
    out = tmp_path / "out"
    code = main(argv(world, out, "--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images", "4",
                     "--class_inference_steps", "2", "--cache_latents", "--snr_gamma", "5", "--noise_offset", "0.05",
                     "--profile_steps", "4", "--logging_steps", "4", "--output_formats", "native", steps=8))
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["batches"] == 4
    assert profile["scalar_reads_per_batch"] == 0  # no .item(), float(loss) or `if` on a tensor in a step
    assert profile["loss_reads_per_batch"] == 0.25  # the losses are read once every --logging_steps 4
    assert profile["host_tensors_per_batch"] == 0, profile["host_tensors_made_at"]
    assert profile["ops_per_batch"] > 5000  # the whole UNet's forward and backward were in the window
    # what lived after the first step was frozen out of the full collections for the run, and given back after it
    assert profile["frozen_objects"] > 10_000 and gc.get_freeze_count() == 0
    assert (out / "profile-trace.json").stat().st_size > 0
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 9))  # every step logged, four at a time


def test_the_profile_counts_what_a_careless_step_does(tmp_path):
    profile = StepProfile(steps=3, output_dir=tmp_path, after=1)
    weight = torch.ones(3, requires_grad=True)
    for _ in range(5):
        with profile.batch():
            loss = (weight * torch.randn(3)).sum()  # a tensor made on the host
            if not torch.isfinite(loss):  # a read of a device value
                break
            loss.backward()
            gc.collect()  # a full collection: a stall
    summary = profile.close()
    assert summary["batches"] == 3 and json.loads((tmp_path / "profile.json").read_text()) == summary
    assert summary["scalar_reads_per_batch"] == 1
    assert summary["host_tensors_per_batch"] == 1
    assert summary["full_collections_per_batch"] == 1 and summary["full_collection_ms_per_batch"] > 0
    assert list(summary["host_tensors_made_at"]) == [f"test_profiling.py:{_line_of('torch.randn(3)')} torch.randn"]


def _line_of(text: str) -> int:
    lines = open(__file__, encoding="utf-8").read().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if text in line and "_line_of" not in line)
