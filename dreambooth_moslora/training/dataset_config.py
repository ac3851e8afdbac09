"""Datasets as kohya's sd-scripts users bring them: ``N_prompt`` folders and ``--dataset_config`` TOML files.

Both become a list of ``Subset``s, as the plain ``--instance_data_dir`` does (one subset, ``--repeats`` times):

- folders: ``--train_data_dir DIR`` whose subfolders ``10_sks dog`` give 10 repeats and the prompt "sks dog" for
  images without a caption file; ``--reg_data_dir DIR`` the same for class (regularisation) images;
- a TOML file in kohya's schema: ``[general]`` defaults, one ``[[datasets]]`` table (resolution, batch size,
  buckets) and its ``[[datasets.subsets]]`` (``image_dir``, ``num_repeats``, ``class_tokens``, ``is_reg``, caption
  handling). Every value is checked before any model loads; a bad one is one line naming the file, line and key.

A setting given both by the command line and by the file is refused rather than silently overridden.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .data import AUTO_CAPTIONS, CaptionRules, check_images, read_caption, scan_images
from .hf_dataset import dataset_files

logger = logging.getLogger("dreambooth_moslora")
FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")  # kohya's "<repeats>_<prompt>"


@dataclass(frozen=True)
class Subset:
    """One folder of images and how they are used."""

    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None  # the prompt of images without a caption file
    is_reg: bool = False  # class (regularisation) images for prior preservation
    caption_extension: str | None = None  # None: .txt, then .caption
    shuffle_caption: bool = False
    keep_tokens: int = 0  # with shuffle_caption: the first N comma-separated tags stay in front
    caption_dropout_rate: float = 0.0  # the share of draws that train on the empty caption
    class_prompt: str | None = None  # this trainer's: the class the base model draws this subject's class images of
    # --dataset_name's: the images a metadata file or dataset lists (else the folder's), a caption each (None: none)
    files: tuple[Path, ...] = ()
    captions: tuple[str | None, ...] = ()

    def to_json(self) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("files", "captions")}
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}


# ---------------------------------------------------------------- kohya's folder convention


def subsets_from_folders(root: Path, is_reg: bool, **captions) -> list[Subset]:
    """A ``--train_data_dir`` / ``--reg_data_dir``: each ``N_prompt`` subfolder a subset of N repeats; other
    folders are passed over with a warning, as sd-scripts does."""
    what = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not root.is_dir():
        raise DataError(f"{what} {root} does not exist or is not a folder")
    subsets, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = FOLDER_NAME.match(folder.name)
        if not match or int(match.group(1)) < 1:
            skipped.append(folder.name)
            continue
        subsets.append(Subset(folder, int(match.group(1)), match.group(2).strip() or None, is_reg, **captions))
    if skipped:
        print(f"warning: {what} {root}: passing over {', '.join(skipped)} (not named <repeats>_<prompt>, "
              "e.g. 10_sks dog)", file=sys.stderr)
    if not subsets:
        raise DataError(f"{what} {root} has no <repeats>_<prompt> folder (e.g. 10_sks dog)")
    return subsets


# ---------------------------------------------------------------- kohya's TOML schema

# key → (types, the trainer's option it stands for, or None)
SUBSET_KEYS = {
    "image_dir": ((str,), None), "num_repeats": ((int,), "repeats"), "class_tokens": ((str,), None),
    "is_reg": ((bool,), None), "caption_extension": ((str,), "caption_extension"),
    "shuffle_caption": ((bool,), "shuffle_caption"), "keep_tokens": ((int,), "keep_tokens"),
    "caption_dropout_rate": ((float, int), "caption_dropout_rate"), "flip_aug": ((bool,), "random_flip"),
    "color_aug": ((bool,), None), "class_prompt": ((str,), None),
}
DATASET_KEYS = {
    "resolution": ((int, list), "resolution"), "batch_size": ((int,), "train_batch_size"),
    "enable_bucket": ((bool,), "aspect_ratio_buckets"), "min_bucket_reso": ((int,), "min_bucket_reso"),
    "max_bucket_reso": ((int,), "max_bucket_reso"), "bucket_reso_steps": ((int,), "bucket_reso_steps"),
}
# sd-scripts' keys this trainer does not do: refused as such, not as unknown
NOT_SUPPORTED = {"random_crop", "face_crop_aug_range", "caption_prefix", "caption_suffix", "caption_tag_dropout_rate",
                 "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step", "keep_tokens_separator",
                 "secondary_separator", "enable_wildcard", "bucket_no_upscale", "metadata_file", "cache_info",
                 "alpha_mask", "conditioning_data_dir", "network_multiplier"}
TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list"}


@dataclass
class DatasetConfig:
    """What a TOML file says: its subsets, and the options it sets with the line of each (for refusing an option
    given twice)."""

    subsets: list[Subset]
    options: dict  # option name (an args attribute) → value
    lines: dict  # option name → (key, line)


class Toml:
    """A kohya dataset TOML: its parsed tables, and where each key stands, for one-line messages."""

    def __init__(self, path: Path):
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib

        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
            self.lines, self.data = text.splitlines(), tomllib.loads(text)
        except (OSError, ValueError) as exc:  # tomllib's errors are ValueErrors naming the line and column
            raise DataError(f"{self.path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.tables = self._tables()

    def _tables(self) -> list[tuple[str, int, int]]:
        """(table name, its number among tables of that name, its header's line) for every header, in order."""
        found, counts = [("", 0, 0)], {}
        for number, raw in enumerate(self.lines, 1):
            header = re.fullmatch(r"\[\[?\s*([\w.]+)\s*\]\]?", raw.split("#", 1)[0].strip())
            if header:
                name = header.group(1)
                counts[name] = counts.get(name, -1) + 1
                found.append((name, counts[name], number))
        return found

    def line(self, key: str, table: str | None = None, index: int = 0) -> int | None:
        """The line of ``key = …`` in the ``index``-th table named ``table`` (else that table's header line); with
        no table, its first line anywhere."""
        for t, (name, count, start) in enumerate(self.tables):
            if table is not None and (name != table or count != index):
                continue
            end = self.tables[t + 1][2] if t + 1 < len(self.tables) else len(self.lines) + 1
            for number in range(start + 1, end):
                if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[number - 1]):
                    return number
            if table is not None:
                return start or None
        return None

    def error(self, message: str, key: str, table: str | None = None, index: int = 0) -> DataError:
        line = self.line(key, table, index)
        return DataError(f"{self.path}{f':{line}' if line else ''}: {message}")


