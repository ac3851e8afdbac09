"""Training data: reading images safely, captions, aspect-ratio buckets, class images, batches.

Every random choice (crop, flip, order) is drawn from a generator seeded with (seed, epoch,
index) by the one seed scheme (``runtime.seeded_generator``), never from global state, so a
resumed run sees exactly the batches an uninterrupted one would, whatever the number of
dataloader workers. With cached latents a batch comes from the cache instead of the images, in
the same order and shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError
from ..runtime import BATCH_ORDER, CAPTIONS, CLASS_IMAGE_NOISE, CROP_AND_FLIP, LOADER_WORKERS, seeded_generator
from ..safe_files import save_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Images are decoded at no more than this many pixels: a 100-megapixel photo is reduced while
# decoding (JPEG) or right after, instead of being kept whole in memory for every epoch.
MAX_DECODE_PIXELS = 16 * 1024 * 1024
# Formats that cannot be decoded at a reduced size are refused beyond this (about 0.8 GB as RGB).
MAX_FULL_DECODE_PIXELS = 256 * 1024 * 1024
# --image_interpolation_mode: diffusers' names (torchvision's modes) and the PIL filter each stands for on an image.
RESAMPLING = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX,
              "hamming": Image.HAMMING, "nearest": Image.NEAREST, "nearest_exact": Image.NEAREST}


# ---------------------------------------------------------------- reading one image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency onto white, 16-bit scaled down, CMYK and palettes converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Opens an image as RGB with its EXIF orientation applied, reducing huge ones while decoding.

    Raises DataError for a file that is empty, not an image, or corrupt.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # we reduce big images ourselves, below
            try:
                image = Image.open(path)
                if image.format != "JPEG" and image.width * image.height > MAX_FULL_DECODE_PIXELS:
                    # only JPEG can be decoded reduced; anything else this big would be decoded whole
                    raise DataError(f"{path.name}: {image.width}×{image.height} is too large to decode safely")
                if image.width * image.height > max_pixels:
                    # JPEG decodes straight at 1/2, 1/4 or 1/8 scale: the full image never exists in memory
                    factor = math.sqrt(max_pixels / (image.width * image.height))
                    image.draft("RGB", (max(1, int(image.width * factor)), max(1, int(image.height * factor))))
                image.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
        image = ImageOps.exif_transpose(image)
        if image.width * image.height > max_pixels:
            factor = math.sqrt(max_pixels / (image.width * image.height))
            image = image.resize((max(1, int(image.width * factor)), max(1, int(image.height * factor))), Image.BICUBIC)
        return to_rgb(image)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path.name}: not a readable image ({type(exc).__name__}: {str(exc)[:80]})") from None


def load_alpha(path: Path) -> Image.Image | None:
    """An image's alpha channel (EXIF orientation applied) as a grayscale image, or None when it has none."""
    with Image.open(path) as image:
        if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
            return None
        return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")


