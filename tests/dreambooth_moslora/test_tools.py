"""The moslora command's operations on real files of the tiny SDXL: exact conversion, merge and resize, fuse,
refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from dreambooth_moslora import AdapterConfig, inject_components, load_adapter, pipeline_components, save_adapter
from dreambooth_moslora.cli import main
from dreambooth_moslora.safe_files import read_safetensors, sha256_of
from dreambooth_moslora.sdxl import sdxl_forward
from dreambooth_moslora.tools import load
from safetensors.torch import save_file
from toyworld.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl

from tests.conftest import PROMPT, randomize_adapter_


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    base = save_tiny_sdxl(root / "random-sdxl", seed=0)
    made = {}
    for name, rank, alpha, mixer, seed in (("a", 4, 7.0, "learned", 1), ("b", 2, 2.0, "none", 2)):
        pipe = build_tiny_sdxl(seed=0)
        components = pipeline_components(pipe)
        torch.manual_seed(seed)
        inject_components(components, AdapterConfig(rank=rank, alpha=alpha, mixer=mixer))
        randomize_adapter_(components, seed=seed)
        made[name] = save_adapter(root / name, components, base_model=str(base),
                                  training={"instance_prompt": f"a sks {name}"})
    return {"root": root, "base": str(base), **made}


def deltas(path, base) -> dict[str, torch.Tensor]:
    adapter = load(path, base).adapter
    return {f"{c}.{p}": w.delta() for c, by_path in adapter.layers.items() for p, w in by_path.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("source, target", [("native", "diffusers"), ("native", "kohya"), ("kohya", "native"),
                                            ("diffusers", "native"), ("diffusers", "kohya")])
def test_convert_round_trips_exactly(files, tmp_path, source, target):
    original = deltas(files["a"][source], files["base"])
    there, back = tmp_path / "there.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(files["a"][source]), "--to", target, "-o", str(there), "--base", files["base"]]) == 0
    assert main(["convert", str(there), "--to", source, "-o", str(back), "--base", files["base"]]) == 0
    assert max_diff(original, deltas(there, files["base"])) <= 1e-6
    assert max_diff(original, deltas(back, files["base"])) <= 1e-6
    _, metadata = read_safetensors(there)
    record = json.loads(metadata["moslora_operation"])
    assert record["operation"] == "convert" and record["to"] == target
    assert record["inputs"] == [{"file": files["a"][source].name, "sha256": sha256_of(files["a"][source])}]


def test_plain_lora_becomes_native_with_an_identity_mixer_and_loads_as_it(files, tmp_path):
    out = tmp_path / "native.safetensors"
    assert main(["convert", str(files["b"]["kohya"]), "--to", "native", "-o", str(out), "--base", files["base"]]) == 0
    adapter = load(out, files["base"]).adapter
    assert adapter.config.mixer == "learned" and adapter.config.rank == 2
    assert all(torch.equal(w.mixer, torch.eye(2)) for by_path in adapter.layers.values() for w in by_path.values())
    pipe_a, pipe_b = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=0)
    load_adapter(pipe_a, out)
    load_adapter(pipe_b, files["b"]["kohya"])
    a, b = sdxl_forward(pipe_a, PROMPT), sdxl_forward(pipe_b, PROMPT)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_merge_by_concatenation_is_the_weighted_sum(files, tmp_path):
    out = tmp_path / "merged.safetensors"
    argv = ["merge", str(files["a"]["native"]), str(files["b"]["diffusers"]), "--weights", "1", "-0.5",
            "-o", str(out), "--to", "native", "--base", files["base"]]
    assert main(argv) == 0
    a, b, merged = (deltas(p, files["base"]) for p in (files["a"]["native"], files["b"]["diffusers"], out))
    assert max_diff(merged, {k: a[k] - 0.5 * b[k] for k in a}) <= 1e-6
    assert load(out, files["base"]).adapter.config.rank == 6  # ranks add up


def test_resize_reports_the_discarded_singular_values(files, tmp_path, capsys):
    out = tmp_path / "r2.safetensors"
    capsys.readouterr()
    assert main(["resize", str(files["a"]["native"]), "--rank", "2", "-o", str(out), "--base", files["base"]]) == 0
    printed = capsys.readouterr().out
    reported = float(next(line.split()[-1] for line in printed.splitlines() if line.strip().startswith("overall")))
    original, resized = deltas(files["a"]["native"], files["base"]), deltas(out, files["base"])
    discarded = total = 0.0
    for key, delta in original.items():
        s = torch.linalg.svdvals(delta)
        discarded, total = discarded + float(s[2:].square().sum()), total + float(s.square().sum())
        # the file holds the best rank-2 approximation: what is left is exactly the discarded part
        assert abs(float((delta - resized[key]).norm()) - float(s[2:].norm())) <= 1e-5
    assert reported == pytest.approx((discarded / total) ** 0.5, rel=1e-3)
    assert load(out, files["base"]).adapter.format == "native"


def test_resize_by_energy_picks_a_rank_per_layer(files, tmp_path):
    out = tmp_path / "e.safetensors"
    assert main(["resize", str(files["a"]["kohya"]), "--energy", "0.9", "-o", str(out), "--base", files["base"]]) == 0
    original, resized = deltas(files["a"]["kohya"], files["base"]), load(out, files["base"]).adapter
    for key, delta in original.items():
        s2 = torch.linalg.svdvals(delta).square()
        component, path = key.split(".", 1)
        rank = resized.layers[component][path].rank
        assert float(s2[:rank].sum() / s2.sum()) >= 0.9 - 1e-9
        assert rank == 1 or float(s2[: rank - 1].sum() / s2.sum()) < 0.9


def test_fuse_gives_the_live_adapters_outputs(files, tmp_path):
    out = tmp_path / "fused"
    assert main(["fuse", "--base", files["base"], str(files["a"]["native"]), "-o", str(out)]) == 0
    live = build_tiny_sdxl(seed=0)
    load_adapter(live, files["a"]["native"])
    fused = StableDiffusionXLPipeline.from_pretrained(out)
    a, b = sdxl_forward(live, PROMPT), sdxl_forward(fused, PROMPT)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert json.loads((out / "moslora_fused.json").read_text())["operation"] == "fuse"


def test_fuse_to_one_checkpoint_file_and_from_one(files, tmp_path):
    from dreambooth_moslora.single_file import file_pipeline

    live = build_tiny_sdxl(seed=0)
    load_adapter(live, files["a"]["native"])
    expected = sdxl_forward(live, PROMPT)
    out = tmp_path / "fused.safetensors"
    assert main(["fuse", "--base", files["base"], str(files["a"]["kohya"]), "-o", str(out), "--dtype", "fp32"]) == 0
    fused = sdxl_forward(file_pipeline(str(out), files["base"], torch.float32), PROMPT)
    assert max(float((expected[k] - fused[k]).abs().max()) for k in expected) <= 1e-5
    tensors, metadata = read_safetensors(out)
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors and "v_pred" not in tensors
    assert json.loads(metadata["moslora_operation"])["operation"] == "fuse"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    half = tmp_path / "fused-fp16.safetensors"  # the default: fp16, as checkpoints are shared
    assert main(["fuse", "--base", files["base"], str(files["a"]["kohya"]), "-o", str(half)]) == 0
    assert {t.dtype for t in read_safetensors(half)[0].values()} == {torch.float16}
    folder = tmp_path / "from-file"  # a checkpoint file as the base, its configs from the folder
    assert main(["fuse", "--base", str(out), "--base_config", files["base"], str(files["b"]["native"]), "-o",
                 str(folder)]) == 0
    assert (folder / "unet" / "config.json").is_file()


def test_inspect_reports_the_file(files, capsys):
    capsys.readouterr()
    assert main(["inspect", str(files["a"]["kohya"]), "--json", "--base", files["base"]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "kohya" and report["rank"] == 4 and report["alpha"] == 7.0
    assert report["layers"] == {"unet": 136, "text_encoder": 12, "text_encoder_2": 12}
    assert report["instance_prompt"] == "a sks a" and report["base_model"] == files["base"]
    blocks = report["delta_norm_by_block"]
    assert set(blocks) == {"unet.down_blocks.1", "unet.down_blocks.2", "unet.mid_block", "unet.up_blocks.0",
                           "unet.up_blocks.1", "text_encoder", "text_encoder_2"}
    assert sum(v**2 for v in blocks.values()) ** 0.5 == pytest.approx(report["delta_norm"], rel=1e-9)
    assert main(["inspect", str(files["a"]["native"]), "--base", files["base"]]) == 0
    text = capsys.readouterr().out
    assert "native adapter, rank 4, α 7, mixer learned" in text and "unet.mid_block" in text


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
def test_inspect_without_the_base_model_reads_the_file_alone(files, tmp_path, capsys, fmt):
    """The file's base model is gone and the tiny model's layers fit no SDXL layout: inspect still reports the file,
    under the layer names it stores."""
    lonely = tmp_path / files["a"][fmt].name
    lonely.write_bytes(files["a"][fmt].read_bytes())
    files_base = Path(files["base"])
    moved = files_base.with_name("moved-away")
    files_base.rename(moved)
    try:
        capsys.readouterr()
        assert main(["inspect", str(lonely), "--json"]) == 0
    finally:
        moved.rename(files_base)
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt and report["rank"] == 4 and sum(report["layers"].values()) == 160


def refused(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_refusals_are_one_line_and_write_nothing(files, tmp_path, capsys):
    a, base = str(files["a"]["native"]), files["base"]
    foreign = tmp_path / "model.safetensors"

    save_file({"conv_in.weight": torch.zeros(3)}, foreign)
    assert "not a LoRA/MoSLoRA file" in refused(["inspect", str(foreign), "--base", base], capsys)
    assert "between 1 and the adapter's rank 4" in refused(["resize", a, "--rank", "5", "-o",
                                                            str(tmp_path / "x.safetensors"), "--base", base], capsys)
    assert "between 1 and the adapter's rank 4" in refused(["resize", a, "--rank", "0", "-o",
                                                            str(tmp_path / "x.safetensors"), "--base", base], capsys)
    assert "is one of the inputs" in refused(["convert", a, "--to", "native", "-o", a, "--base", base], capsys)
    assert "one weight per file" in refused(["merge", a, a, "--weights", "1", "-o", str(tmp_path / "m.safetensors"),
                                             "--base", base], capsys)
    elsewhere = tmp_path / "elsewhere.safetensors"  # its recorded base is no folder here, and SDXL's layout is not its
    tensors, metadata = read_safetensors(files["a"]["kohya"])
    save_file(tensors, elsewhere, {**metadata, "ss_sd_model_name": "someone/else-xl"})
    message = refused(["convert", str(elsewhere), "--to", "native", "-o", str(tmp_path / "x.safetensors")], capsys)
    assert "the file records the base 'someone/else-xl', which is no model folder here" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.safetensors", "model.safetensors"]


def test_merge_refuses_other_base_models_and_other_shapes(files, tmp_path, capsys):
    other_base = save_tiny_sdxl(tmp_path / "other", seed=1)
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    inject_components(components, AdapterConfig(rank=2))
    other = save_adapter(tmp_path / "c", components, formats=["native"], base_model=str(other_base))["native"]
    out = str(tmp_path / "m.safetensors")
    assert "different base models" in refused(["merge", str(files["a"]["native"]), str(other), "-o", out, "--base",
                                               files["base"]], capsys)
    assert main(["merge", str(files["a"]["native"]), str(other), "-o", str(tmp_path / "forced.safetensors"), "--base",
                 files["base"], "--force"]) == 0  # the user's call
    wider = build_tiny_sdxl(seed=0, block_out_channels=(32, 96, 96))  # layers of other shapes
    components = pipeline_components(wider)
    inject_components(components, AdapterConfig(rank=2))
    randomize_adapter_(components)
    odd = save_adapter(tmp_path / "d", components, formats=["kohya"], base_model=files["base"])["kohya"]
    assert "96→96 in the adapter" in refused(["merge", str(files["a"]["native"]), str(odd), "-o", out, "--base",
                                              files["base"]], capsys)
    assert not Path(out).exists()


def test_help_reads_well():
    for command in ([], ["inspect"], ["convert"], ["resize"], ["merge"], ["fuse"]):
        out = subprocess.run([sys.executable, "-m", "dreambooth_moslora", *command, "--help"], capture_output=True,
                             text=True)
        assert out.returncode == 0 and out.stdout.startswith("usage: moslora")
        assert "Traceback" not in out.stderr


def test_files_for_sdxl_base_need_no_base_model(tmp_path, capsys):
    """Without --base, names are resolved against SDXL base's own layout (built from its published configs, no
    weights)."""

    tensors = {}
    for name, width in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640),
                        ("lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_k", 1280),
                        ("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", 1280)):
        tensors[f"{name}.lora_down.weight"] = torch.full((2, 2048 if "attn2_to_k" in name else width), 0.01)
        tensors[f"{name}.lora_up.weight"] = torch.full((width, 2), 0.02)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sdxl_kohya.safetensors"
    save_file(tensors, path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == {"unet": 2, "text_encoder_2": 1}
    assert set(report["delta_norm_by_block"]) == {"unet.down_blocks.1", "unet.up_blocks.0", "text_encoder_2"}
    out = tmp_path / "diffusers.safetensors"
    assert main(["convert", str(path), "--to", "diffusers", "-o", str(out)]) == 0
    names = set(read_safetensors(out)[0])
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in names
    assert "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k.lora_B.weight" in names
    assert "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj.lora_A.weight" in names


def test_the_commands_use_the_base_a_file_records_and_inspect_needs_no_model(files, tmp_path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(files["a"]["kohya"]), "--json"]) == 0  # resolved against the recorded tiny base
    resolved = json.loads(capsys.readouterr().out)
    assert "unet.mid_block" in resolved["delta_norm_by_block"] and resolved["layers"]["text_encoder"] == 12
    out = tmp_path / "a_native.safetensors"
    assert main(["convert", str(files["a"]["kohya"]), "--to", "native", "-o", str(out)]) == 0  # no --base needed
    assert max_diff(deltas(out, files["base"]), deltas(files["a"]["kohya"], files["base"])) < 1e-6

    orphan = tmp_path / "orphan.safetensors"  # no model to resolve it against: inspect reads the file alone
    tensors, metadata = read_safetensors(files["a"]["kohya"])
    save_file(tensors, orphan, {**metadata, "ss_sd_model_name": "someone/else-xl"})
    capsys.readouterr()
    assert main(["inspect", str(orphan), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["layers"] == resolved["layers"] and alone["rank"] == 4 and alone["alpha"] == 7.0
    assert "unet.middle_block" in alone["delta_norm_by_block"]  # the file's own (SGM) block names
    assert alone["delta_norm"] == pytest.approx(resolved["delta_norm"], rel=1e-6)


def test_a_checkpoint_file_as_base_means_sdxls_layout(tmp_path):
    from dreambooth_moslora.tools import layout_of

    adapter = tmp_path / "a.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(1, 1)}, adapter)
    assert layout_of(adapter, str(tmp_path / "ponyDiffusionV6XL.safetensors")) is None  # SDXL's published layout
    assert layout_of(adapter, "some/folder") == "some/folder"
