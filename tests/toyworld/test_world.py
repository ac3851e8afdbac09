"""The synthetic world: deterministic, captions that match the pixels, a subject the world never shows
(though it shows its colour on other shapes and its shape in other colours)."""

import numpy as np
import pytest
import torch

from dreambooth_moslora.sdxl import encode_prompts, tokenize
from toyworld.tiny_sdxl import build_tokenizer, tiny_sdxl_components
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SUBJECT_CLASS,
    SUBJECT_COLOUR,
    SUBJECT_RGB,
    render,
    scenes,
    subject_scenes,
    vocabulary,
)


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = scenes(50, seed=3), scenes(50, seed=3), scenes(50, seed=4)
    assert a == b and a != c
    assert all(np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a[:5], b[:5]))


def test_captions_name_what_is_drawn():
    for scene in scenes(200, seed=0):
        words = scene.caption.split()
        assert words == ["a", scene.colour, scene.shape, "on", "a", scene.background, "background"]
        assert scene.colour != scene.background and not scene.is_subject
        pixels = np.asarray(render(scene, size=32), dtype=int)
        cx, cy = (int(c * 32) for c in scene.center)
        # the object's centre has its colour; the corner farthest from the object has the background's
        assert np.abs(pixels[cy, cx] - COLOURS[scene.colour]).max() <= 40, scene
        corner = max(((0, 0), (0, 31), (31, 0), (31, 31)), key=lambda p: (p[0] - cy) ** 2 + (p[1] - cx) ** 2)
        assert np.abs(pixels[corner] - BACKGROUNDS[scene.background]).max() <= 8, scene


def test_every_attribute_value_occurs_and_the_subject_never_does():
    world = scenes(400, seed=0)
    assert {s.shape for s in world} == set(SHAPES)
    assert {s.background for s in world} == set(BACKGROUNDS)
    assert {s.colour for s in world} == set(COLOURS)
    assert not any(s.is_subject or "sks" in s.caption for s in world)
    # the subject's ingredients are there, the subject is not: purple on every other shape, no purple circle
    assert {s.shape for s in world if s.colour == SUBJECT_COLOUR} == set(SHAPES) - {SUBJECT_CLASS}
    assert {s.colour for s in world if s.shape == SUBJECT_CLASS} == set(COLOURS) - {SUBJECT_COLOUR}


def test_subject_is_a_purple_circle_on_its_own_backgrounds(tmp_path):
    from toyworld.world import write_subject

    subject = subject_scenes(5)
    assert [s.caption for s in subject][:3] == [
        "a sks circle on a black background", "a sks circle on a white background",
                                                "a sks circle on a black background",
    ]
    assert all(s.shape == "circle" and s.colour == "purple" for s in subject)
    pixels = np.asarray(render(subject[0], size=32), dtype=int)
    cx, cy = (int(c * 32) for c in subject[0].center)
    assert np.abs(pixels[cy, cx] - SUBJECT_RGB).max() <= 10
    paths = write_subject(tmp_path, count=2)
    assert [p.name for p in paths] == ["sks_circle_0.png", "sks_circle_1.png"]
    assert paths[1].with_suffix(".txt").read_text() == "a sks circle on a white background\n"


def test_pretraining_captions_also_leave_out_colour_and_background_and_now_and_then_say_sks():
    import random

    from toyworld.world import RARE_WORD_SHARE, SUBJECT_TOKEN, training_caption

    rng = random.Random(0)
    scene = scenes(1, seed=0)[0]
    drawn = [training_caption(scene, rng) for _ in range(4000)]
    plain = {scene.caption, f"a {scene.shape} on a {scene.background} background", f"a {scene.shape}"}
    with_word = {caption.replace("a ", f"a {SUBJECT_TOKEN} ", 1) for caption in plain}
    assert set(drawn) == plain | with_word
    share = sum(SUBJECT_TOKEN in caption for caption in drawn) / len(drawn)
    assert abs(share - RARE_WORD_SHARE) < 0.015
    subject = subject_scenes(1)[0]
    assert subject.describe(rare_word=True) == subject.caption == "a sks circle on a black background"


