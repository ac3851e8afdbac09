"""Masked loss: a mask per image (a folder of them, or the alpha channel) weights the loss; crops, flips and
cached latents carry it exactly as they carry the pixels; bad masks are a clear warning or error."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_moslora.errors import DataError
from dreambooth_moslora.training import main
from dreambooth_moslora.training.data import DreamBoothDataset, cache_latents, collate
from dreambooth_moslora.training.loss import masked_mean

from .conftest import argv


def scene(path, size=(48, 40), box=(8, 6, 30, 26)):
    """An image whose red square is exactly its mask's white square; other pixels random (so crops show)."""
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = (255, 0, 0)
    mask[top:bottom, left:right] = 255
    Image.fromarray(pixels).save(path)
    return Image.fromarray(mask)


def test_crops_flips_and_buckets_move_the_mask_with_the_pixels(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    paths = []
    for i, size in enumerate([(48, 40), (40, 64), (64, 48)]):
        path = images / f"img{i}.png"
        scene(path, size).save(masks / f"img{i}.png")
        paths.append(path)
    ds = DreamBoothDataset(paths, "a sks thing", 32, random_flip=True, aspect_ratio_buckets=True, bucket_step=8,
                           mask_dir=masks)
    seen_flip = False
    for epoch in range(6):
        for index in range(len(paths)):
            example = ds[(epoch, index)]["instance"]
            red = (example.pixels[0] > 0.9) & (example.pixels[1] < -0.8)
            assert example.mask.shape == (1, *example.pixels.shape[1:])
            inside = example.mask[0] > 0.99
            assert (inside & ~red).sum() == 0 and (red & (example.mask[0] < 0.01)).sum() == 0
            seen_flip |= bool(example.crop_top_left[1] != 0)
    assert seen_flip
    batch = collate([ds[(0, 0)], ds[(0, 0)]])
    assert batch["masks"].shape == (2, 1, *batch["pixels"].shape[2:])


def test_the_alpha_channel_is_a_mask_and_class_examples_count_whole(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0], rgba[8:24, 8:24, 3] = 200, 255
    path = tmp_path / "subject.png"
    Image.fromarray(rgba, "RGBA").save(path)
    cls = tmp_path / "class.png"
    Image.new("RGB", (32, 32), "blue").save(cls)
    ds = DreamBoothDataset([path], "a sks thing", 32, class_images=[cls], class_prompt="a thing", alpha_mask=True)
    batch = collate([ds[(0, 0)]])
    assert batch["masks"].shape == (2, 1, 32, 32)
    assert float(batch["masks"][0].mean()) == pytest.approx(0.25, abs=0.01)  # 16² of 32²
    assert torch.equal(batch["masks"][1], torch.ones(1, 32, 32))  # the class example: no mask


def test_masked_mean_ignores_what_the_mask_leaves_out():
    per_pixel = torch.rand(2, 4, 8, 8)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :16] = 1  # the upper half counts
    changed = per_pixel.clone()
    changed[:, :, 4:] += 5.0  # a change in the lower half only
    assert torch.allclose(masked_mean(per_pixel, masks, 0.0), masked_mean(changed, masks, 0.0))
    assert torch.allclose(masked_mean(per_pixel, masks, 0.0), per_pixel[:, :, :4].mean(dim=(1, 2, 3)))
    assert torch.allclose(masked_mean(per_pixel, torch.ones(2, 1, 32, 32), 0.0), per_pixel.mean(dim=(1, 2, 3)))
    assert torch.allclose(masked_mean(per_pixel, masks, 1.0), per_pixel.mean(dim=(1, 2, 3)))  # weight 1: no mask


def test_cached_latents_carry_the_mask(tmp_path, tiny_pipe):
    path = tmp_path / "img.png"
    scene(path, (32, 32)).save(tmp_path / "mask.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    (tmp_path / "mask.png").rename(masks / "img.png")
    ds = DreamBoothDataset([path], "a sks thing", 32, mask_dir=masks)
    cached = collate([cache_latents(ds, tiny_pipe.vae, "cpu")[0]])
    fresh = collate([ds[(0, 0)]])
    assert "pixels" not in cached and torch.equal(cached["masks"], fresh["masks"])


def test_bad_masks_are_a_warning_or_one_clear_error(tmp_path, caplog):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    scene(images / "img0.png")  # no mask for img0 and img2
    scene(images / "img1.png").convert("RGB").save(masks / "img1.png")  # a colour mask
    scene(images / "img2.png")
    paths = sorted(images.glob("*.png"))
    with caplog.at_level(logging.WARNING):
        ds = DreamBoothDataset(paths, "a sks thing", 32, mask_dir=masks)
    assert "no mask in" in caplog.text and "img0.png" in caplog.text and "img2.png" in caplog.text
    assert "not grayscale" in caplog.text and ds[(0, 0)]["instance"].mask is None
    Image.new("L", (10, 10)).save(masks / "img0.png")
    with pytest.raises(DataError, match="mask img0.png is 10×10 but its image img0.png is 48×40"):
        DreamBoothDataset(paths, "a sks thing", 32, mask_dir=masks)


def test_the_trainer_trains_with_masks_and_refuses_bad_options(world, tmp_path, capsys):
    masks = tmp_path / "masks"
    from toyworld.world import write_subject

    write_subject(tmp_path / "subject", count=5, size=64, mask_folder=masks)
    common = ("--mask_dir", str(masks), "--masked_loss_background_weight", "0.1", "--output_formats", "native")
    assert main(argv(world, tmp_path / "out", *common, steps=3)) == 0
    assert main(argv(world, tmp_path / "cached", *common, "--cache_latents", steps=3)) == 0
    for bad, message in ((["--mask_dir", str(tmp_path / "nope")], "does not exist"),
                         (["--mask_dir", str(masks), "--alpha_mask"], "choose one"),
                         (["--masked_loss_background_weight", "2"], "in [0, 1]")):
        with pytest.raises(SystemExit):
            main(argv(world, tmp_path / "bad", *bad, steps=1))
        assert message in capsys.readouterr().err
