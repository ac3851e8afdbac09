"""What people do with adapter files after training: inspect, convert, resize, merge, fuse.

Every operation reads its inputs as data (``formats.read_adapter``), resolves layer names against the
SDXL layout (the published configs on the meta device, or a given base model's configs), and writes its
output atomically, with metadata naming the operation and the sha256 of each input.

A trained MoSLoRA layer is exactly a rank-r LoRA: ΔW = (α/r)·B·M·A. So converting folds M into B,
resizing is the truncated SVD of ΔW (the best rank-k approximation), and merging concatenates ranks:
Σ wᵢ·ΔWᵢ = [w₁·B₁' … wₙ·Bₙ']·[A₁; …; Aₙ] exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapter import AdapterConfig
from .embeddings import save_embeddings
from .errors import AdapterError, AdapterFileError, AdapterMismatchError, MosloraError
from .formats import AdapterFile, LayerWeights, file_entries, read_adapter, recorded, write_adapter_file
from .safe_files import atomic_path, read_header, read_json_field, sha256_of
from .sdxl import meta_components


@dataclass
class Loaded:
    path: Path
    adapter: AdapterFile
    components: dict


def recorded_base(path: str | os.PathLike) -> str | None:
    """The base model a file records, or None when it records none or the file cannot be read (reading it
    properly reports why)."""
    try:
        return recorded(read_header(path)[1])["base_model"]
    except AdapterFileError:
        return None


def layout_of(path: str | os.PathLike, base: str | None) -> str | None:
    """Whose layer layout resolves the file's names: ``base`` (--base), else the base model the file records when
    it is a diffusers folder here; None: SDXL base's published layout (also for an SDXL checkpoint file: every such
    file has SDXL's layers)."""
    if base is not None:
        return None if str(base).lower().endswith(".safetensors") else base
    recorded_model = recorded_base(path)
    return recorded_model if recorded_model and (Path(recorded_model) / "unet" / "config.json").is_file() else None


def load(path: str | os.PathLike, base: str | None = None) -> Loaded:
    """A file's layers resolved against its base model's layout (see ``layout_of``); one line if they do not fit."""
    layout = layout_of(path, base)
    components = meta_components(layout)
    try:
        adapter = read_adapter(path, components)
    except AdapterMismatchError as exc:
        named = recorded_base(path)
        hint = (f" (the file records the base {named!r}, which is no model folder here: name its layout with --base)"
                if layout is None and named else "" if layout
                else " (for a model other than SDXL base, name it with --base)")
        raise AdapterMismatchError(f"{exc}{hint}") from None
    return Loaded(Path(path), adapter, components)


def load_for_inspection(path: str | os.PathLike, base: str | None = None) -> Loaded:
    """As ``load``; when no layout fits and none was named, the file alone: its layers under its own names."""
    try:
        return load(path, base)
    except AdapterMismatchError:
        if base is not None:
            raise
        return Loaded(Path(path), read_adapter(path, None), {})


def operation_record(operation: str, inputs: list[Path], **settings) -> dict:
    """The operation, its settings, and each input's name and sha256."""
    return {"operation": operation, **settings, "inputs": [{"file": p.name, "sha256": sha256_of(p)} for p in inputs]}


def provenance(operation: str, inputs: list[Path], **settings) -> dict[str, str]:
    """The metadata every output file carries: its operation record."""
    return {"moslora_operation": json.dumps(operation_record(operation, inputs, **settings))}


def refuse_overwriting(output: Path, inputs: list[Path]) -> None:
    for source in inputs:
        if output.exists() and output.resolve() == source.resolve():
            raise AdapterError(f"{output} is one of the inputs: write the result to another file")


# ---------------------------------------------------------------- inspect