def read_dataset_config(path: Path) -> DatasetConfig:
    """Reads and checks a kohya dataset TOML; DataError, one line, at the first problem."""
    toml = Toml(path)
    for key in toml.data:
        if key not in ("general", "datasets"):
            raise toml.error(f"unknown key {key!r} (kohya's schema has [general] and [[datasets]])", key, "")
    general = _checked(toml, toml.data.get("general", {}), "general")
    datasets = toml.data.get("datasets")
    if not isinstance(datasets, list) or len(datasets) != 1:
        raise toml.error("needs exactly one [[datasets]] table (put every subset in it)", "datasets", "datasets", 1)
    dataset = _checked(toml, datasets[0], "datasets")
    raw = dataset.pop("subsets", None)
    if not isinstance(raw, list) or not raw:
        raise toml.error("[[datasets]] has no [[datasets.subsets]]", "subsets", "datasets")
    subsets = [_checked(toml, table, "datasets.subsets", i) for i, table in enumerate(raw)]
    defaults = {**general, **dataset}
    options = {DATASET_KEYS[k][1]: v for k, v in defaults.items() if k in DATASET_KEYS}
    if "resolution" in options:
        options["resolution"] = _resolution(toml, options["resolution"])
    flips = {s.get("flip_aug", defaults.get("flip_aug", False)) for s in subsets}
    if len(flips) > 1:
        raise toml.error("flip_aug must be the same in every subset (one --random_flip for the run)", "flip_aug")
    if True in flips:
        options["random_flip"] = True
    lines = {option: (key, toml.line(key)) for key, (_, option) in {**DATASET_KEYS, **SUBSET_KEYS}.items()
             if option and toml.line(key) is not None}
    return DatasetConfig([_subset(toml, defaults | s, i) for i, s in enumerate(subsets)], options, lines)


def _checked(toml: Toml, table, name: str, index: int = 0) -> dict:
    """A table's keys checked against the schema: known, supported here, of the right type."""
    if not isinstance(table, dict):
        raise toml.error(f"[{name}] must be a table", name.rpartition(".")[2])
    allowed = {**SUBSET_KEYS, **({} if name == "datasets.subsets" else DATASET_KEYS)}
    checked = {}
    for key, value in table.items():
        if key == "subsets" and name == "datasets":
            checked[key] = value
            continue
        if key in NOT_SUPPORTED:
            raise toml.error(f"{key} is not supported by this trainer", key, name, index)
        if key in DATASET_KEYS and key not in allowed:
            raise toml.error(f"{key} belongs in [[datasets]] or [general], not in a subset", key, name, index)
        if key not in allowed:
            raise toml.error(f"unknown key {key!r} in [{name}]", key, name, index)
        kinds = allowed[key][0]
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(dict.fromkeys(TYPE_NAMES[k] for k in kinds if k is not int or float not in kinds))
            raise toml.error(f"{key} must be {wanted}, got {value!r}", key, name, index)
        if key == "color_aug" and value:
            raise toml.error("color_aug is not supported (it would shift the subject's colours)", key, name, index)
        checked[key] = float(value) if float in kinds else value
    return checked


