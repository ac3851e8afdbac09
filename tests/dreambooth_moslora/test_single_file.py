"""Single-file SDXL checkpoints: the original layout written and read back exactly, checked against diffusers' own
converters; training from a file as from its folder; v-prediction markers; every refusal in one line."""

import json
import pickle
import struct

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dreambooth_moslora.safe_files import read_safetensors, sha256_of
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
from dreambooth_moslora.single_file import load_single_file, looks_like, save_single_file
from dreambooth_moslora.training import main
from toyworld.tiny_sdxl import save_tiny_sdxl
from toyworld.world import write_subject

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    folder = save_tiny_sdxl(root / "tiny-sdxl", seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    components = {part: getattr(pipe, part) for part in PARTS}
    checkpoint = save_single_file(components, root / "tiny-sdxl.safetensors", dtype=torch.float32)
    subject = root / "subject"
    write_subject(subject, count=4, size=64)
    return {"root": root, "folder": folder, "file": checkpoint, "components": components, "subject": subject}


def test_the_file_is_in_sd_xl_bases_layout_and_reads_back_exactly(world):
    names = set(load_file(world["file"]))
    for name in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                 "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                 "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.out.2.bias",
                 "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                 "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                 "conditioner.embedders.1.model.text_projection"):
        assert name in names, name
    assert looks_like(names) == "sdxl" and "v_pred" not in names
    models, schedule = load_single_file(world["file"], str(world["folder"]))
    assert schedule == {"prediction_type": "epsilon"}  # the writer's modelspec says so
    for part in PARTS:
        ours, theirs = models[part].state_dict(), world["components"][part].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert not any(t.is_meta for t in [*models[part].parameters(), *models[part].buffers()])


def test_diffusers_own_converters_read_the_file_as_written(world):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        loaded = cls.from_single_file(world["file"], config=str(world["folder"]), subfolder=part).state_dict()
        expected = world["components"][part].state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded), part
    text_encoder_2 = world["components"]["text_encoder_2"]
    converted = convert_open_clip_checkpoint(text_encoder_2, load_file(world["file"]), "conditioner.embedders.1.model.")
    expected = text_encoder_2.state_dict()
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)


def train(world, out, model, *extra):
    return main(["--pretrained_model_name_or_path", str(model), "--base_config", str(world["folder"]),
                 "--instance_data_dir", str(world["subject"]), "--instance_prompt", "a sks circle",
                 "--resolution", "64",
                 "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "1e-3", "--seed", "0",
                 "--output_dir", str(out), "--report_to", "none", "--output_formats", "native", "kohya", *extra])


