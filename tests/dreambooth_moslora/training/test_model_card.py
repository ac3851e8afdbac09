"""The model card: its YAML header reads back as the run's values, and prompts show as written."""

import re

import yaml

from dreambooth_moslora.training.model_card import code, write_model_card


def test_a_pivotal_prompt_survives_the_header_and_the_markdown(tmp_path):
    prompt = 'a <s0><s1> circle: "close-up" #1'  # a colon, quotes and a hash would break a bare YAML value
    settings = {"pretrained_model_name_or_path": "C:/models/base: v2", "instance_prompt": prompt,
                "validation_prompts": [prompt, "a *bold* <s0><s1> square"], "num_train_images": 3,
                "with_prior_preservation": True, "class_prompt": "a circle"}
    card = write_model_card(tmp_path, settings, {"diffusers": tmp_path / "pytorch_lora_weights.safetensors"},
                            tmp_path / "validation.png").read_text(encoding="utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["instance_prompt"] == prompt and header["base_model"] == "C:/models/base: v2"
    assert f"row 1: `{prompt}`; row 2: `a *bold* <s0><s1> square`" in card
    # outside code (spans and the example's block) no prompt text is left for a renderer to take as HTML or emphasis
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", card.split("---\n", 2)[2], flags=re.S))
    assert "<s0>" not in prose and "*bold*" not in prose
    assert "`a circle`" in card


def test_a_code_span_fences_the_backticks_a_text_holds():
    assert code("a sks dog") == "`a sks dog`"
    assert code("a `sks` dog") == "``a `sks` dog``"
    assert code("`sks`") == "`` `sks` ``"
    assert code("a ``x`` b") == "```a ``x`` b```"
