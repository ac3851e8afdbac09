"""Checkpoints a kill cannot corrupt: rotation renames before deleting; a resume skips incomplete folders,
cleans leftovers of killed runs, and refuses an incomplete checkpoint named on the command line with one line."""

import torch
from safetensors.torch import load_file

from dreambooth_moslora.training import main
from dreambooth_moslora.training.checkpoints import checkpoint_dirs, clean_leftovers

from .conftest import argv


def test_leftovers_of_killed_runs_are_found_and_removed(tmp_path):
    (tmp_path / ".checkpoint-6.partial").mkdir()
    (tmp_path / ".checkpoint-2.deleting").mkdir()
    (tmp_path / ".pytorch_lora_weights.safetensors.partial").write_bytes(b"half")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "moslora_adapter.safetensors").write_bytes(b"x")
    (tmp_path / "loss.csv").write_text("step,loss,lr\n")
    removed = clean_leftovers(tmp_path)
    assert sorted(removed) == [".checkpoint-2.deleting", ".checkpoint-6.partial",
                               ".pytorch_lora_weights.safetensors.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "loss.csv"]


def test_resume_skips_incomplete_checkpoints_and_cleans_leftovers(world, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    common = ("--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--output_formats", "native",
              "--learning_rate", "1e-3")
    assert main(argv(world, out, *common, steps=5)) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
    finished = load_file(out / "moslora_adapter.safetensors")

    # what a kill during rotation left before: a checkpoint folder holding only scheduler.bin
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "scheduler.bin").write_bytes(b"\0")
    (out / ".moslora_adapter.safetensors.partial").write_bytes(b"half a file")
    (out / ".checkpoint-6.deleting").mkdir()
    (out / "moslora_adapter.safetensors").unlink()
    assert main(argv(world, out, *common, "--resume_from_checkpoint", "latest", steps=5)) == 0
    again = load_file(out / "moslora_adapter.safetensors")  # resumed from checkpoint-4, not 9
    assert again.keys() == finished.keys() and all(torch.equal(again[k], finished[k]) for k in finished)
    assert "ignoring 1 incomplete checkpoint folder(s)" in caplog.text and "checkpoint-9" in caplog.text
    assert "leftover" in caplog.text
    assert not (out / ".moslora_adapter.safetensors.partial").exists() and not (out / ".checkpoint-6.deleting").exists()

    capsys.readouterr()
    assert main(argv(world, out, *common, "--resume_from_checkpoint", str(out / "checkpoint-9"), steps=5)) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "not a complete checkpoint" in error[-1]
