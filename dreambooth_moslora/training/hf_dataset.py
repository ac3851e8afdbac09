"""``--dataset_name``, as diffusers' script reads it: the instance images and their captions from a dataset.

- A local folder in the layout of the datasets library's ``imagefolder``: images, and a ``metadata.jsonl`` or
  ``metadata.csv`` beside them (in the folder or its ``train/``) whose ``file_name`` column names each image and
  whose other columns (``--caption_column``) hold its caption. Read here, without the datasets package; a folder
  without a metadata file is its images, captioned by ``--instance_prompt``.
- Anything else (a hub id, a folder of parquet or arrow files) is loaded by the datasets package (its ``train``
  split); images stored inside the dataset are written out once, as they are, to ``<output_dir>/dataset_images``.

Either way the result is one subset of image files with a caption each (``None``: the instance prompt), checked
like any folder's images before a model loads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

from PIL import Image

from ..errors import DataError
from ..safe_files import atomic_path
from .data import IMAGE_EXTENSIONS

logger = logging.getLogger("dreambooth_moslora")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
EXPORT_FOLDER = "dataset_images"


def dataset_files(args) -> tuple[Path, list[Path], list[str | None]]:
    """(the folder the images are in, the image files, a caption each or None) for ``args.dataset_name``."""
    root = Path(args.dataset_name).expanduser()
    metadata = next((root / part / name for part in ("", "train") for name in METADATA_FILES
                     if (root / part / name).is_file()), None) if root.is_dir() else None
    if metadata is not None:
        return (metadata.parent, *metadata_rows(metadata, args.image_column, args.caption_column))
    if root.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*")):
        if args.caption_column:
            raise DataError(f"--dataset_name {root}: no metadata.jsonl or metadata.csv to read --caption_column "
                            f"{args.caption_column!r} from")
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return root, paths, [None] * len(paths)
    export = Path(args.output_dir) / EXPORT_FOLDER
    return (export, *library_rows(args, export))


def read_metadata(path: Path) -> list[dict]:
    """The rows of an imagefolder metadata file; DataError naming the line for one that is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({type(exc).__name__})") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    return rows


def metadata_rows(path: Path, image_column: str, caption_column: str | None) -> tuple[list[Path], list[str | None]]:
    """The images a metadata file names, and their captions: the image column ``image`` is the ``file_name`` field
    (another image column ``X``, the ``X_file_name`` field), as imagefolder maps them."""
    rows = read_metadata(path)
    if not rows:
        raise DataError(f"{path} names no image")
    field = "file_name" if image_column == "image" else f"{image_column}_file_name"
    if field not in rows[0]:
        raise DataError(f"--image_column {image_column!r}: {path} has no {field} column to name the images by (its "
                        f"columns: {', '.join(rows[0])})")
    check_columns(str(path), list(rows[0]), None, caption_column)
    paths, captions = [], []
    for number, row in enumerate(rows, 1):
        name = row.get(field)
        if not isinstance(name, str) or not (path.parent / name).is_file():
            raise DataError(f"{path}: row {number}'s {field} {name!r} is not a file beside it")
        paths.append(path.parent / name)
        captions.append(caption_of(row.get(caption_column)) if caption_column else None)
    return paths, captions


def check_columns(where: str, columns: list[str], image_column: str, caption_column: str | None) -> None:
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            raise DataError(f"{flag} {column!r} is not a column of {where}; its columns: {', '.join(columns)}")


def caption_of(value) -> str | None:
    """A caption cell: text with its whitespace made single, or None (then the instance prompt) when empty."""
    text = " ".join(str(value).split()) if value is not None else ""
    return text or None


def library_rows(args, export: Path) -> tuple[list[Path], list[str | None]]:
    """A dataset the datasets package loads (hub id, parquet, arrow): its train split's images as files (written
    out once where the dataset holds them as bytes) and their captions."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset_name {args.dataset_name}: not a folder of images; a dataset on the hub or in "
                        "parquet/arrow files needs the datasets package (pip install datasets)") from None
    try:
        table = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train",
                                      cache_dir=str(args.cache_dir) if args.cache_dir else None)
    except Exception as exc:  # the library raises many kinds (offline, not found, no train split, bad files)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"cannot load the dataset {args.dataset_name!r}: {first}") from None
    check_columns(f"the dataset {args.dataset_name}", table.column_names, args.image_column, args.caption_column)
    table = table.cast_column(args.image_column, datasets.Image(decode=False))
    paths, captions, empty = [], [], 0
    for index, row in enumerate(table):
        if not row[args.image_column]:  # a row without an image
            empty += 1
            continue
        paths.append(image_file(row[args.image_column], index, export))
        captions.append(caption_of(row.get(args.caption_column)) if args.caption_column else None)
    if empty:
        logger.warning("--dataset_name %s: passing over %d row(s) without an image", args.dataset_name, empty)
    return paths, captions


def image_file(cell: dict, index: int, export: Path) -> Path:
    """An image cell ({"bytes", "path"}) as a file: its own file when it has one on disk, else its bytes written
    unchanged to ``export`` under its row and content (once: a later run finds it there)."""
    if cell.get("bytes") is None and cell.get("path") and Path(cell["path"]).is_file():
        return Path(cell["path"])
    data = cell.get("bytes") or b""
    suffix = Path(cell.get("path") or "").suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        try:
            suffix = "." + Image.open(io.BytesIO(data)).format.lower()
        except Exception:  # not an image: written as data, then passed over with the folder's other bad files
            suffix = ".bin"
    path = export / f"{index:05d}-{hashlib.sha1(data).hexdigest()[:10]}{suffix}"
    if not path.is_file():
        with atomic_path(path, own=True) as tmp:  # each process of a run reads the options, and may write it too
            tmp.write_bytes(data)
    return path