def find_masks(images: list[Path], mask_dir: Path) -> list[Path | None]:
    """Each image's mask in ``mask_dir`` (same name, any image extension), checked; missing ones are None, with a
    warning."""
    if not Path(mask_dir).is_dir():
        raise DataError(f"mask dir {mask_dir} does not exist")
    by_stem = {p.stem: p for p in sorted(Path(mask_dir).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    masks, missing, converted = [], [], []
    for image in images:
        mask = by_stem.get(image.stem)
        masks.append(mask)
        if mask is None:
            missing.append(image.name)
            continue
        try:
            with Image.open(mask) as m, Image.open(image) as i:
                mask_size, image_size_, mode = m.size, i.size, m.mode
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{mask.name}: not a readable mask image ({type(exc).__name__})") from None
        if mask_size != image_size_:
            raise DataError(f"mask {mask.name} is {mask_size[0]}×{mask_size[1]} but its image {image.name} is "
                            f"{image_size_[0]}×{image_size_[1]}: a mask must have its image's size")
        if mode not in ("L", "1", "I", "I;16", "F"):
            converted.append(mask.name)
    if missing:
        logger.warning("no mask in %s for %d image(s), their whole picture counts: %s", mask_dir, len(missing),
                       ", ".join(missing))
    if converted:
        logger.warning("masks that are not grayscale are converted to it (luminance): %s", ", ".join(converted))
    return masks


def scan_images(directory: str | os.PathLike, what: str = "instance") -> tuple[list[Path], list[str]]:
    """The usable images of a folder (sorted) and a list of the files skipped, with reasons."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{what} data dir {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped = check_images([p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS])
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS | {".txt"}]  # captions live beside
    return images, [f"{p.name}: not an image file" for p in others] + skipped


def check_images(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The files that decode as images, in order, and the others with reasons: a full decode, so truncated and
    corrupt files show up here, not mid-training."""
    usable, skipped = [], []
    for path in paths:
        try:
            load_image(path)
            usable.append(path)
        except DataError as exc:
            skipped.append(str(exc))
    return usable, skipped


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the image will be seen (EXIF rotation applied), from its header alone."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


AUTO_CAPTIONS = "auto"  # caption extension: .txt, else .caption (kohya_ss writes the one, sd-scripts reads the other)


def read_caption(image_path: Path, caption_extension: str | None, fallback: str) -> str:
    extensions = (".txt", ".caption") if caption_extension == AUTO_CAPTIONS else (caption_extension,) \
        if caption_extension else ()
    for extension in extensions:
        caption_path = image_path.with_suffix(extension if extension.startswith(".") else f".{extension}")
        if caption_path.is_file():
            text = " ".join(caption_path.read_text(encoding="utf-8", errors="replace").split())
            if text:
                return text
    return fallback


@dataclass(frozen=True)
class CaptionRules:
    """How a caption is varied each time it is drawn, as sd-scripts does: dropped (the empty caption) at
    ``dropout_rate``, else with its comma-separated tags shuffled after the first ``keep_tokens``."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        return self.shuffle or self.dropout_rate > 0

    def apply(self, caption: str, generator: torch.Generator) -> str:
        if self.dropout_rate > 0 and float(torch.rand(1, generator=generator)) < self.dropout_rate:
            return ""
        if not self.shuffle:
            return caption
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        return ", ".join(kept + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])


# ---------------------------------------------------------------- buckets and crops


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0,
                 limits: tuple[int | None, int | None] = (None, None)) -> list[tuple[int, int]]:
    """(height, width) pairs of about resolution² pixels, sides multiples of ``step``, aspect ≤ max_aspect, and sides
    within ``limits`` (kohya's --min_bucket_reso, --max_bucket_reso) when given."""
    area = resolution * resolution
    low, high = limits[0] or step, limits[1] or resolution * max_aspect
    buckets = set()
    width = step
    while width <= resolution * max_aspect:
        height = int(area / width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect and low <= min(width, height) \
                and max(width, height) <= high:
            buckets.add((height, width))
        width += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to that of ``size`` = (height, width)."""
    aspect = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1]))


@dataclass
class Example:
    pixels: torch.Tensor | None  # 3×H×W in [-1, 1]; None once encoded
    original_size: tuple[int, int]  # (height, width) of the image as read
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized coordinates
    caption: str
    latent_mean: torch.Tensor | None = None  # the VAE's posterior, when latents are cached
    latent_std: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # 1×H×W in [0, 1], cropped and flipped with the pixels; None: all of it counts


@dataclass(frozen=True)
class CropPlan:
    """Where an image of ``size`` = (w, h) is resized to, cropped and flipped: drawn once, applied to the
    image and to its mask alike."""

    resized: tuple[int, int]  # (w, h)
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flip: bool

    @classmethod
    def draw(cls, size, target, center_crop: bool, random_flip: bool, generator: torch.Generator) -> CropPlan:
        (width, height), (th, tw) = size, target
        scale = max(th / height, tw / width)
        resized = (max(tw, round(width * scale)), max(th, round(height * scale)))
        if center_crop:
            top, left = (resized[1] - th) // 2, (resized[0] - tw) // 2
        else:
            top = int(torch.randint(0, resized[1] - th + 1, (1,), generator=generator))
            left = int(torch.randint(0, resized[0] - tw + 1, (1,), generator=generator))
        flip = random_flip and bool(torch.rand(1, generator=generator) < 0.5)
        return cls(resized, (left, top, left + tw, top + th), flip)

    def apply(self, image: Image.Image, resample=Image.LANCZOS) -> Image.Image:
        image = image.resize(self.resized, resample) if self.resized != image.size else image
        image = image.crop(self.box)
        return ImageOps.mirror(image) if self.flip else image

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) as SDXL conditions on it: where the crop lies in the (flipped) resized image."""
        left, top, right, _ = self.box
        return top, (self.resized[0] - right if self.flip else left)


def prepare(
    image: Image.Image, target: tuple[int, int], center_crop: bool, random_flip: bool, generator: torch.Generator,
    interpolation: str = "lanczos",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover ``target`` = (h, w), crop to it, maybe flip; returns pixels and the crop's top-left."""
    plan = CropPlan.draw(image.size, target, center_crop, random_flip, generator)
    return to_pixels(plan.apply(image, RESAMPLING[interpolation])), plan.crop_top_left


def to_pixels(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_mask(image: Image.Image) -> torch.Tensor:
    """A grayscale mask as 1×H×W in [0, 1]: 1 where the loss counts fully."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


# ---------------------------------------------------------------- the dataset


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their captions, each paired with a class image when prior preservation is on.

    An item is (epoch, index); the bucket of an item is that of its instance image.
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        resolution: int,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        caption_extension: str | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        aspect_ratio_buckets: bool = False,
        bucket_step: int = 64,
        seed: int = 0,
        mask_dir: Path | None = None,
        alpha_mask: bool = False,
        captions: list[str] | None = None,
        class_captions: list[str] | None = None,
        caption_rules: list[CaptionRules] | None = None,
        class_caption_rules: list[CaptionRules] | None = None,
        length: int | None = None,
        bucket_limits: tuple[int | None, int | None] = (None, None),
        interpolation: str = "lanczos",
    ):
        """``captions``/``class_captions``: each image's caption as already read (else read here, with the prompt as
        the fallback); ``caption_rules``: how each image's caption varies from draw to draw; ``length``: the items
        of an epoch (default: the larger of the two sets, as diffusers pairs them; kohya's: the instance images)."""
        if not instance_images:
            raise DataError("no usable instance image")
        # Masked loss: a mask per instance image (same name in mask_dir, kohya's convention), or its alpha channel.
        self.mask_files = find_masks(instance_images, mask_dir) if mask_dir is not None else None
        self.alpha_mask = alpha_mask
        self.instance_images = list(instance_images)
        self.captions = captions or [read_caption(p, caption_extension, instance_prompt) for p in self.instance_images]
        self.class_images = list(class_images or [])
        # Class images may carry captions too (the same extension); the class prompt is the fallback.
        self.class_captions = class_captions or [read_caption(p, caption_extension, class_prompt)
                                                 for p in self.class_images]
        self.rules = {"instance": caption_rules, "class": class_caption_rules}
        self.length = length
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.resample = RESAMPLING[interpolation]
        self.buckets = make_buckets(resolution, bucket_step, limits=bucket_limits) if aspect_ratio_buckets \
            else [(resolution, resolution)]
        # Sizes come from the headers alone; the pixels are read when an item is asked for.
        self.instance_sizes = [image_size(p) for p in self.instance_images]
        self.class_sizes = [image_size(p) for p in self.class_images]
        self.instance_bucket = [nearest_bucket(s, self.buckets) for s in self.instance_sizes]
        self.resolution = resolution
        small = [p.name for p, (h, w) in zip(self.instance_images, self.instance_sizes) if min(h, w) < resolution]
        if small:
            logger.warning("upscaling %d image(s) smaller than %d px: %s", len(small), resolution, ", ".join(small))

    def __len__(self) -> int:
        return self.length or max(len(self.instance_images), len(self.class_images))

    @property
    def captions_vary(self) -> bool:
        return any(rule.varies for rules in self.rules.values() for rule in rules or [])

    def caption(self, kind: str, index: int, epoch: int) -> str:
        """The caption of item ``index``'s instance or class image as drawn in ``epoch`` (the same in a resumed run)."""
        captions, rules = (self.captions if kind == "instance" else self.class_captions), self.rules[kind]
        i = index % len(captions)
        if not rules or not rules[i].varies:
            return captions[i]
        return rules[i].apply(captions[i], seeded_generator(self.seed, epoch, CAPTIONS, kind != "instance", index))

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.instance_bucket[index % len(self.instance_images)]

    def example(self, kind: str, index: int, epoch: int, bucket: tuple[int, int]) -> Example:
        paths, sizes = ((self.instance_images, self.instance_sizes) if kind == "instance"
                        else (self.class_images, self.class_sizes))
        i = index % len(paths)
        generator = seeded_generator(self.seed, epoch, CROP_AND_FLIP[kind != "instance"], index)
        image = load_image(paths[i])
        plan = CropPlan.draw(image.size, bucket, self.center_crop, self.random_flip, generator)
        mask = self.mask_of(i, image.size) if kind == "instance" else None
        mask = None if mask is None else to_mask(plan.apply(mask, Image.BILINEAR))
        caption = self.caption(kind, index, epoch)
        return Example(to_pixels(plan.apply(image, self.resample)), sizes[i], plan.crop_top_left, caption, mask=mask)

    def mask_of(self, index: int, size: tuple[int, int]) -> Image.Image | None:
        """The instance image's mask as a grayscale image of the loaded image's ``size``, or None (no mask)."""
        if self.mask_files is not None and self.mask_files[index] is not None:
            mask = ImageOps.exif_transpose(Image.open(self.mask_files[index])).convert("L")
        elif self.alpha_mask:
            mask = load_alpha(self.instance_images[index])
        else:
            return None
        return mask.resize(size, Image.BILINEAR) if mask is not None and mask.size != size else mask

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        bucket = self.bucket_of(index)
        examples = {"instance": self.example("instance", index, epoch, bucket)}
        if self.class_images:
            examples["class"] = self.example("class", index, epoch, bucket)
        return examples


def collate(items: list[dict]) -> dict:
    """Instance examples first, then their class examples, as one batch (the loss splits it again).

    Items are the dataset's, or the latent cache's (examples that carry latents instead of pixels).
    """
    examples = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    batch = {
        "original_sizes": [e.original_size for e in examples],
        "crops_top_left": [e.crop_top_left for e in examples],
        "captions": [e.caption for e in examples],
        "num_instance": len(items),
    }
    if examples[0].latent_mean is not None:
        batch["latent_mean"] = torch.stack([e.latent_mean for e in examples])
        batch["latent_std"] = torch.stack([e.latent_std for e in examples])
    else:
        batch["pixels"] = torch.stack([e.pixels for e in examples])
    if any(e.mask is not None for e in examples):  # examples without a mask count whole
        first = next(e.mask for e in examples if e.mask is not None)
        batch["masks"] = torch.stack([e.mask if e.mask is not None else torch.ones_like(first) for e in examples])
    return batch


@torch.no_grad()
def cache_latents(dataset: DreamBoothDataset, vae, device) -> list[dict]:
    """Each item with its examples' latent distributions in place of pixels, from its epoch-0 crop and flip.

    The cache stays on the device (a 1024-px image's latents take 256 KiB, mean and spread 0.5 MiB), masks
    too: a step then reads its batch without a copy from the host."""
    cache = []
    for index in range(len(dataset)):
        item = dataset[(0, index)]
        pixels = collate([item])["pixels"]
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        for row, kind in enumerate(item):  # instance first, then class: collate's order
            mask = item[kind].mask
            item[kind] = dataclasses.replace(item[kind], pixels=None, latent_mean=dist.mean[row].clone(),
                                             latent_std=dist.std[row].clone(),
                                             mask=None if mask is None else mask.to(device))
        cache.append(item)
    return cache


def epoch_batches(dataset: DreamBoothDataset, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The batches of one epoch, each from a single bucket, in a seeded order."""
    generator = seeded_generator(seed, epoch, BATCH_ORDER)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in torch.randperm(len(dataset), generator=generator).tolist():
        by_bucket.setdefault(dataset.bucket_of(index), []).append(index)
    batches = [ids[i : i + batch_size] for _, ids in sorted(by_bucket.items()) for i in range(0, len(ids), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes, and how they fall into epochs.

    Each epoch is cut to a whole number of optimizer steps per process (cycling its batches when
    there are fewer than processes × accumulation), so all processes take the same steps.
    """

    steps_per_epoch: int
    max_steps: int
    num_epochs: int

    @classmethod
    def make(cls, batches_in_epoch: int, processes: int, accumulation: int, max_steps: int | None, epochs: int):
        steps_per_epoch = math.ceil(math.ceil(batches_in_epoch / processes) / accumulation)
        max_steps = max_steps or epochs * steps_per_epoch
        return cls(steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))


def process_batches(batches: list[list[int]], needed: int, rank: int, world: int) -> list[list[int]]:
    """This process's share of an epoch's batches, ``needed`` in all (cycled when there are fewer)."""
    batches = (batches * math.ceil(needed / len(batches)))[:needed]
    return batches[rank::world]


def batch_source(dataset, batches: list[list[int]], epoch: int, latent_cache: list | None, num_workers: int,
                 pin_memory: bool = False) -> Iterator[dict]:
    """Collated batches for the given lists of indices: from the latent cache, or read by a data loader."""
    if latent_cache is not None:
        for indices in batches:
            items = [latent_cache[i] for i in indices]
            if dataset.captions_vary:  # the cache holds epoch 0's captions: this epoch's draws instead
                items = [{kind: dataclasses.replace(example, caption=dataset.caption(kind, i, epoch))
                          for kind, example in item.items()} for i, item in zip(indices, items)]
            yield collate(items)
        return
    yield from torch.utils.data.DataLoader(
        dataset, batch_sampler=[[(epoch, i) for i in b] for b in batches], collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory,  # pinned pages copy to the GPU without stopping the host
        # its own generator: a loader drawing its workers' seed from the global one would shift
        # dropout's random numbers in a resumed run, which starts its loader mid-epoch
        generator=seeded_generator(epoch, LOADER_WORKERS),
    )


# ---------------------------------------------------------------- class images for prior preservation


def generate_class_images(
    pipeline_factory, class_dir: Path, class_prompt: str, num_class_images: int, sample_batch_size: int, seed: int,
    resolution: int, num_inference_steps: int = 50, progress=None,
) -> int:
    """Generates the class images that ``class_dir`` lacks; returns how many it made.

    Existing images count. Each image is written (atomically) as soon as it is made, under a
    name that records its index, and image ``i`` always starts from the noise of seed (seed, i):
    an interrupted generation resumes where it stopped and makes the images it would have made
    (to rounding: a different batch grouping can move a pixel value by one).
    """
    class_dir.mkdir(parents=True, exist_ok=True)
    existing, _ = scan_images(class_dir, "class")
    missing = num_class_images - len(existing)
    if missing <= 0:
        return 0
    taken = {p.stem.split("-")[0] for p in existing}
    todo = [i for i in range(num_class_images) if f"{i:05d}" not in taken][:missing]
    pipe = pipeline_factory()
    made = 0
    for start in range(0, len(todo), sample_batch_size):
        indices = todo[start : start + sample_batch_size]
        generators = [seeded_generator(seed, CLASS_IMAGE_NOISE, i) for i in indices]
        images = pipe(
            prompt=[class_prompt] * len(indices), generator=generators, height=resolution, width=resolution,
            num_inference_steps=num_inference_steps,
        ).images
        for i, image in zip(indices, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:10]
            save_image(image, class_dir / f"{i:05d}-{digest}.png")
            made += 1
        if progress is not None:
            progress.update(len(indices))
    return made
