"""train_dreambooth.py's options: diffusers' names, a config file, and one-line errors before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_moslora.training.options import dataloader_workers, parse_args

from .conftest import error_of

ROOT = Path(__file__).resolve().parents[3]



def test_a_pasted_diffusers_command_line_parses(base_argv):
    args = parse_args(base_argv + [
        "--with_prior_preservation", "--class_prompt", "a photo of dog", "--prior_loss_weight", "0.5",
        "--num_class_images", "200", "--resolution", "1024", "--train_batch_size", "1",
        "--gradient_accumulation_steps", "4", "--gradient_checkpointing", "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", "500",
        "--mixed_precision", "fp16", "--use_8bit_adam", "--snr_gamma", "5.0", "--train_text_encoder",
        "--checkpointing_steps", "100", "--checkpoints_total_limit", "2", "--seed", "0", "--report_to", "none",
        "--validation_prompt", "a photo of sks dog in a bucket", "--validation_epochs", "25", "--rank", "8",
        "--center_crop", "--random_flip", "--cache_latents", "--optimizer", "AdamW",
    ])
    assert args.rank == 8 and args.lora_alpha == 8.0 and args.mixer == "learned" and args.mixer_init == "kaiming"
    assert args.optimizer == "adamw" and args.output_formats == ["native", "diffusers", "kohya"]
    assert args.class_data_dir == Path(args.output_dir) / "class_images"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
        (["--mixer", "bogus"], "argument --mixer: invalid choice"),
        (["--resolution", "1001"], "--resolution must be a positive multiple of 8"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--lora_alpha", "-2"], "--lora_alpha must be positive"),
        (["--optimizer", "prodigy", "--use_8bit_adam"], "--use_8bit_adam goes with --optimizer adamw"),
        (["--output_formats", "ckpt"], "argument --output_formats: invalid choice"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "is not a folder"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--memory_budget_gib", "-1"], "--memory_budget_gib must be positive"),
        (["--logging_steps", "0"], "--logging_steps must be at least 1"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers cannot be negative"),
        (["--base_precision", "int4"], "argument --base_precision: invalid choice"),
        (["--torch_compile_mode", "fast"], "argument --torch_compile_mode: invalid choice"),
    ],
)
def test_conflicting_or_bad_options_are_one_line(base_argv, capsys, extra, message):
    assert message in error_of(base_argv + extra, capsys)


def test_missing_instance_dir_and_required_options(tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "x", "--instance_prompt", "p", "--output_dir", str(tmp_path / "o")]
    expected = "give one of --instance_data_dir, --dataset_name, --train_data_dir or --dataset_config"
    assert expected in error_of(argv, capsys)
    argv += ["--instance_data_dir", str(tmp_path / "missing")]
    assert "does not exist" in error_of(argv, capsys)


def test_unwritable_output_dir_fails_at_start(base_argv, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert "is not writable" in error_of(base_argv + ["--output_dir", str(blocker / "out")], capsys)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_with_command_line_overrides(base_argv, tmp_path, suffix):
    config = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        config.write_text('rank = 16\nmixer = "frozen"\nlearning_rate = 3e-4\noutput_formats = '
                          '["diffusers"]\nrandom_flip = true\n')
    else:
        config.write_text("rank: 16\nmixer: frozen\nlearning_rate: 3.0e-4\noutput_formats: "
                          "[diffusers]\nrandom_flip: true\n")
    args = parse_args(base_argv + ["--config", str(config), "--rank", "2"])
    assert args.rank == 2  # the command line wins
    assert args.mixer == "frozen" and args.learning_rate == 3e-4 and args.output_formats == ["diffusers"]
    assert args.random_flip is True and args.lora_alpha == 2.0


def test_bad_config_files(base_argv, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = 4\nnot_an_option = 1\n")
    assert "unknown option(s) in" in error_of(base_argv + ["--config", str(bad)], capsys)
    bad.write_text('mixer = "bogus"\n')
    assert "mixer must be one of" in error_of(base_argv + ["--config", str(bad)], capsys)
    bad.write_text("rank = [\n")
    assert "cannot read --config" in error_of(base_argv + ["--config", str(bad)], capsys)


def test_entry_point_fails_before_loading_any_model(tmp_path):
    """A bad command line costs nothing: no model download is even attempted (the hub is unreachable here)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path",
         "stabilityai/stable-diffusion-xl-base-1.0", "--instance_data_dir", str(tmp_path), "--instance_prompt", "x",
         "--output_dir", str(tmp_path / "out"), "--with_prior_preservation"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == "train_dreambooth.py: error: --with_prior_preservation needs --class_prompt"
    assert "Traceback" not in result.stderr


def test_mixer_lr_puts_the_mixers_in_groups_of_their_own(tmp_path):
    import torch

    from dreambooth_moslora import AdapterConfig, inject_components, pipeline_components
    from dreambooth_moslora.surgery import mixer_parameters
    from dreambooth_moslora.training.options import param_groups
    from toyworld.tiny_sdxl import build_tiny_sdxl

    components = pipeline_components(build_tiny_sdxl(seed=0))
    params = inject_components(components, AdapterConfig(rank=4))
    mixers = {id(p) for m in components.values() for p in mixer_parameters(m)}
    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(tmp_path),
                       "--instance_prompt", "a sks dog", "--output_dir", str(tmp_path / "o"), "--learning_rate",
                       "1e-4", "--text_encoder_lr", "5e-5", "--mixer_lr", "1e-3", "--train_text_encoder"])
    groups = param_groups(args, params, 1, mixers)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3, 5e-5, 1e-3]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for ps in params.values() for p in ps}
    assert all(p.shape[-2:] == (4, 4) for g in (groups[1], groups[3]) for p in g["params"])
    args.mixer_lr = None
    assert len(param_groups(args, params, 1, mixers)) == 2
    assert torch.optim.AdamW(groups)  # a valid optimizer: no tensor in two groups


def test_images_are_read_in_workers_on_a_gpu_unless_latents_are_cached(base_argv):
    args = parse_args(base_argv)
    assert args.dataloader_num_workers is None
    assert 1 <= dataloader_workers(args, cuda=True) <= 4
    assert dataloader_workers(args, cuda=False) == 0  # on a CPU the cores compute the step
    assert dataloader_workers(parse_args(base_argv + ["--cache_latents"]), cuda=True) == 0  # nothing to read
    assert dataloader_workers(parse_args(base_argv + ["--dataloader_num_workers", "3"]), cuda=False) == 3
    assert parse_args(base_argv + ["--train_batch_size", "auto"]).train_batch_size == "auto"
