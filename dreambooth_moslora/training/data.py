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
from ..runtime import BATCH_ORDER, CLASS_IMAGE_NOISE, CROP_AND_FLIP, LOADER_WORKERS, seeded_generator
from ..safe_files import save_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Images are decoded at no more than this many pixels: a 100-megapixel photo is reduced while
# decoding (JPEG) or right after, instead of being kept whole in memory for every epoch.
MAX_DECODE_PIXELS = 16 * 1024 * 1024
# Formats that cannot be decoded at a reduced size are refused beyond this (about 0.8 GB as RGB).
MAX_FULL_DECODE_PIXELS = 256 * 1024 * 1024


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


def scan_images(directory: str | os.PathLike, what: str = "instance") -> tuple[list[Path], list[str]]:
    """The usable images of a folder (sorted) and a list of the files skipped, with reasons."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{what} data dir {directory} does not exist")
    usable, skipped = [], []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            if path.suffix.lower() != ".txt":  # captions live beside the images
                skipped.append(f"{path.name}: not an image file")
            continue
        try:
            load_image(path)  # a full decode: truncated and corrupt files show up here, not mid-training
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


def read_caption(image_path: Path, caption_extension: str | None, fallback: str) -> str:
    if caption_extension:
        caption_path = image_path.with_suffix(caption_extension if caption_extension.startswith(".") else f".{caption_extension}")
        if caption_path.is_file():
            text = " ".join(caption_path.read_text(encoding="utf-8", errors="replace").split())
            if text:
                return text
    return fallback


# ---------------------------------------------------------------- buckets and crops


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs of about resolution² pixels, sides multiples of ``step``, aspect ≤ max_aspect."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_aspect:
        height = int(area / width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
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


def prepare(
    image: Image.Image, target: tuple[int, int], center_crop: bool, random_flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover ``target`` = (h, w), crop to it, maybe flip; returns pixels and the crop's top-left."""
    th, tw = target
    scale = max(th / image.height, tw / image.width)
    new_size = (max(tw, round(image.width * scale)), max(th, round(image.height * scale)))
    image = image.resize(new_size, Image.BICUBIC) if new_size != image.size else image
    if center_crop:
        top, left = (image.height - th) // 2, (image.width - tw) // 2
    else:
        top = int(torch.randint(0, image.height - th + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.width - tw + 1, (1,), generator=generator))
    image = image.crop((left, top, left + tw, top + th))
    flip = random_flip and bool(torch.rand(1, generator=generator) < 0.5)
    if flip:
        image = ImageOps.mirror(image)
        left = new_size[0] - left - tw  # SDXL conditions on where the crop lies in the flipped image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


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
    ):
        if not instance_images:
            raise DataError("no usable instance image")
        self.instance_images = list(instance_images)
        self.captions = [read_caption(p, caption_extension, instance_prompt) for p in self.instance_images]
        self.class_images = list(class_images or [])
        # Class images may carry captions too (the same extension); the class prompt is the fallback.
        self.class_captions = [read_caption(p, caption_extension, class_prompt) for p in self.class_images]
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.buckets = make_buckets(resolution, bucket_step) if aspect_ratio_buckets else [(resolution, resolution)]
        # Sizes come from the headers alone; the pixels are read when an item is asked for.
        self.instance_sizes = [image_size(p) for p in self.instance_images]
        self.class_sizes = [image_size(p) for p in self.class_images]
        self.instance_bucket = [nearest_bucket(s, self.buckets) for s in self.instance_sizes]
        self.resolution = resolution
        small = [p.name for p, (h, w) in zip(self.instance_images, self.instance_sizes) if min(h, w) < resolution]
        if small:
            logger.warning("upscaling %d image(s) smaller than %d px: %s", len(small), resolution, ", ".join(small))

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.instance_bucket[index % len(self.instance_images)]

    def example(self, kind: str, index: int, epoch: int, bucket: tuple[int, int]) -> Example:
        paths, sizes = (self.instance_images, self.instance_sizes) if kind == "instance" else (self.class_images, self.class_sizes)
        i = index % len(paths)
        generator = seeded_generator(self.seed, epoch, CROP_AND_FLIP[kind != "instance"], index)
        pixels, crop = prepare(load_image(paths[i]), bucket, self.center_crop, self.random_flip, generator)
        caption = (self.captions if kind == "instance" else self.class_captions)[i]
        return Example(pixels, sizes[i], crop, caption)

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
    return batch


@torch.no_grad()
def cache_latents(dataset: DreamBoothDataset, vae, device) -> list[dict]:
    """Each item with its examples' latent distributions in place of pixels, from its epoch-0 crop and flip."""
    cache = []
    for index in range(len(dataset)):
        item = dataset[(0, index)]
        pixels = collate([item])["pixels"]
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        for row, kind in enumerate(item):  # instance first, then class: collate's order
            item[kind] = dataclasses.replace(item[kind], pixels=None, latent_mean=dist.mean[row].cpu(), latent_std=dist.std[row].cpu())
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


def batch_source(dataset, batches: list[list[int]], epoch: int, latent_cache: list | None, num_workers: int) -> Iterator[dict]:
    """Collated batches for the given lists of indices: from the latent cache, or read by a data loader."""
    if latent_cache is not None:
        for indices in batches:
            yield collate([latent_cache[i] for i in indices])
        return
    yield from torch.utils.data.DataLoader(
        dataset, batch_sampler=[[(epoch, i) for i in b] for b in batches], collate_fn=collate, num_workers=num_workers,
        # its own generator: a loader drawing its workers' seed from the global one would shift
        # dropout's random numbers in a resumed run, which starts its loader mid-epoch
        generator=seeded_generator(epoch, LOADER_WORKERS),
    )  # fmt: skip


# ---------------------------------------------------------------- class images for prior preservation


def generate_class_images(
    pipeline_factory, class_dir: Path, class_prompt: str, num_class_images: int, sample_batch_size: int, seed: int,
    resolution: int, num_inference_steps: int = 50, progress=None,
) -> int:  # fmt: skip
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