def block_of(component: str, path: str) -> str:
    """The block a layer belongs to, for per-block figures: ``unet.down_blocks.1``, ``unet.mid_block``, ``text_encoder``
    (or, for a kohya file read without a model, its own SGM names: ``unet.input_blocks.4``, ``unet.middle_block``)."""
    if component != "unet":
        return component
    if "." not in path:  # a kohya name: input_blocks_4_1_transformer_blocks_0_attn1_to_q
        words = path.split("_")
        return "unet." + ("middle_block" if words[:2] == ["middle", "block"] else "_".join(words[:2]) + "." + words[2])
    parts = path.split(".")
    return "unet." + (parts[0] if parts[0] == "mid_block" else ".".join(parts[:2]))


def inspect(loaded: Loaded) -> dict:
    """Format, settings, provenance, layers per component and ‖ΔW‖ per block, from the file alone."""
    adapter, metadata = loaded.adapter, loaded.adapter.metadata
    record = recorded(metadata)
    blocks: dict[str, float] = {}
    for component, by_path in adapter.layers.items():
        for path, weights in by_path.items():
            key = block_of(component, path)
            blocks[key] = blocks.get(key, 0.0) + float(weights.delta().square().sum())
    ranks = sorted({w.rank for by_path in adapter.layers.values() for w in by_path.values()})
    return {
        "file": str(loaded.path),
        "format": adapter.format,
        "base_model": record["base_model"],
        "instance_prompt": record["instance_prompt"],
        "layers": {c: len(by_path) for c, by_path in adapter.layers.items()},
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": adapter.config.alpha,
        "mixer": adapter.config.mixer,
        "training": record["training"],
        "operation": read_json_field(metadata, "moslora_operation") or None,
        "delta_norm_by_block": {k: v**0.5 for k, v in sorted(blocks.items())},
        "delta_norm": sum(blocks.values()) ** 0.5,
        "new_tokens": dict(adapter.embeddings[1].abstractions) if adapter.embeddings else None,
    }


# ---------------------------------------------------------------- convert


def as_plain_native(weights: LayerWeights) -> LayerWeights:
    """A plain LoRA layer as a MoSLoRA one: M = I, so it trains on as MoSLoRA from where it is."""
    if weights.mixer is not None:
        return weights
    return replace(weights, mixer=torch.eye(weights.rank))


def convert(loaded: Loaded, fmt: str, output: Path) -> Path:
    """The same adapter in another format: exact (ΔW to float rounding); plain LoRA becomes native with M = I."""
    refuse_overwriting(output, [loaded.path])
    record = recorded(loaded.adapter.metadata)
    training = {**record["training"], **carry_embeddings(loaded.adapter, fmt, output)}
    return _write(output, fmt, loaded.adapter.layers, loaded.adapter.config, loaded.components, record["base_model"],
                  training, provenance("convert", [loaded.path], to=fmt), loaded.adapter.embeddings)


def carry_embeddings(adapter: AdapterFile, fmt: str, output: Path) -> dict:
    """Pivotal tuning's embeddings go where the new file will find them: bundled in a kohya file, else written as
    ``<output>_emb.safetensors`` beside it; returns what the new file's settings then record."""
    if not adapter.embeddings:
        return {}
    rows, new = adapter.embeddings
    if fmt == "kohya":
        return {"new_tokens": new.tokens}
    companion = output.with_name(f"{output.stem}_emb.safetensors")
    save_embeddings(companion, rows, new)
    return {"new_tokens": new.tokens, "embeddings_file": companion.name}


def _write(output: Path, fmt: str, layers: dict, config: AdapterConfig, components: dict, base_model, training,
           extra: dict, embeddings=None) -> Path:
    """Layers in any format; a plain LoRA written as native gets M = I."""
    if fmt == "native" and config.mixer == "none":
        layers = {c: {p: as_plain_native(w) for p, w in by_path.items()} for c, by_path in layers.items()}
        config = replace(config, mixer="learned", mixer_init="identity")
    return write_adapter_file(output, fmt, config, file_entries(layers, components), base_model, training, extra,
                              embeddings)


# ---------------------------------------------------------------- resize (and merge's compression)


