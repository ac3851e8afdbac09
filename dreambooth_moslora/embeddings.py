"""Pivotal tuning's new tokens: words added to both SDXL tokenizers whose embeddings are learned beside the adapter.

A concept that prompts name by an abstraction ("TOK") becomes n new tokens ("<s0><s1>"), as diffusers' advanced
DreamBooth script names them. Each text encoder's token table gets a ``TokenRows`` in its place: the frozen table
plus the n new rows as the only trainable part, so the table's 49,408 rows never train, decay or get copied. The
rows are saved as an SDXL textual inversion: ``clip_l`` (n × 768) and ``clip_g`` (n × 1280), the keys diffusers'
``load_textual_inversion``, ComfyUI and A1111 read; the metadata records the tokens and what each abstraction maps to.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError
from .safe_files import read_safetensors, write_safetensors

ENCODER_KEYS = ("clip_l", "clip_g")  # the first text encoder (CLIP ViT-L), the second (OpenCLIP bigG)
FORMAT = "dreambooth_moslora.embeddings.v1"


@dataclass(frozen=True)
class NewTokens:
    """Each abstraction and the tokens it stands for, e.g. {"TOK": ("<s0>", "<s1>")}."""

    abstractions: dict[str, tuple[str, ...]]

    @classmethod
    def plan(cls, abstractions: str, per_abstraction: int) -> NewTokens:
        """``"TOK"`` or ``"TOK,TOK2"`` with n tokens each: <s0>…<s(n-1)>, then <sn>… for the next."""
        names = [a.strip() for a in abstractions.split(",") if a.strip()]
        if not names or per_abstraction < 1:
            raise ValueError("pivotal tuning needs a token abstraction and at least one new token per abstraction")
        count = iter(range(len(names) * per_abstraction))
        return cls({name: tuple(f"<s{next(count)}>" for _ in range(per_abstraction)) for name in names})

    @property
    def tokens(self) -> list[str]:
        return [token for group in self.abstractions.values() for token in group]

    def rewrite(self, prompt: str) -> str:
        """The prompt with every abstraction replaced by its tokens (longest abstractions first)."""
        for name in sorted(self.abstractions, key=len, reverse=True):
            prompt = prompt.replace(name, "".join(self.abstractions[name]))
        return prompt

    def missing_from(self, prompt: str) -> list[str]:
        """The abstractions (or their tokens) a prompt does not mention."""
        return [name for name, group in self.abstractions.items() if name not in prompt and group[0] not in prompt]


class TokenRows(nn.Module):
    """A token table with new rows: ids listed in ``token_ids`` read ``rows`` (trainable), every other id the frozen
    table. One one-hot matmul picks the new rows, so a step neither syncs with the device nor branches on the ids."""

    def __init__(self, table: nn.Embedding, rows: torch.Tensor, token_ids: list[int]):
        super().__init__()
        table.requires_grad_(False)
        self.table = table
        self.rows = nn.Parameter(rows.to(table.weight.dtype).clone())
        self.register_buffer("token_ids", torch.tensor(token_ids, device=table.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads ``get_input_embeddings().weight`` (its dtype, device)
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        match = ids.unsqueeze(-1) == self.token_ids
        known = self.table(ids.clamp(max=self.table.num_embeddings - 1))
        new = match.to(self.rows.dtype) @ self.rows
        return torch.where(match.any(-1, keepdim=True), new.to(known.dtype), known)


def install(tokenizers, text_encoders, new: NewTokens, rows: dict[str, torch.Tensor] | None = None,
            generator: torch.Generator | None = None) -> list:
    """Gives each text encoder the new rows: the given ``rows`` (by ENCODER_KEYS), or Gaussian with the table's own
    std, as diffusers' advanced script starts them. Returns copies of the tokenizers that know the new tokens (the
    given ones stay as they were, kept for ``uninstall``)."""
    if any(isinstance(encoder.get_input_embeddings(), TokenRows) for encoder in text_encoders):
        raise ValueError("new tokens are already installed")
    if rows is not None:
        check_rows(text_encoders, new, rows)
    copies = []
    for key, tokenizer, encoder in zip(ENCODER_KEYS, tokenizers, text_encoders):
        table = encoder.get_input_embeddings()
        extended = copy.deepcopy(tokenizer)
        extended.add_tokens(new.tokens, special_tokens=True)
        ids = extended.convert_tokens_to_ids(new.tokens)
        if rows is not None:
            start = rows[key]
        else:
            start = torch.randn(len(ids), table.weight.shape[1], generator=generator) * table.weight.float().std()
        module = TokenRows(table, start.to(table.weight.device), ids)
        object.__setattr__(module, "tokenizer_before", tokenizer)  # not state: what uninstall gives back
        encoder.set_input_embeddings(module)
        copies.append(extended)
    return copies


def check_rows(text_encoders, new: NewTokens, rows: dict[str, torch.Tensor]) -> None:
    """AdapterFileError unless ``rows`` hold one row per token of each text encoder's width."""
    for key, encoder in zip(ENCODER_KEYS, text_encoders):
        expected = (len(new.tokens), encoder.get_input_embeddings().weight.shape[1])
        if tuple(rows[key].shape) != expected:
            raise AdapterFileError(f"{key}: embeddings of shape {tuple(rows[key].shape)}; this text encoder needs "
                                   f"{expected}")