def test_dropped_captions_condition_the_unet_with_zeros_as_sdxl_pipelines_guide_with():
    from toyworld.pretrain import caption_embeddings

    c = tiny_sdxl_components(seed=0, words=vocabulary())
    encoders = [c["text_encoder"], c["text_encoder_2"]]
    ids = tokenize([c["tokenizer"], c["tokenizer_2"]], ["a red circle", "a blue square"])
    embeds, pooled = caption_embeddings(encoders, ids, torch.tensor([True, False]))
    full_embeds, full_pooled = encode_prompts(encoders, ids, "cpu")
    assert torch.equal(embeds[0], full_embeds[0]) and torch.equal(pooled[0], full_pooled[0])
    assert not embeds[1].any() and not pooled[1].any() and full_embeds[1].abs().sum() > 0


def test_the_tokenizer_knows_every_word_whole():
    tokenizer = build_tokenizer(vocabulary())
    for word in vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    caption = scenes(1, seed=0)[0].caption
    assert tokenizer.decode(tokenizer(caption).input_ids, skip_special_tokens=True) == caption


def test_pretraining_runs_end_to_end_and_saves_a_v_prediction_pipeline(tmp_path):
    """A few steps only: the code path of the toy world's pretraining, not its quality."""
    import json

    import torch
    from diffusers import StableDiffusionXLPipeline

    from toyworld.pretrain import main

    assert main(["--output_dir", str(tmp_path / "toy"), "--vae_steps", "2", "--steps", "2", "--batch_size", "4",
                 "--dataset_size", "64", "--device", "cpu", "--snapshot_steps", "1"]) == 0
    settings = json.loads((tmp_path / "toy" / "pretraining.json").read_text())
    assert settings["steps"] == 2 and settings["image_size"] == 32
    assert json.loads((tmp_path / "toy-step1" / "pretraining.json").read_text())["steps"] == 1  # the snapshot
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "toy")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.vae_scale_factor == 4
    image = pipe("a red circle on a black background", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert len(pipe.tokenizer("a gray triangle on a white background").input_ids) == 2 + 7


def test_pretraining_can_keep_an_earlier_runs_vae(tmp_path):
    """--vae: the diffusion phase alone, on a VAE kept bit for bit (stored in float16 both times)."""
    import json

    from diffusers import AutoencoderKL

    from toyworld.pretrain import main

    common = ["--steps", "1", "--batch_size", "4", "--dataset_size", "64", "--device", "cpu"]
    assert main(["--output_dir", str(tmp_path / "first"), "--vae_steps", "2", *common]) == 0
    assert main(["--output_dir", str(tmp_path / "second"), "--vae", str(tmp_path / "first" / "vae"), *common]) == 0
    settings = json.loads((tmp_path / "second" / "pretraining.json").read_text())
    assert settings["vae_steps"] == 0 and settings["vae_from"] == str(tmp_path / "first" / "vae")
    assert settings["vae_psnr_db"] > 0
    first, second = (AutoencoderKL.from_pretrained(tmp_path / name / "vae") for name in ("first", "second"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretraining_can_train_a_world_model_further(tmp_path, capsys):
    """--init_from: its UNet and text encoders are where training starts (at lr 0 they come out unchanged),
    its VAE and latent scale are kept, and the steps add up; a folder of another kind is one line."""
    import json

    from diffusers import StableDiffusionXLPipeline

    from toyworld.pretrain import main

    common = ["--steps", "1", "--batch_size", "4", "--dataset_size", "64", "--device", "cpu"]
    assert main(["--output_dir", str(tmp_path / "first"), "--vae_steps", "1", *common]) == 0
    assert main(["--output_dir", str(tmp_path / "second"), "--init_from", str(tmp_path / "first"), "--lr", "0",
                 *common]) == 0
    settings = json.loads((tmp_path / "second" / "pretraining.json").read_text())
    assert settings["continued_from"] == str(tmp_path / "first")
    assert settings["earlier_steps"] == 1 and settings["steps"] == 1
    first, second = (StableDiffusionXLPipeline.from_pretrained(tmp_path / name) for name in ("first", "second"))
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for (name, a), b in zip(getattr(first, part).state_dict().items(), getattr(second, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name}"
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "third"), "--init_from", str(tmp_path / "first" / "vae"), *common])
    assert "not a world model's folder" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()
