"""The committed toy-world model and its attribute classifier: they load offline and do what their records say."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toyworld.pretrain import codec_image
from toyworld.world import render
from toyworld.classifier import (
    HEADS,
    accuracy,
    attribute_accuracy,
    classifier_scenes,
    classify,
    image_grid,
    load_classifier,
)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MODEL = ASSETS / "toy-sdxl"
CLASSIFIER = ASSETS / "toy-world-classifier.safetensors"


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CLASSIFIER)


def test_classifier_reads_unseen_scenes_back(classifier):
    model, recorded = classifier
    assert min(recorded.values()) >= 0.98
    measured = accuracy(model, classifier_scenes(300, seed=123_456))  # neither its training nor its held-out seed
    assert min(measured.values()) >= 0.98, measured
    scenes = classifier_scenes(4, seed=5)
    assert classify(model, [render(s) for s in scenes]) == [
        {"shape": s.shape, "colour": s.colour, "background": s.background} for s in scenes
    ]


def test_classifier_file_for_another_world_is_refused(tmp_path, classifier):
    from dreambooth_moslora.safe_files import read_safetensors, write_safetensors

    tensors, metadata = read_safetensors(CLASSIFIER)
    heads = json.loads(metadata["heads"])
    heads["shape"] = heads["shape"] + ["star"]
    write_safetensors(tmp_path / "other.safetensors", tensors, {**metadata, "heads": json.dumps(heads)})
    with pytest.raises(ValueError, match="another toy world"):
        load_classifier(tmp_path / "other.safetensors")


def test_pretrained_model_matches_its_recorded_accuracy(classifier):
    """A small fixed prompt set on CPU: each attribute within a few prompts of the recorded GPU figure."""
    from diffusers import StableDiffusionXLPipeline

    record = json.loads((MODEL / "pretraining.json").read_text())
    assert record["evaluation"]["guidance 5"]["shape"] >= 0.80
    assert min(record["evaluation"]["guidance 5"][k] for k in ("colour", "background")) >= 0.90
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.config.force_zeros_for_empty_prompt  # guidance's zeros: what pretraining's dropped captions were
    measured, prompted, images = attribute_accuracy(pipe, classifier[0], count=24, steps=20)
    for name in HEADS:
        assert measured[name] >= record["evaluation"]["guidance 5"][name] - 0.15, (name, measured)
    assert len(images) == len(prompted) == 24 and images[0].size == (32, 32)


def test_model_fits_the_size_budget():
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024, size


def test_codec_images_are_deterministic_and_varied():
    a, b = codec_image(3, 32, seed=0), codec_image(3, 32, seed=0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(codec_image(4, 32, seed=0)))
    grid = image_grid([a, b, a], columns=2, zoom=2)
    assert grid.size == (2 * 64, 2 * 64)