def uninstall(text_encoders) -> list:
    """Puts each text encoder's own table back; returns the tokenizers ``install`` was given (None where none)."""
    originals = []
    for encoder in text_encoders:
        module = encoder.get_input_embeddings()
        if isinstance(module, TokenRows):
            encoder.set_input_embeddings(module.table)
            originals.append(module.tokenizer_before)
        else:
            originals.append(None)
    return originals


def save_embeddings(path: str | Path, rows: dict[str, torch.Tensor], new: NewTokens) -> Path:
    """The rows (by encoder key) as an SDXL textual inversion (clip_l, clip_g), the tokens in the metadata."""
    tensors = {key: rows[key].detach().float().cpu().contiguous() for key in ENCODER_KEYS}
    metadata = {"format": FORMAT, "tokens": json.dumps(new.tokens),
                "abstractions": json.dumps({k: list(v) for k, v in new.abstractions.items()})}
    return write_safetensors(path, tensors, metadata)


def is_embedding(names) -> bool:
    """Whether a safetensors file's tensor names (its header's keys will do) are an SDXL embedding's."""
    return set(ENCODER_KEYS) <= set(names)


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], NewTokens]:
    """An SDXL textual inversion file, checked as data: its clip_l and clip_g rows, and its tokens (ours record
    them; another tool's file gets <s0>… for an abstraction named after the file)."""
    tensors, metadata = read_safetensors(path)
    missing = [key for key in ENCODER_KEYS if key not in tensors]
    if missing:
        raise AdapterFileError(f"{path}: not an SDXL embedding file (no {' or '.join(missing)} tensor)")
    counts = {tensors[key].shape[0] for key in ENCODER_KEYS}
    if len(counts) != 1 or any(tensors[key].dim() != 2 for key in ENCODER_KEYS):
        raise AdapterFileError(f"{path}: clip_l and clip_g must hold the same number of rows")
    try:
        abstractions = {k: tuple(v) for k, v in json.loads(metadata.get("abstractions", "{}")).items()}
    except (ValueError, AttributeError, TypeError):
        raise AdapterFileError(f"{path}: its 'abstractions' metadata is not a table of token lists") from None
    if not abstractions:
        name = re.sub(r"_emb$", "", Path(path).stem) or "emb"
        abstractions = NewTokens.plan(name, counts.pop()).abstractions
    new = NewTokens(abstractions)
    if len(new.tokens) != tensors["clip_l"].shape[0]:
        raise AdapterFileError(f"{path}: {len(new.tokens)} token(s) recorded for {tensors['clip_l'].shape[0]} row(s)")
    return {key: tensors[key] for key in ENCODER_KEYS}, new


BUNDLE_PREFIX = "bundle_emb."  # A1111's and Forge's key for embeddings bundled in a LoRA file
BUNDLE_METADATA = "moslora_bundle_emb"  # which tokens each bundled embedding stands for, in order


