"""The validation grid: every image with its caption, captions never overlapping."""

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_moslora.training.validation import labelled_grid


def caption_width(label: str) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label)


def test_small_images_are_enlarged_sharply_until_their_captions_fit():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    labels = [f"seed 0, #{i}" for i in range(3)]
    grid = labelled_grid(images, labels)
    cell = grid.width // 3
    assert cell % 32 == 0 and cell >= caption_width(labels[0]) + 4 and cell - 32 < caption_width(labels[0]) + 4
    zoom = cell // 32
    assert grid.height == 32 * zoom + 14
    second = np.asarray(grid)[: 32 * zoom, cell : 2 * cell]
    assert np.array_equal(second[::zoom, ::zoom], np.asarray(images[1]))  # every pixel kept, only repeated


def test_images_wider_than_their_captions_are_left_as_they_are():
    images = [Image.new("RGB", (96, 96), (10, 20, 30)), Image.new("RGB", (96, 96), (200, 0, 0))]
    grid = labelled_grid(images, ["base: gray", "adapter: gray"], columns=1)
    assert grid.size == (96, 2 * (96 + 14))
    assert grid.getpixel((5, 96 + 14 + 5)) == (200, 0, 0)
