"""Files read as data and written atomically: the one place that touches safetensors bytes and renames.

Reading never unpickles anything: a safetensors header is checked by hand (length, JSON, dtypes,
offsets) before a byte of tensor data is touched. Writing goes through ``atomic_path``: the new file
or folder is made under a hidden temporary name beside its destination and renamed into place when
complete, so a crash leaves the old one or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import AdapterFileError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PARTIAL_SUFFIX = ".partial"  # what an unfinished write is called while it is being made
DELETING_SUFFIX = ".deleting"  # what a folder is called while it is being deleted
OLD_SUFFIX = ".old"  # what a folder is called between being replaced and being deleted


# ---------------------------------------------------------------- writing


def temporary_sibling(path: Path, suffix: str = PARTIAL_SUFFIX) -> Path:
    """A hidden name beside ``path``: folder scanners (images, adapters, checkpoints) pass over it."""
    return path.parent / f".{path.name}{suffix}"


def remove_path(path: Path) -> None:
    """Deletes a file or a folder. A folder is first renamed to a hidden name, so that a kill midway
    leaves a hidden leftover, never a half-deleted folder under its real name."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        doomed = temporary_sibling(path, DELETING_SUFFIX)
        if doomed.exists():  # an earlier delete was killed midway
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: Path, destination: Path) -> None:
    """Renames ``source`` onto ``destination``; an existing folder there is moved aside first, then deleted."""
    destination = Path(destination)
    if destination.is_dir() and not destination.is_symlink():
        old = temporary_sibling(destination, OLD_SUFFIX)
        remove_path(old)
        os.replace(destination, old)
        os.replace(source, destination)
        remove_path(old)
    else:
        os.replace(source, destination)


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False, own: bool = False) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it becomes ``p``, on failure it is gone. ``own``: a
    temporary name of this process's, where several processes may write the same file at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, f".{os.getpid()}{PARTIAL_SUFFIX}" if own else PARTIAL_SUFFIX)
    remove_path(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_image(image, path: str | os.PathLike, **save_options) -> Path:
    """A PIL image as PNG (or the format given), atomically."""
    save_options.setdefault("format", "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, **save_options)
    return Path(path)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------- reading


def _check_entry(path: Path, name: str, entry, data_len: int) -> None:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and entry["dtype"] in DTYPE_SIZES
        and isinstance(entry.get("shape"), list)
        and all(type(d) is int and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(type(o) is int for o in entry["data_offsets"])
    )
    if not ok:
        raise AdapterFileError(f"{path}: malformed safetensors entry for tensor {name!r}")
    begin, end = entry["data_offsets"]
    numel = 1
    for d in entry["shape"]:
        numel *= d
    if not 0 <= begin <= end <= data_len:
        raise AdapterFileError(f"{path}: truncated or corrupt (tensor {name!r} lies at bytes "
                               f"{begin}–{end}, data has {data_len})")
    if end - begin != numel * DTYPE_SIZES[entry["dtype"]]:
        raise AdapterFileError(f"{path}: corrupt tensor {name!r} (shape {entry['shape']} does not fit its bytes)")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, checked, without reading tensor data.

    Any defect (truncated, not safetensors, absurd sizes, malformed entries) is one AdapterFileError.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: truncated ({size} bytes) — not a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterFileError(f"{path}: not a safetensors file, or truncated (header claims "
                                   f"{header_len} bytes, file has {size})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFileError(f"{path}: not a safetensors file (its header is not JSON it can read)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: malformed safetensors metadata (values must be strings)")
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - header_len)
    return header, dict(metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads a safetensors file after checking its header; any defect is one AdapterFileError."""
    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own checks, as a last line of defence
        raise AdapterFileError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    return tensors, metadata


def sha256_of(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")  # a base model folder's weight files


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def base_hashes(path: str | os.PathLike) -> dict[str, str]:
    """What identifies a base model's weights: for a file, its sha256 (Civitai's and kohya's, whose first 10 hex
    digits A1111 shows as AutoV2) and kohya's legacy hash (sha256 of 64 KiB at 1 MiB, 8 digits); for a diffusers
    folder, the sha256 of its weight files' names and sha256s; nothing for a hub id."""
    import hashlib

    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            f.seek(0x100000)
            legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        return {"sha256": sha256_of(path), "legacy": legacy}
    if path.is_dir():
        files = _weight_files(path)
        listing = "\n".join(f"{p.relative_to(path).as_posix()} {sha256_of(p)}" for p in files)
        return {"sha256": hashlib.sha256(listing.encode()).hexdigest()} if files else {}
    return {}


_BASE_SHA256: dict[tuple, str] = {}


def base_sha256(path: str | os.PathLike) -> str | None:
    """``base_hashes(path)["sha256"]``, remembered per path and the size and mtime of its weight files (a 7 GB base
    takes half a minute to hash); None for a hub id or a folder without weight files."""
    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path) if path.is_dir() else []
    if not files:
        return None
    key = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _BASE_SHA256:
        _BASE_SHA256[key] = base_hashes(path)["sha256"]
    return _BASE_SHA256[key]


def read_json_field(metadata: dict[str, str], key: str) -> dict:
    """A JSON object stored in a metadata string, or {} when absent, unreadable or not an object."""
    try:
        value = json.loads(metadata.get(key) or "null")
    except (json.JSONDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