def test_training_from_the_file_is_bit_identical_to_training_from_the_folder(world, tmp_path):
    prior = ("--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images", "2",
             "--class_inference_steps", "2")
    assert train(world, tmp_path / "folder", world["folder"], *prior) == 0
    assert train(world, tmp_path / "file", world["file"], *prior, "--output_formats", "native", "diffusers",
                 "kohya") == 0
    a = load_file(tmp_path / "folder" / "moslora_adapter.safetensors")
    b = load_file(tmp_path / "file" / "moslora_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(t.abs().max().item() for k, t in a.items() if k.endswith("moslora_B")) > 0  # it trained
    _, kohya = read_safetensors(tmp_path / "file" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["modelspec.prediction_type"] == "epsilon" and kohya["ss_v_parameterization"] == "False"
    # the base is named by its hashes, as sd-scripts names it: the file's sha256, and its legacy 8-digit hash
    digest = sha256_of(world["file"])
    assert kohya["ss_new_sd_model_hash"] == digest and len(kohya["ss_sd_model_hash"]) == 8
    card = (tmp_path / "file" / "README.md").read_text()
    assert f"AutoV2 `{digest[:10].upper()}`" in card and "file_pipeline(" in card  # the example reads the file
    _, from_folder = read_safetensors(tmp_path / "folder" / "pytorch_lora_weights_kohya.safetensors")
    assert len(from_folder["ss_new_sd_model_hash"]) == 64 and from_folder["ss_new_sd_model_hash"] != digest
    assert "ss_sd_model_hash" not in from_folder  # a folder has no legacy hash


def test_a_file_marked_v_pred_and_ztsnr_trains_so(world, tmp_path, caplog):
    marked = tmp_path / "vpred.safetensors"
    save_single_file(world["components"], marked, dtype=torch.float16,
                     schedule={"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    assert {"v_pred", "ztsnr"} <= set(load_file(marked))
    caplog.set_level("INFO", logger="dreambooth_moslora")
    assert train(world, tmp_path / "out", marked) == 0
    assert any("noise schedule: v_prediction, zero terminal SNR" in r.getMessage() for r in caplog.records)
    _, metadata = read_safetensors(tmp_path / "out" / "moslora_adapter.safetensors")
    training = json.loads(metadata["training"])
    assert training["prediction_type"] == "v_prediction" and training["rescale_betas_zero_snr"] is True
    _, kohya = read_safetensors(tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["modelspec.prediction_type"] == "v" and kohya["ss_zero_terminal_snr"] == "True"
    # an explicit flag wins over what the file marks
    assert train(world, tmp_path / "eps", marked, "--prediction_type", "epsilon") == 1  # ZTSNR on epsilon: refused


def header_only(path, header: dict) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def bad_files(world, tmp_path):
    tensors = load_file(world["file"])
    made = {}
    made["pickle"] = tmp_path / "model.ckpt"
    marker = tmp_path / "unpickled"
    made["pickle"].write_bytes(pickle.dumps(EvilPayload(str(marker))))
    made["truncated"] = tmp_path / "truncated.safetensors"
    made["truncated"].write_bytes(world["file"].read_bytes()[:4096])
    for name, keys in (("sd15", ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                                 "model.diffusion_model.input_blocks.0.0.weight"]),
                       ("flux", ["double_blocks.0.img_attn.qkv.weight"]),
                       ("lora", ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"])):
        made[name] = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, made[name])
    made["missing"] = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if "resblocks.1." not in k}, made["missing"])
    made["misshaped"] = tmp_path / "misshaped.safetensors"
    save_file({**tensors, "model.diffusion_model.out.2.bias": torch.zeros(7)}, made["misshaped"])
    return made, marker


class EvilPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind, message", [
    ("pickle", "is a pickle checkpoint (.ckpt), which can run code when loaded: it is never unpickled here"),
    ("truncated", "not a safetensors file, or truncated"),
    ("sd15", "looks like a Stable Diffusion 1.x checkpoint: an SDXL base checkpoint is needed here"),
    ("flux", "looks like a Flux checkpoint"),
    ("lora", "looks like a LoRA, not a base model"),
    ("missing", "does not fit the SDXL models its configs describe: 12 tensor(s) missing, e.g. "
                "conditioner.embedders.1.model.transformer.resblocks.1."),
    ("misshaped", "model.diffusion_model.out.2.bias is [7] in the file but [4] in the model"),
])
def test_bad_checkpoints_are_refused_in_one_line_and_nothing_is_written(world, tmp_path, capsys, kind, message):
    made, marker = bad_files(world, tmp_path)
    out = tmp_path / "out"
    assert train(world, out, made[kind]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert not marker.exists()  # nothing was unpickled
    assert not list(out.glob("*.safetensors")) and not list(out.glob("checkpoint-*"))


def test_a_file_without_configs_to_read_it_by_says_what_to_pass(world, tmp_path, capsys):
    args = ["--pretrained_model_name_or_path", str(world["file"]), "--base_config", str(tmp_path / "nowhere"),
            "--instance_data_dir", str(world["subject"]), "--instance_prompt", "a sks circle", "--resolution", "64",
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot load the base model") and "pass --base_config with a diffusers SDXL" in err


def test_load_adapter_warns_when_the_pipeline_holds_another_base_than_the_file_records(world, tmp_path, recwarn):
    from dreambooth_moslora import AdapterConfig, inject_components, load_adapter, pipeline_components, save_adapter
    from dreambooth_moslora.single_file import file_pipeline

    from tests.conftest import randomize_adapter_

    from_file = file_pipeline(str(world["file"]), str(world["folder"]), torch.float32)
    from_folder = StableDiffusionXLPipeline.from_pretrained(world["folder"])
    components = pipeline_components(from_folder)
    inject_components(components, AdapterConfig(rank=4))
    randomize_adapter_(components)
    digest = sha256_of(world["file"])
    path = save_adapter(tmp_path, components, formats=["kohya"], base_model=str(world["file"]),
                        training={"base_model_sha256": digest})["kohya"]
    load_adapter(from_file, path)  # the base it records: no warning
    assert not [w for w in recwarn if "trained on another base" in str(w.message)]
    load_adapter(from_folder, path)  # the same weights, but a folder's hash is its files' hash
    (warning,) = [str(w.message) for w in recwarn if "trained on another base" in str(w.message)]
    assert f"({world['file']}, AutoV2 {digest[:10].upper()}) than tiny-sdxl (AutoV2 " in warning
    assert "\n" not in warning
    recwarn.clear()
    load_adapter(from_folder, path, base=world["file"])  # told where the weights came from
    load_adapter(from_folder, path, base="stabilityai/stable-diffusion-xl-base-1.0")  # a hub id: nothing to compare
    assert not [w for w in recwarn if "trained on another base" in str(w.message)]
    ours, theirs = (sdxl_forward(pipe, "a photo") for pipe in (from_file, from_folder))
    assert max_abs_diff(ours, theirs) < 1e-5  # the warning changes nothing loaded
