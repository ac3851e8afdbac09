"""Loading the base model's parts: a model whose text encoders are stored in fp16 (as many SDXL checkpoints
are) still draws class images and trains on a CPU."""

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_moslora.training import main
from dreambooth_moslora.training.models import class_image_pipeline
from toyworld.tiny_sdxl import save_tiny_sdxl

from .conftest import argv


def test_fp16_text_encoders_draw_class_images_and_train(world, tmp_path):
    model = save_tiny_sdxl(tmp_path / "fp16-text", seed=0)
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        cls.from_pretrained(model, subfolder=sub).to(torch.float16).save_pretrained(model / sub)
    pipe = class_image_pipeline(str(model), None, None, "cpu")
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    prior = ("--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images", "2",
             "--class_inference_steps", "2", "--output_formats", "native")
    assert main(argv(dict(world, model=model), tmp_path / "out", *prior, steps=2)) == 0
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2