def low_rank(delta_factors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ΔW = P·Q (P out×r, Q r×in) without forming ΔW: (U, S, Vᵀ) of rank ≤ r, in float64."""
    p, q = delta_factors
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u, s, vh @ qq.T


def truncate(weights: LayerWeights, rank: int | None, energy: float | None) -> tuple[LayerWeights, float]:
    """The best approximation of the layer's ΔW at ``rank`` (or the smallest rank keeping ``energy`` of
    ‖ΔW‖²), as a plain LoRA with α = rank; and the relative Frobenius error it leaves."""
    up = weights.folded_up(with_alpha=True).double()
    u, s, vh = low_rank((up, weights.down.double()))
    total = float(s.square().sum())
    if energy is not None:
        kept = torch.cumsum(s.square(), 0) / max(total, 1e-300)
        rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    resized = LayerWeights((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float(), float(rank))
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return resized, error


def resize(loaded: Loaded, output: Path, fmt: str, rank: int | None = None, energy: float | None = None) -> dict:
    """Every layer truncated by SVD; returns the relative Frobenius error per block and overall."""
    refuse_overwriting(output, [loaded.path])
    largest = max(w.rank for by_path in loaded.adapter.layers.values() for w in by_path.values())
    if rank is not None and not 1 <= rank <= largest:
        raise AdapterError(f"--rank must be between 1 and the adapter's rank {largest}, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise AdapterError(f"--energy must be in (0, 1], got {energy}")
    layers, errors = _truncate_all(loaded.adapter.layers, rank, energy)
    settings = {"rank": rank} if rank is not None else {"energy": energy}
    _write_plain(output, fmt, layers, loaded.components, recorded(loaded.adapter.metadata)["base_model"],
                 provenance("resize", [loaded.path], **settings), loaded.adapter)
    return errors


def _truncate_all(layers: dict, rank: int | None, energy: float | None) -> tuple[dict, dict]:
    resized: dict[str, dict[str, LayerWeights]] = {}
    discarded: dict[str, list[float]] = {}  # block → [discarded energy, total energy]
    for component, by_path in layers.items():
        for path, weights in by_path.items():
            new, error = truncate(weights, rank, energy)
            resized.setdefault(component, {})[path] = new
            total = float(weights.delta().square().sum())
            for key in (block_of(component, path), "overall"):
                acc = discarded.setdefault(key, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + error**2 * total, acc[1] + total
    errors = {k: (d / t) ** 0.5 if t > 0 else 0.0 for k, (d, t) in discarded.items()}
    return resized, errors


def _write_plain(output: Path, fmt: str, layers: dict, components: dict, base_model, extra: dict,
                 source: AdapterFile | None = None) -> Path:
    """Plain-LoRA layers (α = rank) in any format, with the new tokens of the ``source`` adapter, if any."""
    first = next(iter(next(iter(layers.values())).values()))
    config = AdapterConfig(rank=first.rank, alpha=float(first.rank), mixer="none", mixer_init="identity")
    training = carry_embeddings(source, fmt, output) if source else None
    return _write(output, fmt, layers, config, components, base_model, training or None, extra,
                  source.embeddings if source else None)


# ---------------------------------------------------------------- merge


def merge(inputs: list[Loaded], weights: list[float], output: Path, fmt: str, rank: int | None = None,
          force: bool = False) -> dict:
    """Σ wᵢ·ΔWᵢ layer by layer: exact by concatenating ranks, or compressed to ``rank`` by SVD. Files trained on
    different base models (by name, or by the hashes they record) are refused unless ``force``."""
    paths = [i.path for i in inputs]
    refuse_overwriting(output, paths)
    if len(weights) != len(inputs):
        raise AdapterError(f"{len(inputs)} files but {len(weights)} weights: give one weight per file")
    records = [recorded(i.adapter.metadata) for i in inputs]
    bases = {b for b in (r["base_model"] for r in records) if b}
    hashes = {h for h in (r["training"].get("base_model_sha256") for r in records) if h}
    if not force and (len(bases) > 1 or len(hashes) > 1):
        named = ", ".join(sorted(bases)) if len(bases) > 1 else f"{next(iter(bases), '?')} with different weights"
        raise AdapterMismatchError(f"the files were trained on different base models: {named} (--force merges anyway)")
    with_tokens = [i for i in inputs if i.adapter.embeddings]
    if len(with_tokens) > 1:
        raise AdapterError(f"{', '.join(i.path.name for i in with_tokens)} each carry new tokens (pivotal tuning), "
                           "whose names clash: merge the adapters of one of them at most")
    merged: dict[str, dict[str, LayerWeights]] = {}
    for loaded, w in zip(inputs, weights):
        for component, by_path in loaded.adapter.layers.items():
            for path, layer in by_path.items():
                part = LayerWeights(layer.down, layer.folded_up(with_alpha=True) * w, float(layer.rank))
                merged.setdefault(component, {}).setdefault(path, []).append((loaded.path, part))
    layers = {c: {p: _concatenate(p, parts) for p, parts in by_path.items()} for c, by_path in merged.items()}
    errors = {}
    if rank is not None:
        if rank < 1:
            raise AdapterError(f"--rank must be at least 1, got {rank}")
        layers, errors = _truncate_all(layers, rank, None)
    extra = provenance("merge", paths, weights=weights, **({"rank": rank} if rank is not None else {}))
    _write_plain(output, fmt, layers, inputs[0].components, bases.pop() if bases else None, extra,
                 with_tokens[0].adapter if with_tokens else None)
    return errors


def _concatenate(path: str, parts: list[tuple[Path, LayerWeights]]) -> LayerWeights:
    shapes = {(p.up.shape[0], p.down.shape[1]) for _, p in parts}
    if len(shapes) > 1:
        raise AdapterMismatchError(f"layer {path} has different shapes in {', '.join(f.name for f, _ in parts)}")
    down = torch.cat([p.down for _, p in parts])
    up = torch.cat([p.up for _, p in parts], dim=1)
    return LayerWeights(down, up, float(down.shape[0]))


# ---------------------------------------------------------------- fuse


FUSE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def fuse(base: str, adapter_path: Path, output: Path, scale: float = 1.0, dtype: str = "fp16",
         base_config: str | None = None) -> Path:
    """``base`` with the adapter merged into its weights: a diffusers folder, or with ``output`` ending in .safetensors
    one checkpoint file in the original SDXL layout (ComfyUI's, A1111's and Forge's checkpoint loaders read it), its
    weights in ``dtype``. ``base`` is a diffusers folder or hub id, or a checkpoint file with ``base_config``."""
    from .inference import load_adapter
    from .single_file import save_single_file

    if output.exists():
        raise AdapterError(f"{output} exists: fuse writes a new {'file' if output.suffix else 'folder'}")
    pipe = base_pipeline(base, base_config)
    load_adapter(pipe, adapter_path, scale=scale, fuse=True)
    record = operation_record("fuse", [adapter_path], base=base, scale=scale)
    if output.suffix.lower() == ".safetensors":
        parts = {part: getattr(pipe, part) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
        schedule = {k: pipe.scheduler.config.get(k) for k in ("prediction_type", "rescale_betas_zero_snr")}
        return save_single_file(parts, output, FUSE_DTYPES[dtype], schedule, {"moslora_operation": json.dumps(record)})
    with atomic_path(output, directory=True) as tmp:  # the folder appears whole, or not at all
        pipe.save_pretrained(tmp)
        (tmp / "moslora_fused.json").write_text(json.dumps(record, indent=2) + "\n")
    return output


def base_pipeline(base: str, base_config: str | None = None):
    """The base model's pipeline in fp32, from a diffusers folder or hub id, or from a checkpoint file."""
    from diffusers import StableDiffusionXLPipeline

    from .single_file import SDXL_BASE_CONFIG, file_pipeline, is_single_file

    try:
        if is_single_file(base):
            return file_pipeline(base, base_config or SDXL_BASE_CONFIG, torch.float32)
        return StableDiffusionXLPipeline.from_pretrained(base)
    except MosloraError:
        raise
    except Exception as exc:  # a hub id while offline, a folder that is not a model …
        raise AdapterFileError(f"cannot load base model {base!r}: {(str(exc).splitlines() or [''])[0][:200]}") from None
