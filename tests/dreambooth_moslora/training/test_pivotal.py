"""Pivotal tuning in the trainer: new tokens for --token_abstraction learn beside the adapter for the first
--train_text_encoder_ti_frac of the steps, are saved as an SDXL embedding, and resume exactly."""

import json

import torch
from safetensors.torch import load_file

from dreambooth_moslora.embeddings import read_embeddings
from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.training import main

from .conftest import argv

PIVOTAL = ("--train_text_encoder_ti", "--token_abstraction", "sks", "--learning_rate", "1e-3", "--text_encoder_lr",
           "1e-2", "--checkpointing_steps", "2", "--output_formats", "native", "diffusers")  # fmt: skip


def test_new_tokens_learn_for_their_share_of_the_steps_and_are_saved(world, tmp_path):
    out = tmp_path / "run"
    assert main(argv(world, out, *PIVOTAL, "--train_text_encoder_ti_frac", "0.5",
                     "--validation_prompt", "a sks circle on a gray background", steps=4)) == 0  # fmt: skip
    rows, new = read_embeddings(out / "run_emb.safetensors")
    assert new.abstractions == {"sks": ("<s0>", "<s1>")} and rows["clip_l"].shape[0] == rows["clip_g"].shape[0] == 2
    halfway, _ = read_embeddings(out / "checkpoint-2" / "embeddings.safetensors")
    assert all(torch.equal(rows[k], halfway[k]) for k in rows)  # frozen after half of the 4 steps
    never = tmp_path / "never"
    assert main(argv(world, never, *PIVOTAL, "--train_text_encoder_ti_frac", "0", steps=4)) == 0
    start, _ = read_embeddings(never / "never_emb.safetensors")  # the seeded start, never trained
    assert all(not torch.equal(rows[k], start[k]) for k in rows)  # the tokens learned in the first half
    _, metadata = read_safetensors(out / "moslora_adapter.safetensors")
    training = json.loads(metadata["training"])
    assert training["instance_prompt"] == "a <s0><s1> circle" and training["new_tokens"] == ["<s0>", "<s1>"]
    assert training["validation_prompt"] == "a <s0><s1> circle on a gray background"
    card = (out / "README.md").read_text()
    assert "run_emb.safetensors" in card and "load_textual_inversion(emb[\"clip_g\"], token=['<s0>', '<s1>']" in card


def test_a_resumed_run_ends_with_the_same_tokens_and_adapter(world, tmp_path):
    out = tmp_path / "run"
    assert main(argv(world, out, *PIVOTAL, steps=4)) == 0
    finished = load_file(out / "moslora_adapter.safetensors"), load_file(out / "run_emb.safetensors")
    for name in ("moslora_adapter.safetensors", "run_emb.safetensors"):
        (out / name).unlink()
    assert main(argv(world, out, *PIVOTAL, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=4)) == 0
    again = load_file(out / "moslora_adapter.safetensors"), load_file(out / "run_emb.safetensors")
    for a, b in zip(finished, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_instance_prompt_without_the_abstraction_is_one_line(world, tmp_path, capsys):
    assert main(argv(world, tmp_path / "out", "--train_text_encoder_ti", "--token_abstraction", "TOK", steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --instance_prompt 'a sks circle' does not name TOK") and "Traceback" not in "".join(err)
