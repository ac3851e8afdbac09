"""Pivotal tuning's new tokens: installed into both text encoders, trained as rows of their own, saved as an SDXL
textual inversion that stock diffusers reads the same way, and taken out again without a trace."""

import copy
import warnings

import pytest
import torch

from dreambooth_moslora.embeddings import (
    NewTokens,
    TokenRows,
    install,
    load_embeddings,
    read_embeddings,
    save_embeddings,
    uninstall,
    unload_embeddings,
    warn_if_unused,
)
from dreambooth_moslora.errors import AdapterFileError
from dreambooth_moslora.safe_files import write_safetensors


def encoders(pipe):
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]


def embed(pipe, prompt):
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    return prompt_embeds, pooled


def test_abstractions_become_numbered_tokens_and_prompts_are_rewritten():
    new = NewTokens.plan("TOK, PET", 2)
    assert new.abstractions == {"TOK": ("<s0>", "<s1>"), "PET": ("<s2>", "<s3>")} and len(new.tokens) == 4
    assert new.rewrite("a photo of TOK with PET") == "a photo of <s0><s1> with <s2><s3>"
    assert NewTokens.plan("TOK,TOK2", 1).rewrite("TOK2 and TOK") == "<s1> and <s0>"  # the longer name first
    assert new.missing_from("a photo of TOK") == ["PET"] and new.missing_from("<s0><s1> and <s2><s3>") == []
    with pytest.raises(ValueError):
        NewTokens.plan(" , ", 2)


def test_a_new_token_with_a_words_row_encodes_as_that_word(tiny_pipe):
    """Exactness of the new rows: given the table's own row for "circle", "<s0>" conditions exactly as "circle"."""
    tokenizers, text_encoders = encoders(tiny_pipe)
    reference = embed(tiny_pipe, "a red circle on a gray background")
    ids = [tok.convert_tokens_to_ids(tok.tokenize("circle"))[0] for tok in tokenizers]
    rows = {key: te.get_input_embeddings().weight[i : i + 1].detach().clone()
            for key, te, i in zip(("clip_l", "clip_g"), text_encoders, ids)}
    tiny_pipe.tokenizer, tiny_pipe.tokenizer_2 = install(tokenizers, text_encoders, NewTokens.plan("TOK", 1), rows)
    assert tiny_pipe.tokenizer.tokenize("a red <s0> on") == ["a</w>", "red</w>", "<s0>", "on</w>"]
    assert "<s0>" not in tokenizers[0].get_vocab()  # the pipeline's own tokenizer is left as it was
    for a, b in zip(reference, embed(tiny_pipe, "a red <s0> on a gray background")):
        assert torch.equal(a, b)
    unload_embeddings(tiny_pipe)
    assert tiny_pipe.tokenizer is tokenizers[0] and tiny_pipe.tokenizer_2 is tokenizers[1]


def test_only_the_new_rows_train(tiny_pipe):
    tokenizers, text_encoders = encoders(tiny_pipe)
    for te in text_encoders:  # frozen, as the trainer has them when only the tokens train
        te.requires_grad_(False)
    extended = install(tokenizers, text_encoders, NewTokens.plan("TOK", 2), generator=torch.Generator().manual_seed(0))
    modules = [te.get_input_embeddings() for te in text_encoders]
    assert all(isinstance(te.get_input_embeddings(), TokenRows) for te in text_encoders)
    std = text_encoders[0].get_input_embeddings().table.weight.std()
    assert 0.5 < float(modules[0].rows.detach().std() / std) < 2.0  # started at the table's own scale
    trainable = [n for te in text_encoders for n, p in te.named_parameters() if p.requires_grad]
    assert all(n.endswith("token_embedding.rows") for n in trainable) and len(trainable) == 2
    ids = extended[0]("a <s0><s1> on a gray background", return_tensors="pt").input_ids
    text_encoders[0](ids).last_hidden_state.sum().backward()
    assert modules[0].rows.grad is not None and modules[0].rows.grad.abs().sum() > 0
    assert modules[0].table.weight.grad is None
    assert uninstall(text_encoders) == tokenizers


def test_the_file_round_trips_and_stock_diffusers_reads_it_the_same(tiny_pipe, tmp_path):
    tokenizers, text_encoders = encoders(tiny_pipe)
    before = embed(tiny_pipe, "a red circle on a gray background")
    vocabulary = [len(t) for t in tokenizers]
    new = NewTokens.plan("TOK", 2)
    tiny_pipe.tokenizer, tiny_pipe.tokenizer_2 = install(tokenizers, text_encoders, new,
                                                         generator=torch.Generator().manual_seed(1))
    modules = [te.get_input_embeddings() for te in text_encoders]
    path = save_embeddings(tmp_path / "dog_emb.safetensors", {"clip_l": modules[0].rows, "clip_g": modules[1].rows},
                           new)
    ours = embed(tiny_pipe, new.rewrite("a TOK on a gray background"))
    unload_embeddings(tiny_pipe)
    assert [len(t) for t in (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2)] == vocabulary  # nothing left behind
    for a, b in zip(before, embed(tiny_pipe, "a red circle on a gray background")):
        assert torch.equal(a, b)

    rows, read = read_embeddings(path)
    width = text_encoders[0].get_input_embeddings().embedding_dim
    assert read == new and rows["clip_l"].shape == (2, width) and torch.equal(rows["clip_g"], modules[1].rows.detach())
    assert load_embeddings(tiny_pipe, path) == new
    for a, b in zip(ours, embed(tiny_pipe, "a <s0><s1> on a gray background")):
        assert torch.equal(a, b)
    unload_embeddings(tiny_pipe)

    # stock diffusers, as the advanced script's model card loads it: both encoders, the same tokens (the tiny
    # pipeline shares one tokenizer object between its encoders; SDXL's are two)
    tiny_pipe.tokenizer_2 = copy.deepcopy(tiny_pipe.tokenizer_2)
    tiny_pipe.load_textual_inversion(rows["clip_l"], token=new.tokens, text_encoder=tiny_pipe.text_encoder,
                                     tokenizer=tiny_pipe.tokenizer)
    tiny_pipe.load_textual_inversion(rows["clip_g"], token=new.tokens, text_encoder=tiny_pipe.text_encoder_2,
                                     tokenizer=tiny_pipe.tokenizer_2)
    for a, b in zip(ours, embed(tiny_pipe, "a <s0><s1> on a gray background")):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_embedding_files_are_refused_with_one_line(tmp_path):
    write_safetensors(tmp_path / "half.safetensors", {"clip_l": torch.zeros(2, 8)}, {})
    with pytest.raises(AdapterFileError, match="not an SDXL embedding file"):
        read_embeddings(tmp_path / "half.safetensors")
    write_safetensors(tmp_path / "uneven.safetensors", {"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 8)}, {})
    with pytest.raises(AdapterFileError, match="same number of rows"):
        read_embeddings(tmp_path / "uneven.safetensors")
    rows = {"clip_l": torch.zeros(3, 8), "clip_g": torch.zeros(3, 16)}
    write_safetensors(tmp_path / "other_emb.safetensors", rows, {})
    rows, new = read_embeddings(tmp_path / "other_emb.safetensors")  # another tool's file: named after itself
    assert new.abstractions == {"other": ("<s0>", "<s1>", "<s2>")}


def test_a_prompt_without_the_concept_is_warned_about():
    new = NewTokens.plan("TOK", 2)
    with pytest.warns(UserWarning, match="does not mention TOK"):
        warn_if_unused(new, "a photo of a dog")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unused(new, "a photo of <s0><s1>")
