"""benchmarks/quality.py end to end in its quick mode: every variant trains, is measured and reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from toyworld.recipe import NUM_CLASS_IMAGES, TOY_MASKED_LOSS, TOY_TRAINING

ROOT = Path(__file__).resolve().parents[2]
# plain LoRA, the learned mixer, and the unmasked loss: the kinds of variant (the others differ from these in flags
# alone, which test_paired_difference_and_its_interval reads)
VARIANTS = ["lora", "moslora-kaiming", "moslora-unmasked"]


def test_quick_benchmark_runs_each_kind_of_variant_and_reports(tmp_path):
    out = tmp_path / "quality"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--seeds", "1", "--output_dir", str(out),
         "--variants", ",".join(VARIANTS)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert list(record["summary"]) == VARIANTS
    # the demo's setting: prior preservation on captioned class images, text-encoder adapters, masked loss
    assert record["settings"]["with_prior_preservation"]
    assert record["settings"]["text_encoder_lr"] == TOY_TRAINING["text_encoder_lr"]
    assert record["settings"]["masked_loss"] is TOY_MASKED_LOSS is True
    class_images = out / "class_images"
    assert len(list(class_images.glob("*.txt"))) == len(list(class_images.glob("*.png"))) == NUM_CLASS_IMAGES
    for variant in VARIANTS:
        by_step = record["results"][variant]["by_step"]
        assert sorted(int(s) for s in by_step) == [20, 40]  # a checkpoint halfway, and the end
        for measures in by_step.values():
            keys = ("subject", "prompt", "class_kept", "class_as_base")
            assert all(0.0 <= m[k] <= 1.0 for m in measures for k in keys)
        assert "class_tv" not in by_step["20"][0] and 0.0 <= by_step["40"][0]["class_tv"] <= 1.0  # at the end only
        loss = record["results"][variant]["loss"]
        assert len(loss) == 1 and len(loss[0]) == 40 and all(v > 0 for v in loss[0])
    base = record["base"]
    assert 0.0 <= base["subject"] <= 1.0 and base["class_kept"] > 0.5  # the base model draws circles
    assert base["class_as_base"] == 1.0 and base["class_tv"] == 0.0  # the base model is the reference
    # each variant trained its own adapter: plain LoRA (no mixer) and the learned mixer differ
    lora = (out / "lora" / "seed0" / "moslora_adapter.safetensors").read_bytes()
    assert lora != (out / "moslora-kaiming" / "seed0" / "moslora_adapter.safetensors").read_bytes()
    # the same mixer and seed on every pixel: the masks made the difference
    unmasked = (out / "moslora-unmasked" / "seed0" / "moslora_adapter.safetensors").read_bytes()
    assert unmasked != (out / "moslora-kaiming" / "seed0" / "moslora_adapter.safetensors").read_bytes()
    assert Image.open(out / "quality.png").size[0] > 400
    table = done.stdout
    assert "base model" in table and all(v in table for v in VARIANTS) and "±" in table
    assert "paired by seed, variant − lora" in table and set(record["paired_vs_lora"]) == set(VARIANTS[1:])
    assert all("class_tv" in paired for paired in record["paired_vs_lora"].values())


def test_unknown_variant_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--variants", "lora,dora", "--output_dir",
         str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "unknown variant(s) dora" in done.stderr.strip().splitlines()[-1]


def test_paired_difference_and_its_interval():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality  # as an import would: its dataclass looks its module up
    spec.loader.exec_module(quality)
    mean, low, high = quality.paired_difference([0.5, 0.6, 0.4, 0.7, 0.5], [0.4, 0.4, 0.4, 0.5, 0.3])
    # differences 0.1, 0.2, 0, 0.2, 0.2: mean 0.14, sd 0.0894, t(4) = 2.776
    assert mean == pytest.approx(0.14) and high - mean == pytest.approx(2.776 * 0.08944 / 5**0.5, rel=1e-3)
    assert low == pytest.approx(2 * mean - high)
    assert quality.variant_flags("moslora-mixer-lr10", quality.argparse.Namespace(learning_rate=3e-3))[-1] == "0.03"
    none = quality.argparse.Namespace(learning_rate=3e-3)
    assert quality.variant_flags("moslora-orthogonal", none)[-2:] == ["--mixer_init", "orthogonal"]
    assert quality.variant_flags("frozen-mixer", none)[:2] == ["--mixer", "frozen"]
    # the variant table: four by default, and the unmasked ones the only ones whose loss ignores the masks
    assert quality.DEFAULT_VARIANTS == ["lora", "moslora-kaiming", "moslora-orthogonal", "frozen-mixer"]
    assert [name for name, v in quality.VARIANTS.items() if not v.masked] == ["lora-unmasked", "moslora-unmasked"]
    assert len({v.colour for v in quality.VARIANTS.values()}) == len(quality.VARIANTS)  # one line colour each


def test_class_as_base_compares_each_class_image_with_the_base_models_from_the_same_noise():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality
    spec.loader.exec_module(quality)
    circle = lambda colour, bg: {"shape": "circle", "colour": colour, "background": bg}  # noqa: E731
    evaluation = quality.Evaluation([("a sks circle on a gray background", "gray")],
                                    [("a circle on a gray background", "gray")] * 4, sample_steps=1)
    base = [circle("purple", "gray"), circle("blue", "gray"), circle("white", "gray"), circle("yellow", "gray"),
            circle("red", "gray")]
    evaluation.base_class = base[1:]
    adapted = [circle("purple", "gray"), circle("green", "gray"), circle("white", "gray"), circle("green", "gray"),
               circle("red", "gray")]
    m = evaluation._metrics(adapted)
    assert m["subject"] == 1.0 and m["prompt"] == 1.0
    assert m["class_kept"] == 1.0  # four ordinary circles: the kind is kept ...
    assert m["class_as_base"] == 0.5  # ... but two of them changed colour
