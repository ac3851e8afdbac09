"""Pivotal tuning in the trainer: new tokens for --token_abstraction learn beside the adapter for the first
--train_text_encoder_ti_frac of the steps, are saved as an SDXL embedding, and resume exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora.embeddings import read_embeddings
from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.training import main

from .conftest import argv

PIVOTAL = ("--train_text_encoder_ti", "--token_abstraction", "sks", "--learning_rate", "1e-3", "--text_encoder_lr",
           "1e-2", "--checkpointing_steps", "2", "--output_formats", "native", "diffusers")


def test_new_tokens_learn_for_their_share_of_the_steps_and_are_saved(world, tmp_path):
    out = tmp_path / "run"
    assert main(argv(world, out, *PIVOTAL, "--train_text_encoder_ti_frac", "0.5",
                     "--validation_prompt", "a sks circle on a gray background", steps=4)) == 0
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
    assert err[-1].startswith("error: --instance_prompt 'a sks circle' does not name TOK")
    assert "Traceback" not in "".join(err)


def test_every_file_and_loader_draws_the_subject_alike_with_its_tokens(world, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth_moslora import load_adapter, unload_adapter
    from dreambooth_moslora.errors import AdapterFileError
    from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
    from dreambooth_moslora.tools import convert, load

    out = tmp_path / "run"
    assert main(argv(world, out, *PIVOTAL[:-3], "--output_formats", "native", "diffusers", "kohya", steps=3)) == 0
    rows, new = read_embeddings(out / "run_emb.safetensors")
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert torch.equal(kohya["bundle_emb.sks.clip_l"], rows["clip_l"])
    assert torch.equal(kohya["bundle_emb.sks.clip_g"], rows["clip_g"])
    pipe = StableDiffusionXLPipeline.from_pretrained(world["model"])
    vocabulary = len(pipe.tokenizer)
    base = sdxl_forward(pipe, "a sks circle")
    drawn = {}
    for name in ("moslora_adapter.safetensors", "pytorch_lora_weights.safetensors",
                 "pytorch_lora_weights_kohya.safetensors"):
        adapter = load_adapter(pipe, out / name)
        assert adapter.embeddings[1] == new and adapter.rewrite("a sks circle") == "a <s0><s1> circle"
        drawn[name] = sdxl_forward(pipe, adapter.rewrite("a sks circle"))
        assert max_abs_diff(drawn[name], sdxl_forward(pipe, "a <s0><s1> circle")) == 0  # the tokens, typed
        unload_adapter(pipe)
        assert len(pipe.tokenizer) == vocabulary and max_abs_diff(sdxl_forward(pipe, "a sks circle"), base) == 0
    ours = drawn["moslora_adapter.safetensors"]
    assert all(max_abs_diff(ours, other) < 1e-5 for other in drawn.values())
    assert max_abs_diff(ours, base) > 1e-3  # the adapter and the tokens do something
    # stock diffusers: its LoRA loader and its textual-inversion loader, on the diffusers file and the _emb file
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(rows[key], token=new.tokens, text_encoder=encoder, tokenizer=tokenizer)
    assert max_abs_diff(ours, sdxl_forward(pipe, "a <s0><s1> circle")) < 1e-5
    # moslora convert carries them: a kohya file's bundle becomes an _emb file beside a diffusers file
    converted = convert(load(out / "pytorch_lora_weights_kohya.safetensors", str(world["model"])), "diffusers",
                        tmp_path / "converted" / "dog.safetensors")
    assert (tmp_path / "converted" / "dog_emb.safetensors").is_file()
    fresh = StableDiffusionXLPipeline.from_pretrained(world["model"])
    assert max_abs_diff(ours, sdxl_forward(fresh, load_adapter(fresh, converted).rewrite("a sks circle"))) < 1e-5
    from dreambooth_moslora.cli import main as moslora

    for name in ("pytorch_lora_weights_kohya.safetensors", "moslora_adapter.safetensors"):
        capsys.readouterr()
        assert moslora(["inspect", str(out / name)]) == 0
        assert "new tokens: sks = <s0><s1> (write either in prompts)" in capsys.readouterr().out
    # an adapter whose embeddings went missing says so in one line, and loads nothing
    (out / "run_emb.safetensors").unlink()
    unload_adapter(fresh)
    with pytest.raises(AdapterFileError, match="trained with new tokens <s0><s1>, but their embeddings file "
                                               r"\(run_emb.safetensors\) is not beside it"):
        load_adapter(fresh, out / "moslora_adapter.safetensors")
    assert max_abs_diff(sdxl_forward(fresh, "a sks circle"), base) == 0
