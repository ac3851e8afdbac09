"""A command line written for diffusers' train_dreambooth_lora_sdxl.py runs here: every flag of that script is an
option, does what it does there, or is refused in one line saying why."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_moslora.formats import KOHYA_FILE, NATIVE_FILE
from dreambooth_moslora.runtime import has_module
from dreambooth_moslora.training import main, parse_args
from dreambooth_moslora.training.data import DreamBoothDataset
from dreambooth_moslora.training.dataset_config import gather
from dreambooth_moslora.training.hub import ignored
from dreambooth_moslora.training.models import class_image_pipeline
from dreambooth_moslora.training.options import build_parser, settings_for_metadata

from .conftest import PROMPT, argv

# The options of diffusers' train_dreambooth_lora_sdxl.py (diffusers 0.40), as its --help lists them.
DIFFUSERS_FLAGS = """
adam_beta1 adam_beta2 adam_epsilon adam_weight_decay adam_weight_decay_text_encoder allow_tf32 cache_dir
caption_column center_crop checkpointing_steps checkpoints_total_limit class_data_dir class_prompt
dataloader_num_workers dataset_config_name dataset_name do_edm_style_training
enable_xformers_memory_efficient_attention gradient_accumulation_steps gradient_checkpointing hub_model_id hub_token
image_column image_interpolation_mode instance_data_dir instance_prompt learning_rate local_rank logging_dir
lora_dropout lr_num_cycles lr_power lr_scheduler lr_warmup_steps max_grad_norm max_train_steps mixed_precision
num_class_images num_train_epochs num_validation_images optimizer output_dir output_kohya_format
pretrained_model_name_or_path pretrained_vae_model_name_or_path prior_generation_precision prior_loss_weight
prodigy_beta3 prodigy_decouple prodigy_safeguard_warmup prodigy_use_bias_correction push_to_hub random_flip rank
repeats report_to resolution resume_from_checkpoint revision sample_batch_size scale_lr seed snr_gamma
text_encoder_lr train_batch_size train_text_encoder use_8bit_adam use_dora validation_epochs validation_prompt
variant with_prior_preservation
""".split()


def test_every_flag_of_diffusers_script_is_an_option_here():
    ours = {option for action in build_parser()._actions for option in action.option_strings}
    assert sorted(f"--{name}" for name in DIFFUSERS_FLAGS if f"--{name}" not in ours) == []


def test_diffusers_readme_command_line_parses_as_there(world, tmp_path):
    """diffusers' README command for SDXL DreamBooth LoRA, with a VAE and the hub, pasted as it is (its wandb swapped
    for tensorboard: wandb is not installed here)."""
    args = parse_args([
        f"--pretrained_model_name_or_path={world['model']}", f"--instance_data_dir={world['subject']}",
        f"--pretrained_vae_model_name_or_path={world['model'] / 'vae'}", f"--output_dir={tmp_path / 'out'}",
        "--mixed_precision=fp16", "--instance_prompt=a photo of sks dog", "--resolution=1024", "--train_batch_size=1",
        "--gradient_accumulation_steps=4", "--learning_rate=1e-4", "--report_to=tensorboard", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--max_train_steps=500", "--validation_prompt=A photo of sks dog in a bucket",
        "--validation_epochs=25", "--seed=0", "--push_to_hub", "--enable_xformers_memory_efficient_attention",
        "--output_kohya_format", "--image_interpolation_mode=bicubic",
    ])
    assert (args.push_to_hub, args.gradient_accumulation_steps, args.seed) == (True, 4, 0)
    assert args.image_interpolation_mode == "bicubic" and args.instance_prompt == "a photo of sks dog"


@pytest.mark.parametrize("flags, message", [
    (["--use_dora"], "--use_dora: DoRA is another adapter"),
    (["--do_edm_style_training"], "--do_edm_style_training is not supported"),
    (["--push_to_hub", "--hub_token", "hf_x", "--report_to", "wandb"], "would log the token"),
    (["--caption_column", "text"], "--caption_column goes with --dataset_name"),
])
def test_what_this_trainer_does_not_do_is_refused_in_one_line(world, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv(world, tmp_path / "out", *flags))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and message in error and "unrecognized" not in error


def test_wandb_asked_for_and_missing_is_refused_not_silent(world, tmp_path, capsys):
    if has_module("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(SystemExit):
        parse_args(argv(world, tmp_path / "out", "--report_to", "wandb"))
    assert "--report_to wandb needs the wandb package" in capsys.readouterr().err.strip().splitlines()[-1]


def test_xformers_flag_is_a_note_and_kohya_format_is_added(world, tmp_path, capsys):
    args = parse_args(argv(world, tmp_path / "out", "--enable_xformers_memory_efficient_attention",
                           "--output_formats", "native", "--output_kohya_format"))
    assert "scaled_dot_product_attention" in capsys.readouterr().err
    assert args.output_formats == ["native", "kohya"]


def test_hub_token_never_reaches_files_or_trackers(world, tmp_path):
    args = parse_args(argv(world, tmp_path / "out", "--push_to_hub", "--hub_token", "hf_secret"))
    settings = settings_for_metadata(args)
    assert settings["push_to_hub"] is True and "hf_secret" not in json.dumps(settings)


def test_push_to_hub_without_the_hub_fails_before_training(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert main(argv(world, out, "--push_to_hub", "--hub_model_id", "someone/sks-circle")) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert "--push_to_hub: cannot create the model repository 'someone/sks-circle'" in error[-1]
    assert not any(out.glob("*.safetensors")) and not any(out.glob("checkpoint-*"))


def test_what_goes_to_the_hub_and_what_stays_local(world, tmp_path):
    """A finished run's folder, filtered as the upload filters it: the adapters, card and samples go; checkpoints,
    class images and logs stay."""
    from huggingface_hub.utils import filter_repo_objects

    out = tmp_path / "out"
    assert main(argv(world, out, "--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images", "2",
                     "--class_inference_steps", "2", "--checkpointing_steps", "2", steps=3)) == 0
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "events.out").write_text("x")
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("checkpoint-2/") for f in files) and any(f.startswith("class_images/") for f in files)
    pushed = set(filter_repo_objects(files, ignore_patterns=ignored(out, out / "class_images", Path("logs"))))
    assert {NATIVE_FILE, KOHYA_FILE, "README.md", "loss.csv"} <= pushed
    assert not [f for f in pushed if f.split("/")[0] in ("logs", "class_images") or f.startswith("checkpoint-")]


def test_cache_dir_holds_the_hub_models(world, tmp_path, monkeypatch):
    """A model id found in --cache_dir (the hub's cache layout), offline: the run loads it from there."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--someone--tiny-sdxl"
    shutil.copytree(world["model"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for sub in ("tokenizer", "tokenizer_2"):  # as a download leaves them: files the hub said it does not have
        (repo / ".no_exist" / ("0" * 40) / sub).mkdir(parents=True)
        (repo / ".no_exist" / ("0" * 40) / sub / "config.json").touch()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", huggingface_hub.constants.HF_HUB_CACHE)
    monkeypatch.setenv("HF_HUB_CACHE", huggingface_hub.constants.HF_HUB_CACHE)
    out = tmp_path / "out"
    command = argv(world, out, "--output_formats", "native", steps=1)
    command[command.index(str(world["model"]))] = "someone/tiny-sdxl"
    assert main(command) == 1  # not in the default cache
    assert main(command + ["--cache_dir", str(cache)]) == 0
    assert (out / NATIVE_FILE).is_file()


def write_metadata_dataset(root, world, lines):
    (root / "pics").mkdir(parents=True)
    for path in sorted(world["subject"].glob("*.png")):
        shutil.copy(path, root / "pics" / path.name)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_dataset_name_reads_an_imagefolder_with_captions(world, tmp_path):
    names = sorted(p.name for p in world["subject"].glob("*.png"))
    lines = [{"file_name": f"pics/{n}", "prompt": f"sks circle number {i}" if i else " "} for i, n in enumerate(names)]
    write_metadata_dataset(tmp_path / "data", world, lines)
    command = argv(world, tmp_path / "out", "--output_formats", "native", steps=2)
    at = command.index("--instance_data_dir")
    command[at: at + 2] = ["--dataset_name", str(tmp_path / "data"), "--caption_column", "prompt"]
    args = parse_args(command)
    images = gather(args.subsets, warn=False)
    assert [p.name for p in images.paths] == names
    assert images.captions == [PROMPT] + [f"sks circle number {i}" for i in range(1, len(names))]  # empty: the prompt
    assert main(command) == 0

    command[command.index("prompt")] = "text"
    with pytest.raises(SystemExit):
        parse_args(command)


def test_dataset_name_reads_a_spreadsheets_csv(world, tmp_path):
    """metadata.csv as a spreadsheet saves it: a byte-order mark, quoted captions with commas."""
    names = sorted(p.name for p in world["subject"].glob("*.png"))
    write_metadata_dataset(tmp_path / "data", world, [])
    (tmp_path / "data" / "metadata.jsonl").unlink()
    rows = "".join(f'pics/{n},"sks circle, photo {i}"\r\n' for i, n in enumerate(names))
    (tmp_path / "data" / "metadata.csv").write_text("\ufefffile_name,text\r\n" + rows, encoding="utf-8")
    command = argv(world, tmp_path / "out")
    at = command.index("--instance_data_dir")
    command[at: at + 2] = ["--dataset_name", str(tmp_path / "data"), "--caption_column", "text"]
    images = gather(parse_args(command).subsets, warn=False)
    assert images.captions == [f"sks circle, photo {i}" for i in range(len(names))]


@pytest.mark.parametrize("lines, message", [
    ([{"file_name": "pics/missing.png", "text": "a"}], "row 1's file_name 'pics/missing.png' is not a file"),
    ([{"image": "x", "text": "a"}], "--image_column 'image': "),
])
def test_dataset_name_metadata_problems_are_one_line(world, tmp_path, capsys, lines, message):
    write_metadata_dataset(tmp_path / "data", world, lines)
    command = argv(world, tmp_path / "out")
    at = command.index("--instance_data_dir")
    command[at: at + 2] = ["--dataset_name", str(tmp_path / "data")]
    with pytest.raises(SystemExit):
        parse_args(command)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_dataset_name_through_the_datasets_library(world, tmp_path):
    """Images stored inside a parquet dataset are written out once, pixel for pixel, and captioned by its column."""
    datasets = pytest.importorskip("datasets")
    originals = [Image.open(p).convert("RGB") for p in sorted(world["subject"].glob("*.png"))]
    rows = {"image": originals + [None], "text": [f"sks circle {i}" for i in range(5)] + ["no picture"]}
    table = datasets.Dataset.from_dict(rows)
    (tmp_path / "data" / "data").mkdir(parents=True)
    table.cast_column("image", datasets.Image()).to_parquet(tmp_path / "data" / "data" / "train-00000.parquet")
    command = argv(world, tmp_path / "out")
    at = command.index("--instance_data_dir")
    command[at: at + 2] = ["--dataset_name", str(tmp_path / "data"), "--caption_column", "text",
                           "--cache_dir", str(tmp_path / "cache")]
    images = gather(parse_args(command).subsets, warn=False)
    assert images.captions == [f"sks circle {i}" for i in range(5)]
    assert all(p.parent == tmp_path / "out" / "dataset_images" for p in images.paths)
    for path, original in zip(images.paths, originals):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(original))


@pytest.mark.parametrize("mode, pil", [("lanczos", Image.LANCZOS), ("bicubic", Image.BICUBIC), ("box", Image.BOX)])
def test_image_interpolation_mode_is_the_resize_filter(tmp_path, mode, pil):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    dataset = DreamBoothDataset([tmp_path / "a.png"], "p", 64, center_crop=True, interpolation=mode)
    pixels = dataset.example("instance", 0, 0, (64, 64)).pixels
    expected = np.asarray(image.resize((64, 64), pil), dtype=np.float32) / 127.5 - 1
    assert torch.equal(pixels, torch.from_numpy(expected).permute(2, 0, 1))


def test_prior_generation_precision_sets_the_class_pipeline_dtype(world):
    pipe = class_image_pipeline(str(world["model"]), None, None, "cpu", precision="bf16")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    assert class_image_pipeline(str(world["model"]), None, None, "cpu").unet.dtype == torch.float32
