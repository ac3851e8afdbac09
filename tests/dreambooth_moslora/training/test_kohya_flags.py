"""A command line written for sd-scripts' sdxl_train_network.py: its flags are refused in one line that says what
does each one's job here."""

import re

from dreambooth_moslora.training.kohya_flags import KOHYA_FLAGS
from dreambooth_moslora.training.options import build_parser, parse_args

from .conftest import error_of

OURS = {option for action in build_parser()._actions for option in action.option_strings}


def test_the_hints_name_only_options_that_exist_and_no_kohya_flag_is_ours():
    assert sorted(f"--{flag}" for flag in KOHYA_FLAGS if f"--{flag}" in OURS) == []
    named = {option for hint in KOHYA_FLAGS.values() for option in re.findall(r"--\w+", hint)}
    assert named and sorted(named - OURS) == []


def test_a_kohya_command_line_is_answered_flag_by_flag(base_argv, capsys):
    error = error_of(base_argv + ["--network_module=networks.lora", "--network_dim", "16", "--network_alpha=8",
                                  "--optimizer_type", "AdamW8bit", "--xformers", "--weighted_captions"], capsys)
    assert "unrecognized arguments: --network_module=networks.lora --network_dim 16 --network_alpha=8" in error
    assert "--network_dim → --rank;" in error and "--network_alpha → --lora_alpha (sd-scripts' default is 1" in error
    assert "--optimizer_type → --optimizer adamw|prodigy (AdamW8bit: --use_8bit_adam)" in error
    assert "--xformers → nothing to switch on" in error
    assert "--weighted_captions →" not in error and "--weighted_captions" in error  # unknown there too: no hint


def test_a_config_file_with_kohya_keys_is_answered_too(base_argv, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("network_dim = 16\nmax_train_epochs = 4\n")
    error = error_of(base_argv + ["--config", str(config)], capsys)
    assert f"unknown option(s) in {config}: max_train_epochs, network_dim" in error
    assert "--max_train_epochs → --num_train_epochs; --network_dim → --rank" in error


def test_an_unknown_flag_alone_is_argparses_message(base_argv, capsys):
    assert error_of(base_argv + ["--frobnicate"], capsys).endswith("error: unrecognized arguments: --frobnicate")


def test_kohya_resolution_pair_reads_as_a_side_when_square(base_argv, capsys):
    assert parse_args(base_argv + ["--resolution", "768,768"]).resolution == 768
    assert parse_args(base_argv + ["--resolution=512"]).resolution == 512
    assert "'768,1024' is not square" in error_of(base_argv + ["--resolution", "768,1024"], capsys)
    assert "expected a side in pixels" in error_of(base_argv + ["--resolution", "big"], capsys)