def bundle(rows: dict[str, torch.Tensor], new: NewTokens) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The rows as embeddings bundled in a kohya LoRA file: ``bundle_emb.<abstraction>.clip_l`` / ``.clip_g``, one
    embedding per abstraction (A1111 and Forge draw it where a prompt names the abstraction), and its metadata."""
    tensors, start = {}, 0
    for name, group in new.abstractions.items():
        for key in ENCODER_KEYS:
            tensors[f"{BUNDLE_PREFIX}{name}.{key}"] = rows[key][start:start + len(group)].detach().float().cpu().clone()
        start += len(group)
    return tensors, {BUNDLE_METADATA: json.dumps({k: list(v) for k, v in new.abstractions.items()})}


def unbundle(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Takes bundled embeddings out of a LoRA file's tensors (in place); returns (rows, NewTokens), or None when the
    file bundles none. The tokens are the recorded ones when they fit, else <s0>… in the bundle's order."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in [k for k in tensors if k.startswith(BUNDLE_PREFIX)]:
        abstraction, _, key = name[len(BUNDLE_PREFIX):].rpartition(".")
        if key not in ENCODER_KEYS or not abstraction:
            raise AdapterFileError(f"{path}: bundled embedding {name!r} is neither a clip_l nor a clip_g tensor")
        found.setdefault(abstraction, {})[key] = tensors.pop(name)
    if not found:
        return None
    for abstraction, parts in found.items():
        shapes = [tuple(parts[k].shape) if k in parts else None for k in ENCODER_KEYS]
        if None in shapes or len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[0][0] != shapes[1][0]:
            raise AdapterFileError(f"{path}: bundled embedding {abstraction!r} needs clip_l and clip_g rows, "
                                   f"alike in number (has {shapes})")
    try:
        recorded = {k: tuple(v) for k, v in json.loads(metadata.get(BUNDLE_METADATA, "{}")).items()}
    except (ValueError, AttributeError, TypeError):
        recorded = {}
    if set(recorded) != set(found) or any(len(recorded[a]) != found[a]["clip_l"].shape[0] for a in found):
        count = iter(range(sum(parts["clip_l"].shape[0] for parts in found.values())))
        recorded = {a: tuple(f"<s{next(count)}>" for _ in range(parts["clip_l"].shape[0]))
                    for a, parts in found.items()}
    order = list(recorded)
    rows = {key: torch.cat([found[a][key].float() for a in order]) for key in ENCODER_KEYS}
    return rows, NewTokens(recorded)


def load_embeddings(pipe, path: str | Path) -> NewTokens:
    """Installs an embedding file's tokens into an SDXL pipeline (its tokenizers replaced by copies that know them)."""
    rows, new = read_embeddings(path)
    install_into(pipe, rows, new)
    return new


def install_into(pipe, rows: dict[str, torch.Tensor], new: NewTokens) -> None:
    """``rows`` as ``new``'s tokens in an SDXL pipeline, in place of any it had (its tokenizers become copies that
    know the tokens; ``unload_embeddings`` gives back its own)."""
    unload_embeddings(pipe)
    pipe.tokenizer, pipe.tokenizer_2 = install([pipe.tokenizer, pipe.tokenizer_2],
                                               [pipe.text_encoder, pipe.text_encoder_2], new, rows)


def unload_embeddings(pipe) -> None:
    """The pipeline's own token tables and tokenizers again."""
    originals = uninstall([pipe.text_encoder, pipe.text_encoder_2])
    if originals[0] is not None:
        pipe.tokenizer, pipe.tokenizer_2 = originals


def unused_line(new: NewTokens, prompt: str) -> str | None:
    """A line when a prompt names one of the concepts neither by its word nor by its tokens, else None."""
    if missing := new.missing_from(prompt):
        words = ", ".join(f"{name} ({''.join(new.abstractions[name])})" for name in missing)
        return f"the prompt does not mention {words}: those new tokens stay unused"
    return None


def warn_if_unused(new: NewTokens, prompt: str) -> None:
    """A prompt that names none of an embedding's concepts draws without them: say so."""
    if line := unused_line(new, prompt):
        warnings.warn(line, stacklevel=2)