def _subset(toml: Toml, merged: dict, index: int) -> Subset:
    def fail(message: str, key: str) -> DataError:
        return toml.error(message, key, "datasets.subsets", index)

    if "image_dir" not in merged:
        raise fail("a [[datasets.subsets]] needs image_dir", "image_dir")
    folder = (toml.path.parent / Path(merged["image_dir"]).expanduser()).resolve()
    if not folder.is_dir():
        raise fail(f"image_dir {merged['image_dir']!r} does not exist or is not a folder", "image_dir")
    for key, low, high in (("num_repeats", 1, None), ("keep_tokens", 0, None), ("caption_dropout_rate", 0, 1)):
        if key in merged and (merged[key] < low or (high is not None and merged[key] > high)):
            raise fail(f"{key} must be {'between 0 and 1' if high else f'at least {low}'}, got {merged[key]!r}", key)
    return Subset(folder, merged.get("num_repeats", 1), merged.get("class_tokens"), merged.get("is_reg", False),
                  merged.get("caption_extension"), merged.get("shuffle_caption", False), merged.get("keep_tokens", 0),
                  merged.get("caption_dropout_rate", 0.0), merged.get("class_prompt"))


def _resolution(toml: Toml, value) -> int:
    """kohya's resolution: a side, or [width, height] (square only here: buckets give the other shapes)."""
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1] or not all(isinstance(v, int) for v in value):
            raise toml.error(f"resolution must be one side or [side, side], got {value!r} (enable_bucket gives "
                             "other aspect ratios)", "resolution")
        value = value[0]
    return value


# ---------------------------------------------------------------- from subsets to images


@dataclass
class Images:
    """A set of subsets' images, each repeated as its subset says, with its caption and how that varies."""

    paths: list[Path] = dataclasses.field(default_factory=list)
    captions: list[str] = dataclasses.field(default_factory=list)
    rules: list = dataclasses.field(default_factory=list)  # data.CaptionRules per image
    folders: dict = dataclasses.field(default_factory=dict)  # folder name → {"n_repeats", "img_count"} (kohya's)
    tags: dict = dataclasses.field(default_factory=dict)  # folder name → {tag: count} (kohya's ss_tag_frequency)

    @property
    def unique(self) -> int:
        return sum(f["img_count"] for f in self.folders.values())


def gather(subsets: list[Subset], warn: bool) -> Images:
    """The subsets' images, read and checked (unreadable ones passed over with a warning), captions read."""
    images = Images()
    for subset in subsets:
        if subset.files:
            found, skipped = check_images(subset.files)
            listed = dict(zip(subset.files, subset.captions))
            captions = [listed[p] or read_caption(p, subset.caption_extension, subset.class_tokens) for p in found]
        else:
            found, skipped = scan_images(subset.image_dir, "class" if subset.is_reg else "instance")
            captions = [read_caption(p, subset.caption_extension, subset.class_tokens) for p in found]
        if skipped and warn:
            logger.warning("skipping %d file(s) in %s: %s", len(skipped), subset.image_dir, "; ".join(skipped))
        if not found:
            raise DataError(f"no usable image in {subset.image_dir}")
        if None in captions:
            raise DataError(f"{found[captions.index(None)]}: no caption file, and its folder gives no prompt "
                            "(name it <repeats>_<prompt>, or set class_tokens)")
        rules = CaptionRules(subset.shuffle_caption, subset.keep_tokens, subset.caption_dropout_rate)
        for path, caption in zip(found, captions):
            images.paths += [path] * subset.num_repeats
            images.captions += [caption] * subset.num_repeats
            images.rules += [rules] * subset.num_repeats
        name = subset.image_dir.name
        images.folders[name] = {"n_repeats": subset.num_repeats, "img_count": len(found)}
        tags = images.tags.setdefault(name, {})
        for caption in captions:
            for tag in filter(None, (t.strip() for t in caption.split(","))):
                tags[tag] = tags.get(tag, 0) + 1
    return images


