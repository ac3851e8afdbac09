"""Reading training images safely, captions, buckets, batch order and class images."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_moslora.training.data import (
    DataError,
    DreamBoothDataset,
    collate,
    epoch_batches,
    generate_class_images,
    image_size,
    load_image,
    make_buckets,
    nearest_bucket,
    scan_images,
)
from toyworld.tiny_sdxl import build_tiny_sdxl
from toyworld.world import write_subject


def gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    array = gradient(80, 40)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "r.jpg")
    assert image.size == (40, 80)  # portrait once upright
    assert image_size(tmp_path / "r.jpg") == (80, 40)  # (height, width) from the header alone
    expected = np.asarray(Image.fromarray(array).transpose(Image.ROTATE_270))
    assert np.abs(np.asarray(image).astype(int) - expected).mean() < 6


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(gradient(32, 32)[..., 0], "L"),
        lambda: Image.fromarray(np.dstack([gradient(32, 32), np.full((32, 32), 128, np.uint8)]), "RGBA"),
        lambda: Image.fromarray(gradient(32, 32)).convert("P", palette=Image.ADAPTIVE, colors=16),
        lambda: Image.fromarray(gradient(32, 32)).convert("CMYK"),
        lambda: Image.fromarray(gradient(32, 32)[..., 0].astype(np.uint16) * 257),
        lambda: Image.fromarray(gradient(32, 32)[..., 0], "L").convert("LA"),
    ],
    ids=["grayscale", "rgba", "palette", "cmyk", "16-bit", "gray-alpha"],
)
def test_every_mode_becomes_8bit_rgb(tmp_path, make):
    image = make()
    path = tmp_path / ("x.jpg" if image.mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (32, 32)
    array = np.asarray(loaded)
    assert array.std() > 20  # the picture survived, not a blank or black frame
    if image.mode == "RGBA":  # half-transparent pixels are composited onto white
        assert array.mean() > np.asarray(Image.fromarray(gradient(32, 32))).mean()


def test_very_large_jpeg_is_reduced_while_decoding(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.fromarray(gradient(6000, 4000)).save(path, quality=80)
    image = load_image(path, max_pixels=1_000_000)
    assert image.width * image.height <= 1_000_000 and image.width > image.height
    assert abs(image.width / image.height - 1.5) < 0.02


def test_a_decompression_bomb_is_refused_without_decoding_it(tmp_path):
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    side = 20_000  # 400 megapixels of grey, a few kilobytes on disk
    row = b"\0" + b"\x80" * side
    body = zlib.compress(row * 64)[:2000]  # the header alone is what is checked; the data need not be whole
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
    (tmp_path / "bomb.png").write_bytes(png + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match="too large to decode safely"):
        load_image(tmp_path / "bomb.png")


def test_scan_skips_bad_files_with_reasons(tmp_path):
    write_subject(tmp_path, count=2)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = tmp_path / "sks_circle_0.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    usable, skipped = scan_images(tmp_path)
    assert [p.name for p in usable] == ["sks_circle_0.png", "sks_circle_1.png"]
    reasons = dict(s.split(": ", 1) for s in skipped)
    assert reasons["empty.png"] == "empty file"
    assert reasons["notes.pdf"] == "not an image file"
    assert reasons["broken.jpg"].startswith("not a readable image")
    assert reasons["truncated.png"].startswith("not a readable image")
    with pytest.raises(DataError, match="does not exist"):
        scan_images(tmp_path / "nope")


def test_dataset_captions_conditioning_and_upscale_warning(tmp_path, caplog):
    paths = write_subject(tmp_path / "inst", count=3, size=48)
    (tmp_path / "inst" / "sks_circle_2.txt").unlink()  # falls back to the instance prompt
    class_dir = tmp_path / "cls"
    class_dir.mkdir()
    Image.fromarray(gradient(96, 64)).save(class_dir / "00000-a.png")
    with caplog.at_level(logging.WARNING):
        ds = DreamBoothDataset(paths, "a sks circle", 64, [class_dir / "00000-a.png"], "a circle",
                               caption_extension=".txt", center_crop=True)
    assert "upscaling 3 image(s) smaller than 64 px" in caplog.text
    batch = collate([ds[(0, i)] for i in range(3)])
    assert batch["pixels"].shape == (6, 3, 64, 64) and batch["num_instance"] == 3
    assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
    assert batch["captions"][:3] == [
        "a sks circle on a black background", "a sks circle on a white background", "a sks circle",
    ]
    assert batch["captions"][3:] == ["a circle"] * 3
    # each example carries its own original size and crop: the class image is 64×96, centre-cropped
    assert batch["original_sizes"][0] == (48, 48) and batch["original_sizes"][3] == (64, 96)
    assert batch["crops_top_left"][0] == (0, 0) and batch["crops_top_left"][3] == (0, 16)


def test_class_images_use_their_own_captions_when_they_have_them(tmp_path):
    """Captioned regularization images keep their captions; the class prompt covers the others."""
    paths = write_subject(tmp_path / "inst", count=2)
    class_dir = tmp_path / "cls"
    class_dir.mkdir()
    for name in ("00000-a", "00001-b"):
        Image.fromarray(gradient(32, 32)).save(class_dir / f"{name}.png")
    (class_dir / "00000-a.txt").write_text("a circle on a  gray background\n")
    classes = sorted(class_dir.glob("*.png"))
    ds = DreamBoothDataset(paths, "a sks circle", 32, classes, "a circle", caption_extension=".txt")
    assert ds.class_captions == ["a circle on a gray background", "a circle"]
    batch = collate([ds[(0, i)] for i in range(2)])
    assert batch["captions"][2:] == ["a circle on a gray background", "a circle"]
    # without a caption extension every class image is the class prompt, as in diffusers' script
    plain = DreamBoothDataset(paths, "a sks circle", 32, classes, "a circle")
    assert plain.class_captions == ["a circle", "a circle"]


def test_random_crop_and_flip_are_a_function_of_seed_epoch_and_index(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(gradient(128, 64)).save(path)
    ds = DreamBoothDataset([path], "p", 64, random_flip=True, seed=3)
    a, b = ds[(0, 0)]["instance"], ds[(0, 0)]["instance"]
    assert torch.equal(a.pixels, b.pixels) and a.crop_top_left == b.crop_top_left
    others = [ds[(e, 0)]["instance"] for e in range(1, 12)]
    assert any(o.crop_top_left != a.crop_top_left or not torch.equal(o.pixels, a.pixels) for o in others)


def test_buckets_keep_the_area_and_group_batches(tmp_path):
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and (768, 1344) in buckets or (832, 1216) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and 0.8 <= h * w / 1024**2 <= 1.0 for h, w in buckets)
    assert nearest_bucket((600, 1000), buckets)[1] > nearest_bucket((600, 1000), buckets)[0]
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 128), (130, 64), (64, 64)]):
        Image.fromarray(gradient(w, h)).save(tmp_path / f"{i}.png")
    ds = DreamBoothDataset(sorted(tmp_path.glob("*.png")), "p", 64, aspect_ratio_buckets=True, bucket_step=8)
    assert len({ds.bucket_of(i) for i in range(5)}) == 3
    batches = epoch_batches(ds, 2, epoch=0, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in batches)
    assert epoch_batches(ds, 2, epoch=0, seed=0) == batches
    assert any(epoch_batches(ds, 2, epoch=e, seed=0) != batches for e in range(1, 6))
    batch = collate([ds[(0, i)] for i in batches[0]])
    h, w = ds.bucket_of(batches[0][0])
    assert batch["pixels"].shape[-2:] == (h, w) and h * w <= 64 * 64


def test_class_image_generation_resumes_with_the_same_images(tmp_path):
    def factory():
        pipe = build_tiny_sdxl(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    folder = tmp_path / "class"
    assert generate_class_images(factory, folder, "a circle", 3, 2, seed=0, resolution=32, num_inference_steps=2) == 3
    first = sorted(p.name for p in folder.iterdir())
    assert len(first) == 3 and all(p.endswith(".png") for p in first)
    removed = np.asarray(Image.open(folder / first[1]), dtype=int)
    (folder / first[1]).unlink()  # as if generation had been interrupted there
    assert generate_class_images(factory, folder, "a circle", 3, 2, seed=0, resolution=32, num_inference_steps=2) == 1
    again = sorted(folder.iterdir())
    assert [p.name for p in again][::2] == first[::2] and again[1].name.startswith("00001-")
    # the same seed gives the same image; batched alone rather than in a pair, pixels may differ by rounding
    assert np.abs(np.asarray(Image.open(again[1]), dtype=int) - removed).max() <= 2
    assert generate_class_images(factory, folder, "a circle", 3, 2, seed=0, resolution=32) == 0
