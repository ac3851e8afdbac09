"""DINO, CLIP-I and CLIP-T: the metric code path on tiny randomly initialised CLIP and DINOv2 models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth_moslora import AdapterConfig, inject_components, pipeline_components, save_adapter
from dreambooth_moslora.metrics import ClipScorer, DinoScorer, main, prompt_fidelity, subject_fidelity
from toyworld.tiny_sdxl import build_tiny_sdxl, build_tokenizer, save_tiny_sdxl
from toyworld.world import write_subject

from tests.conftest import randomize_adapter_


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("metric-models")
    tokenizer = build_tokenizer()
    eos, bos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|startoftext|>")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8))
    dino.save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return {"clip": ClipScorer(str(root / "clip")), "dino": DinoScorer(str(root / "dino")), "root": root}


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["dino", "clip"])
def test_identical_images_score_one_and_others_less(scorers, name):
    scorer = scorers[name]
    a, b = picture(1), picture(2)
    assert subject_fidelity([a], [a], scorer) == pytest.approx(1.0, abs=1e-5)
    assert subject_fidelity([a, a], [a], scorer) == pytest.approx(1.0, abs=1e-5)
    cross = subject_fidelity([a], [b], scorer)
    assert -1.0 <= cross < 0.9999 and cross == pytest.approx(subject_fidelity([b], [a], scorer), abs=1e-6)
    # the mean over all pairs: one matching and one other reference give the average of the two
    assert subject_fidelity([a], [a, b], scorer) == pytest.approx((1.0 + cross) / 2, abs=1e-5)


def test_clip_t_is_the_cosine_of_image_and_prompt(scorers):
    clip = scorers["clip"]
    images, prompts = [picture(3), picture(4)], ["a photo of sks dog", "a red circle"]
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            pixels = clip.processor(images=[image], return_tensors="pt")["pixel_values"]
            tokens = clip.tokenizer([prompt], padding=True, return_tensors="pt")
            i = clip.model.get_image_features(pixel_values=pixels)
            t = clip.model.get_text_features(**tokens)
            i = i if isinstance(i, torch.Tensor) else i.pooler_output
            t = t if isinstance(t, torch.Tensor) else t.pooler_output
            expected.append(F.cosine_similarity(i, t).item())
    assert prompt_fidelity(images, prompts, clip) == pytest.approx(sum(expected) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        prompt_fidelity(images, prompts[:1], clip)


def test_the_command_scores_base_and_adapter(scorers, tmp_path, capsys):
    model = save_tiny_sdxl(tmp_path / "tiny", seed=0)
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    inject_components(components, AdapterConfig(rank=4))
    randomize_adapter_(components, std=0.2)
    adapter = save_adapter(tmp_path / "adapter", components, formats=["diffusers"])["diffusers"]
    write_subject(tmp_path / "subject", count=2, size=64)
    (tmp_path / "prompts.txt").write_text("a sks circle on a gray background\n\na sks circle\n")
    code = main([
        "--pretrained_model_name_or_path", str(model), "--adapter", str(adapter), "--instance_data_dir",
        str(tmp_path / "subject"), "--prompts", str(tmp_path / "prompts.txt"), "--images_per_prompt", "2",
        "--num_inference_steps", "2", "--resolution", "64", "--clip_model", str(scorers["root"] / "clip"),
        "--dino_model", str(scorers["root"] / "dino"), "--output", str(tmp_path / "report.json"),
    ])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"base", "adapter"}
    for scores in report.values():
        assert scores["images"] == 4 and all(-1.0 <= scores[k] <= 1.0 for k in ("DINO", "CLIP-I", "CLIP-T"))
    assert report["base"]["DINO"] != report["adapter"]["DINO"]
    assert "DINO" in capsys.readouterr().out


def test_the_command_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n")
    (tmp_path / "subject").mkdir()
    assert main(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(tmp_path / "subject"),
                 "--prompts", str(tmp_path / "prompts.txt")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'prompts.txt'} holds no prompt"