# ---------------------------------------------------------------- the trainer's options


CAPTION_OPTIONS = ("caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate")


def resolve_data(args, given: set[str]) -> None:
    """Sets ``args.subsets`` and ``args.reg_subsets`` from whichever source the options name (``--instance_data_dir``,
    ``--dataset_name``, ``--train_data_dir`` or ``--dataset_config``), and the dataset settings a TOML file holds;
    DataError for a clash: two sources, or an option the file sets given again."""
    sources = [name for name in ("instance_data_dir", "dataset_name", "train_data_dir", "dataset_config")
               if getattr(args, name)]
    if len(sources) != 1:
        raise DataError("give one of --instance_data_dir, --dataset_name, --train_data_dir or --dataset_config" +
                        (f", not {' and '.join('--' + s for s in sources)}" if sources else ""))
    diffusers = sources[0] in ("instance_data_dir", "dataset_name")
    args.kohya_epochs = not diffusers  # an epoch is the instance images × repeats, as kohya's
    captions = {name: getattr(args, name) for name in CAPTION_OPTIONS}
    if args.kohya_epochs and args.instance_prompt:
        raise DataError(f"--instance_prompt goes with --instance_data_dir: with --{sources[0]} the folder names or "
                        "class_tokens give the prompts")
    if diffusers and not args.instance_prompt:
        raise DataError(f"--instance_prompt is required with --{sources[0]}")
    if sources[0] == "instance_data_dir":
        if not args.instance_data_dir.is_dir():
            raise DataError(f"--instance_data_dir {args.instance_data_dir} does not exist or is not a folder")
        subsets = [Subset(args.instance_data_dir, args.repeats, args.instance_prompt, False, **captions)]
    elif sources[0] == "dataset_name":
        folder, files, listed = dataset_files(args)
        subsets = [Subset(folder, args.repeats, args.instance_prompt, False, **captions, files=tuple(files),
                          captions=tuple(listed))]
    elif sources[0] == "train_data_dir":
        subsets = subsets_from_folders(args.train_data_dir, False, **_folder_captions(captions))
    else:
        if args.reg_data_dir:
            raise DataError("--reg_data_dir goes with the folders: in a --dataset_config, class images are subsets "
                            "with is_reg = true")
        subsets = _from_toml(args, given)
    if args.reg_data_dir:
        subsets += subsets_from_folders(args.reg_data_dir, True, **_folder_captions(captions))
    args.subsets = [s for s in subsets if not s.is_reg]
    args.reg_subsets = [s for s in subsets if s.is_reg]
    if not args.subsets:
        raise DataError("no instance images: every subset is is_reg (class images)")
    drawn = list(dict.fromkeys(s.class_prompt for s in args.subsets if s.class_prompt))
    if args.reg_subsets:
        if args.class_data_dir or args.class_prompt or drawn:
            raise DataError("the class images come from the regularisation folders: drop --class_data_dir and "
                            "--class_prompt / class_prompt (they are for class images the base model draws)")
        args.with_prior_preservation = True
    elif drawn:  # each subject's class, drawn by the base model
        if args.class_prompt:
            raise DataError(f"{args.dataset_config}: its subsets name their class_prompt: drop --class_prompt")
        args.with_prior_preservation = True
    args.class_prompts = drawn or ([args.class_prompt] if args.class_prompt else [])


def _folder_captions(captions: dict) -> dict:
    """kohya's folders read .txt or .caption files unless --caption_extension names one."""
    return {**captions, "caption_extension": captions["caption_extension"] or AUTO_CAPTIONS}


def _from_toml(args, given: set[str]) -> list[Subset]:
    config = read_dataset_config(args.dataset_config)
    for option, (key, line) in config.lines.items():
        if option in given:
            raise DataError(f"{args.dataset_config}:{line}: {key} is set here and by --{option}: give it once")
    for option, value in config.options.items():
        setattr(args, option, value)
    # what the file leaves unset, the command line's caption options and --repeats give every subset
    unset = {name: getattr(args, name) for name in (*CAPTION_OPTIONS, "repeats") if name not in config.lines}
    unset = {{"repeats": "num_repeats"}.get(k, k): v for k, v in unset.items()}
    unset["caption_extension"] = unset.get("caption_extension", None) or AUTO_CAPTIONS
    return [dataclasses.replace(s, **{k: v for k, v in unset.items() if k != "caption_extension" or s.caption_extension
                                      is None}) for s in config.subsets]
