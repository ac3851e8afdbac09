"""--prediction_type and --rescale_betas_zero_snr: trained against, sampled with, and recorded as sd-scripts does."""

import json
import math

import pytest
import torch

from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.training import main
from dreambooth_moslora.inference import sampling_config
from dreambooth_moslora.training.models import class_image_pipeline, load_base_model, noise_schedule

from .conftest import argv


def test_v_prediction_with_zero_terminal_snr_over_an_epsilon_config(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--prediction_type", "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", "5",
                     "--validation_prompt", "a sks circle", "--num_validation_images", "1",
                     "--num_validation_inference_steps", "2", steps=3)) == 0
    _, native = read_safetensors(out / "moslora_adapter.safetensors")
    training = json.loads(native["training"])
    assert training["prediction_type"] == "v_prediction" and training["rescale_betas_zero_snr"] is True
    _, kohya = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["modelspec.prediction_type"] == "v"
    assert kohya["ss_v_parameterization"] == "True" and kohya["ss_zero_terminal_snr"] == "True"
    losses = [float(row.split(",")[1]) for row in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)  # min-SNR weighting meets SNR 0 at t = 999
    assert (out / "validation.png").is_file()


def test_an_epsilon_model_is_recorded_as_epsilon(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--output_formats", "kohya", steps=1)) == 0
    _, kohya = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["modelspec.prediction_type"] == "epsilon"
    assert kohya["ss_v_parameterization"] == "False" and kohya["ss_zero_terminal_snr"] == "False"


def test_the_schedule_overrides_the_models_config_for_training_and_sampling(world):
    base = load_base_model(str(world["model"]), None, None, None, "cpu", torch.float32,
                           schedule=noise_schedule("v_prediction", True))
    scheduler = base.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] == 0 < scheduler.alphas_cumprod[-2]  # no signal left at the last step
    plain = load_base_model(str(world["model"]), None, None, None, "cpu", torch.float32)
    assert plain.noise_scheduler.config.prediction_type == "epsilon" and plain.noise_scheduler.alphas_cumprod[-1] > 0
    assert sampling_config(scheduler.config, {})["timestep_spacing"] == "trailing"  # sampling starts at pure noise
    assert sampling_config(plain.noise_scheduler.config, {})["timestep_spacing"] != "trailing"
    pipe = class_image_pipeline(str(world["model"]), None, None, "cpu", noise_schedule("v_prediction", True))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("extra, message", [
    (["--rescale_betas_zero_snr", "--prediction_type", "epsilon"], "--rescale_betas_zero_snr needs --prediction_type"),
    (["--rescale_betas_zero_snr"], "error: zero terminal SNR on an epsilon-prediction model"),  # the model's own
])
def test_zero_terminal_snr_without_v_prediction_is_refused(world, tmp_path, capsys, extra, message):
    try:
        code = main(argv(world, tmp_path / "out", *extra, steps=1))
    except SystemExit as exc:  # argparse's refusal
        code = exc.code
    assert code in (1, 2)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list((tmp_path / "out").glob("*.safetensors"))
