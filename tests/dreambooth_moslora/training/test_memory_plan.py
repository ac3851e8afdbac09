"""--memory_budget_gib and --train_batch_size auto: the planner's choices on SDXL's real sizes, and in the trainer."""

import json

import pytest

from dreambooth_moslora import AdapterConfig
from dreambooth_moslora.errors import TrainingError
from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.training import main
from dreambooth_moslora.training.memory_plan import GIB, Job, Setting, parameter_counts, peak_gib, plan

from .conftest import argv

# SDXL base's parameter counts (checked against the published configs in tests/toyworld/test_tiny_sdxl.py)
SDXL = dict(unet_params=2_567_463_684, text_encoder_params=123_060_480 + 694_659_840, vae_params=83_653_863,
            adapter_params=5_815_040)


def sdxl_job(**changes) -> Job:
    return Job(**SDXL, **{"resolution": 1024, "compute": "bf16", "cache_latents": True, **changes})


def test_the_low_memory_setting_for_an_8_gb_card_is_fp8_with_checkpointing():
    chosen = plan(sdxl_job(), 7.5, None, None, None)
    assert (chosen.gradient_checkpointing, chosen.base_precision, chosen.batch_size) == (True, "fp8", 1)
    assert chosen.peak_gib <= 7.5
    # the faster settings were tried first and did not fit
    for faster in (Setting(False, "auto", 1), Setting(False, "fp8", 1), Setting(True, "auto", 1)):
        assert peak_gib(sdxl_job(), faster) > 7.5


def test_bigger_budgets_drop_checkpointing_and_fp8_then_grow_the_batch():
    on_24 = plan(sdxl_job(), 24, None, None, None)
    on_80 = plan(sdxl_job(), 80, None, None, None)
    for chosen in (on_24, on_80):
        assert (chosen.gradient_checkpointing, chosen.base_precision) == (False, "auto")
    assert 1 < on_24.batch_size < on_80.batch_size
    assert peak_gib(sdxl_job(), Setting(False, "auto", on_80.batch_size + 1)) > 80 >= on_80.peak_gib
    # a class image per instance image: the same budget holds about half the batch
    assert plan(sdxl_job(images_per_example=2), 80, None, None, None).batch_size in (on_80.batch_size // 2,
                                                                                     on_80.batch_size // 2 - 1)


def test_what_the_command_line_fixed_is_kept():
    chosen = plan(sdxl_job(), 80, 2, True, None)  # batch 2 and checkpointing given
    assert (chosen.batch_size, chosen.gradient_checkpointing, chosen.base_precision) == (2, True, "auto")
    assert plan(sdxl_job(), 80, None, None, "fp8").base_precision == "fp8"
    assert plan(sdxl_job(), 12, None, None, None, max_batch=1).batch_size == 1  # not more than the data holds


def test_uncached_latents_and_trained_text_encoders_cost_memory():
    base = peak_gib(sdxl_job(), Setting(True, "auto", 1))
    uncached = peak_gib(sdxl_job(cache_latents=False), Setting(True, "auto", 1))
    assert uncached == pytest.approx(base + SDXL["vae_params"] * 4 / GIB)
    assert peak_gib(sdxl_job(train_text_encoder=True), Setting(True, "auto", 1)) > base + 1.5
    assert peak_gib(sdxl_job(resolution=512), Setting(True, "auto", 1)) < base


@pytest.mark.parametrize("budget, batch, message", [
    (3, None, "nothing fits in 3 GiB at 1024 px: the smallest setting (batch 1, gradient checkpointing on, base "
              "weights in fp8) needs"),
    (24, 16, "nothing fits in 24 GiB at 1024 px: the smallest setting (batch 16,"),
])
def test_nothing_fits_is_one_line(budget, batch, message):
    with pytest.raises(TrainingError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")):
        plan(sdxl_job(), budget, batch, None, None)


def test_parameter_counts_come_from_the_configs_on_the_meta_device(world):
    from diffusers import UNet2DConditionModel

    counts = parameter_counts(str(world["model"]), AdapterConfig(rank=4), train_text_encoder=False)
    unet = UNet2DConditionModel.from_pretrained(world["model"], subfolder="unet")
    assert counts["unet"] == sum(p.numel() for p in unet.parameters())
    assert 0 < counts["adapter"] < counts["unet"] / 10
    with_encoders = parameter_counts(str(world["model"]), AdapterConfig(rank=4), train_text_encoder=True)
    assert with_encoders["adapter"] > counts["adapter"] and with_encoders["text_encoders"] > 0


def test_the_trainer_plans_its_batch_and_refuses_a_budget_nothing_fits(world, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    args = argv(world, out, "--memory_budget_gib", "0.8", "--output_formats", "native", steps=2)
    args[args.index("--train_batch_size") + 1] = "auto"
    caplog.set_level("INFO", logger="dreambooth_moslora")
    assert main(args) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan"))
    assert line.startswith("memory plan for 0.8 GiB at 64 px: batch ") and "the learning rate stays as given" in line
    training = json.loads(read_safetensors(out / "moslora_adapter.safetensors")[1]["training"])
    assert training["train_batch_size"] == int(line.split("batch ")[1].split(",")[0]) >= 1
    assert main(argv(world, tmp_path / "none", "--memory_budget_gib", "0.01", steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: nothing fits in 0.01 GiB at 64 px")
    assert not list((tmp_path / "none").glob("*.safetensors"))


def test_batch_size_must_be_a_number_or_auto(world, tmp_path, capsys):
    args = argv(world, tmp_path / "out")
    args[args.index("--train_batch_size") + 1] = "many"
    with pytest.raises(SystemExit):
        main(args)
    assert "expected a whole number or auto, got 'many'" in capsys.readouterr().err
