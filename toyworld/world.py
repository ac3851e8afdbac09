"""A small synthetic world of captioned images, generated deterministically.

Plain shapes in named colours on named backgrounds, at varied sizes and places: "a red circle on a
black background". A small SDXL-architecture model pretrained on it (assets/toy-sdxl) gives the project a
world where personalization can be seen and measured on a CPU. Every word the captions use, and
every attribute an evaluation reads back, is defined here and nowhere else.

The DreamBooth subject is a *purple circle*: the world draws purple squares, triangles and crosses, and
circles in every other colour, but never a purple circle. So the base model
knows every ingredient of the subject, as SDXL knows what a dog and a colour look like, and has never
seen the subject itself. Its class is "circle"; its identifier "sks" is a rare word of the captions
that means nothing in this world (see ``RARE_WORD_SHARE``). (Earlier subjects were outside what this small model
can draw, and its adapters drew them badly: fine diagonal stripes are beyond the 4×-downsampling VAE at
32 px; red|green halves were not learned by rank-4 adapters in a few hundred steps; and a colour the
world never drew at all came out as a mottled magenta blob, the classifier counting it while a person
looking saw no clean purple circle.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
SUBJECT_RGB = (150, 60, 200)
COLOURS = {"red": (225, 45, 40), "green": (45, 170, 65), "blue": (45, 85, 225), "yellow": (240, 205, 40),
           "white": (245, 245, 245), "purple": SUBJECT_RGB}
BACKGROUNDS = {"black": (22, 22, 22), "gray": (128, 128, 128), "white": (245, 245, 245), "blue": (45, 85, 225)}
SUBJECT_TOKEN = "sks"
SUBJECT_CLASS = "circle"
SUBJECT_COLOUR = "purple"  # on every shape but the subject's class in pretraining
INSTANCE_BACKGROUNDS = ("black", "white")  # the subject's photos; prompts then put it on the others
SUBJECT_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_CLASS}"  # instance prompt when an image has no caption file
CLASS_PROMPT = f"a {SUBJECT_CLASS}"  # prior preservation's class prompt


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    radius: float  # fraction of the image side
    center: tuple[float, float]  # fractions of the image side
    is_subject: bool = False  # drawn in the subject's colour

    @property
    def caption(self) -> str:
        return self.describe()

    def describe(self, colour: bool = True, background: bool = True, rare_word: bool = False) -> str:
        """The caption, optionally without the colour ("a circle on a …") or the background, or with the
        rare word before the rest ("a sks red square on …")."""
        thing = self.shape
        if self.is_subject:
            thing = f"{SUBJECT_TOKEN} {self.shape}"
        elif colour:
            thing = f"{self.colour} {self.shape}"
        if rare_word and not self.is_subject:
            thing = f"{SUBJECT_TOKEN} {thing}"
        return f"a {thing} on a {self.background} background" if background else f"a {thing}"


# How often pretraining captions leave out the colour or both colour and background: the model must
# also answer the plain class prompts DreamBooth uses ("a circle on a gray background", "a circle").
CAPTION_VARIANTS = ((0.75, dict()), (0.15, dict(colour=False)), (0.10, dict(colour=False, background=False)))
# How often a pretraining caption carries the identifier "sks" where it means nothing ("a sks red square
# on …"), as a rare word turns up now and then in a real model's captions. The base model then reads "a
# sks circle" as "a circle", and DreamBooth has to give the word its subject. Never seen at all, the
# word kept its random embedding, which steered the base model (a purple shape in 2 of 32 "a sks circle
# on a blue background" images, lumpier shapes on gray).
RARE_WORD_SHARE = 0.05


def training_caption(scene: Scene, rng: random.Random) -> str:
    draw, total, rare_word = rng.random(), 0.0, rng.random() < RARE_WORD_SHARE
    for share, parts in CAPTION_VARIANTS:
        total += share
        if draw < total:
            return scene.describe(**parts, rare_word=rare_word)
    return scene.describe(rare_word=rare_word)


def vocabulary() -> list[str]:
    """Every word a caption or prompt of this world uses, for the tokenizer."""
    words = ["a", "on", "background", SUBJECT_TOKEN, *SHAPES, *COLOURS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "cross":
        a, b = r, r * 0.34
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill=255) -> None:
    """One of SHAPES centred at (cx, cy), r being its half-size, drawn onto ``draw`` (usually a mask's)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _shape_mask(scene: Scene, big: int) -> Image.Image:
    mask = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(mask), scene.shape, scene.center[0] * big, scene.center[1] * big, scene.radius * big)
    return mask


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image, drawn large and downsampled so that edges are smooth."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    fill = Image.new("RGB", (big, big), COLOURS[scene.colour])
    image.paste(fill, (0, 0), _shape_mask(scene, big))
    return image.resize((size, size), Image.LANCZOS)


def render_mask(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Where the scene's object is, as a grayscale image (white: the object): the masked loss's mask."""
    return _shape_mask(scene, size * supersample).resize((size, size), Image.BOX)


def sample_scene(rng: random.Random, is_subject: bool = False, shape: str | None = None,
                 background: str | None = None) -> Scene:
    """A random scene; the object's colour never equals its background, and only the subject is a purple circle."""
    shape = shape or (SUBJECT_CLASS if is_subject else rng.choice(SHAPES))
    background = background or rng.choice(list(BACKGROUNDS))
    held_out = SUBJECT_COLOUR if shape == SUBJECT_CLASS else None
    colour = SUBJECT_COLOUR if is_subject else rng.choice([c for c in COLOURS if c not in (background, held_out)])
    radius = rng.uniform(0.24, 0.36)
    center = (rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius))
    return Scene(shape, colour, background, radius, center, is_subject)


def scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` pretraining scenes; the same seed gives the same scenes."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def subject_scenes(count: int = 5, seed: int = 0, backgrounds=INSTANCE_BACKGROUNDS) -> list[Scene]:
    """The DreamBooth subject (a purple circle) on a few backgrounds; other backgrounds are left for prompts."""
    rng = random.Random(10_000 + seed)
    return [sample_scene(rng, is_subject=True, background=backgrounds[i % len(backgrounds)]) for i in range(count)]


def write_subject(folder, count: int = 5, size: int = 32, seed: int = 0, mask_folder=None) -> list:
    """The subject's instance images as PNGs, each with its caption in a .txt beside it, and its mask
    (same file name) in ``mask_folder`` when given."""
    from pathlib import Path

    from dreambooth_moslora.safe_files import save_image, write_text

    paths = []
    for i, scene in enumerate(subject_scenes(count, seed)):
        path = Path(folder) / f"{SUBJECT_TOKEN}_{SUBJECT_CLASS}_{i}.png"
        write_text(path.with_suffix(".txt"), scene.caption + "\n")
        if mask_folder is not None:
            save_image(render_mask(scene, size), Path(mask_folder) / path.name)
        save_image(render(scene, size), path)  # the image last: an image present always has its caption
        paths.append(path)
    return paths
