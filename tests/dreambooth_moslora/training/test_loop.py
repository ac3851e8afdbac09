"""The DreamBooth trainer end to end on the tiny SDXL: outputs, learning, modes, resume, processes, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from dreambooth_moslora import AdapterConfig, inject_components, load_adapter
from dreambooth_moslora.formats import recorded
from dreambooth_moslora.safe_files import read_safetensors
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
from toyworld.tiny_sdxl import save_tiny_sdxl
from toyworld.world import write_subject
from dreambooth_moslora.training import main

from tests.helpers import denoising_loss, free_port

from .conftest import argv

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "a sks circle"


def captions(world):
    paths = sorted(world["subject"].glob("*.png"))
    return paths, [p.with_suffix(".txt").read_text().strip() for p in paths]


def test_prior_preservation_run_learns_and_writes_everything(world, tmp_path):
    out = tmp_path / "out"
    code = main(argv(world, out, "--with_prior_preservation", "--class_prompt", "a circle",
                     "--num_class_images", "4", "--class_inference_steps", "2", "--learning_rate", "1e-2",
                     "--checkpointing_steps", "10", "--checkpoints_total_limit", "1",
                     "--validation_prompt", "a sks circle on a gray background", "--num_validation_images", "2",
                     "--num_validation_inference_steps", "2", steps=30))
    assert code == 0
    assert len(list((out / "class_images").glob("*.png"))) == 4
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-20"]  # total limit 1; none at the last step
    for name in ("moslora_adapter.safetensors", "pytorch_lora_weights.safetensors",
                 "pytorch_lora_weights_kohya.safetensors", "README.md", "validation.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*partial*"))
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,time" and [int(l.split(",")[0]) for l in lines[1:]] == list(range(1, 31))
    assert all(float(l.split(",")[1]) > 0 for l in lines[1:])
    times = [float(l.split(",")[3]) for l in lines[1:]]  # wall clock of each step: the run's speed
    assert times == sorted(times) and time.time() - 600 < times[0] <= times[-1] <= time.time()

    _, metadata = read_safetensors(out / "moslora_adapter.safetensors")
    training = json.loads(metadata["training"])
    assert training["with_prior_preservation"] is True and training["max_train_steps"] == 30
    assert training["prediction_type"] == "epsilon" and training["num_class_images"] == 4
    assert json.loads(metadata["adapter_config"])["mixer"] == "learned"
    _, diffusers_meta = read_safetensors(out / "pytorch_lora_weights.safetensors")
    assert json.loads(diffusers_meta["training"]) == training
    _, kohya_meta = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya_meta["ss_max_train_steps"] == "30" and kohya_meta["ss_num_train_images"] == "5"
    card = (out / "README.md").read_text()
    assert f'base_model: "{world["model"]}"' in card and 'instance_prompt: "a sks circle"' in card
    assert "| mixer | learned |" in card and 'load_lora_weights' in card
    # the example and the samples use the prompt the run sampled with; the files record it for the web demo
    assert 'image = pipe("a sks circle on a gray background"' in card and "`a sks circle on a gray background`" in card
    prompt = "a sks circle on a gray background"
    assert recorded(metadata)["validation_prompt"] == recorded(diffusers_meta)["validation_prompt"] == prompt

    # the adapter learned the subject: lower denoising error on its images than the base model
    paths, caps = captions(world)
    pipe = StableDiffusionXLPipeline.from_pretrained(world["model"])
    before = denoising_loss(pipe, paths, caps)
    load_adapter(pipe, out / "moslora_adapter.safetensors")
    trained = sdxl_forward(pipe, PROMPT)
    after = denoising_loss(pipe, paths, caps)
    assert after < 0.99 * before, (before, after)

    # stock diffusers reproduces the trained UNet from the diffusers file
    stock = StableDiffusionXLPipeline.from_pretrained(world["model"])
    stock.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert max_abs_diff(trained, sdxl_forward(stock, PROMPT)) <= 1e-5


@pytest.mark.parametrize("mixer", ["none", "frozen"])
def test_mixer_modes(world, tmp_path, mixer):
    out = tmp_path / "out"
    assert main(argv(world, out, "--mixer", mixer, "--learning_rate", "1e-3", "--output_formats", "native")) == 0
    tensors, metadata = read_safetensors(out / "moslora_adapter.safetensors")
    assert json.loads(metadata["adapter_config"])["mixer"] == mixer
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["moslora_adapter.safetensors"]
    mixers = {k: v for k, v in tensors.items() if k.endswith(".moslora_M")}
    ups = [v for k, v in tensors.items() if k.endswith(".moslora_B")]
    assert all(u.abs().max() > 0 for u in ups)  # trained
    if mixer == "none":
        assert not mixers
    else:  # frozen: M is exactly its seeded initial value
        fresh = StableDiffusionXLPipeline.from_pretrained(world["model"])
        torch.manual_seed(0)
        inject_components({"unet": fresh.unet}, AdapterConfig(rank=4, alpha=4.0, mixer="frozen"))
        initial = {f"unet.{n}.moslora_M": m.lora_M for n, m in fresh.unet.named_modules() if hasattr(m, "lora_M")}
        assert mixers.keys() == initial.keys()
        assert all(torch.equal(mixers[k], initial[k]) for k in mixers)


def test_train_text_encoder(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--train_text_encoder", "--text_encoder_lr", "1e-3", "--learning_rate", "1e-3",
                     "--gradient_checkpointing")) == 0
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    for component in ("text_encoder", "text_encoder_2"):
        ups = {k: v for k, v in tensors.items() if k.startswith(f"{component}.") and k.endswith("lora_B.weight")}
        trained = {k for k, v in ups.items() if v.abs().max() > 0}
        assert len(ups) == 12
        if component == "text_encoder":
            # SDXL reads CLIP-L's penultimate layer: its last layer gets no gradient, as in any SDXL LoRA
            assert trained == {k for k in ups if ".layers.2." not in k}
        else:  # OpenCLIP-bigG's last layer feeds the pooled embedding
            assert trained == set(ups)
    # the text encoders' adapters reach the outputs of a pipeline that loads the file
    pipe = StableDiffusionXLPipeline.from_pretrained(world["model"])
    base = sdxl_forward(pipe, PROMPT)["pooled_prompt_embeds"]
    load_adapter(pipe, out / "pytorch_lora_weights_kohya.safetensors")
    assert (sdxl_forward(pipe, PROMPT)["pooled_prompt_embeds"] - base).abs().max() > 1e-6


def test_v_prediction_base_model_is_trained_against_velocity(world, tmp_path):
    model = save_tiny_sdxl(tmp_path / "tiny-v", seed=0)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "out"
    world_v = dict(world, model=model)
    assert main(argv(world_v, out, "--learning_rate", "3e-2", "--output_formats", "native", steps=30)) == 0
    _, metadata = read_safetensors(out / "moslora_adapter.safetensors")
    assert json.loads(metadata["training"])["prediction_type"] == "v_prediction"
    paths, caps = captions(world)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    before = denoising_loss(pipe, paths, caps)  # measured against the velocity target
    load_adapter(pipe, out / "moslora_adapter.safetensors")
    assert denoising_loss(pipe, paths, caps) < 0.97 * before


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(argv(world, out, "--learning_rate", "1e12", "--max_grad_norm", "0", "--checkpointing_steps", "1",
                     "--adam_epsilon", "1e-30", steps=50))
    assert code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: the loss became") and "last good checkpoint" in message
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "a checkpoint before the blow-up"
    tensors = load_file(checkpoints[-1] / "moslora_adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no usable image in"),
        (lambda d: ((d / "a.png").write_bytes(b""), (d / "b.txt").write_text("caption")), "no usable image in"),
    ],
    ids=["empty", "only-bad-files"],
)
def test_unusable_instance_folders(world, tmp_path, capsys, setup, message):
    folder = tmp_path / "instance"
    folder.mkdir()
    setup(folder)
    args = argv(world, tmp_path / "out")
    args[args.index("--instance_data_dir") + 1] = str(folder)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {message}") and not any("Traceback" in line for line in err)
    assert not any((tmp_path / "out").glob("*.safetensors"))


def test_bad_files_among_good_ones_are_skipped_with_one_warning(world, tmp_path, caplog):
    folder = tmp_path / "instance"
    write_subject(folder, count=2, size=64)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "readme.md").write_text("hello")
    args = argv(world, tmp_path / "out", "--output_formats", "diffusers", steps=2)
    args[args.index("--instance_data_dir") + 1] = str(folder)
    assert main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipping" in r.getMessage()]
    assert len(warnings) == 1
    assert "zero.jpg: empty file" in warnings[0] and "readme.md: not an image file" in warnings[0]


def _run(args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


RESUME_OPTIONS = ["--learning_rate", "1e-3", "--checkpointing_steps", "4", "--output_formats", "native",
                  "--random_flip", "--lora_dropout", "0.1"]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    reference = tmp_path_factory.mktemp("uninterrupted")
    assert main(argv(world, reference, *RESUME_OPTIONS, steps=24)) == 0
    return reference


def loss_curve(folder: Path) -> dict[int, str]:
    """step → loss from loss.csv; a step logged again after a resume replaces the earlier line."""
    rows = [line.split(",") for line in (folder / "loss.csv").read_text().splitlines()[1:]]
    return {int(step): loss for step, loss, _lr, _time in rows}


def wait_for(process, condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


def assert_resumes_exactly(world, interrupted: Path, reference: Path) -> None:
    assert not (interrupted / "moslora_adapter.safetensors").exists()
    resumed = _run([sys.executable, str(ROOT / "train_dreambooth.py"),
                    *argv(world, interrupted, *RESUME_OPTIONS, "--resume_from_checkpoint", "latest", steps=24)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a = load_file(reference / "moslora_adapter.safetensors")
    b = load_file(interrupted / "moslora_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert loss_curve(interrupted) == loss_curve(reference) and len(loss_curve(reference)) == 24


def test_resume_after_sigkill_gives_the_same_adapter(world, tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    process = _run([sys.executable, str(ROOT / "train_dreambooth.py"), *argv(world, killed, *RESUME_OPTIONS, steps=24)])
    wait_for(process, lambda: (killed / "checkpoint-4").is_dir())
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert_resumes_exactly(world, killed, uninterrupted)


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_is_exact(world, tmp_path, uninterrupted):
    """What the web demo's Stop sends: the run ends after the current step with a checkpoint of that step."""
    stopped = tmp_path / "stopped"
    process = _run([sys.executable, str(ROOT / "train_dreambooth.py"),
                    *argv(world, stopped, *RESUME_OPTIONS, steps=24)])
    wait_for(process, lambda: (stopped / "checkpoint-4").is_dir() and len(loss_curve(stopped)) >= 5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output
    step = max(loss_curve(stopped))
    assert 5 <= step < 24
    assert output.strip().splitlines()[-1].startswith(f"stopped at step {step}: checkpoint-{step} holds")
    assert "Traceback" not in output
    assert (stopped / f"checkpoint-{step}" / "moslora_adapter.safetensors").is_file()
    assert_resumes_exactly(world, stopped, uninterrupted)


def test_sigterm_before_training_ends_at_once(world, tmp_path):
    out = tmp_path / "out"
    process = _run([sys.executable, str(ROOT / "train_dreambooth.py"),
                    *argv(world, out, "--with_prior_preservation", "--class_prompt", "a circle", "--num_class_images",
                          "40", "--sample_batch_size", "1", "--class_inference_steps", "4")])
    wait_for(process,
             lambda: len(list((out / "class_images").glob("*.png"))) >= 2 if (out / "class_images").is_dir() else False)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert output.strip().splitlines()[-1].startswith("stopped before training began")
    made = sorted((out / "class_images").glob("*.png"))
    assert 2 <= len(made) < 40 and all(Image.open(p).size == (64, 64) for p in made)  # whole images only
    assert not (out / "loss.csv").exists()


def test_validation_every_n_steps(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--validation_prompt", PROMPT, "--num_validation_images", "2", "--validation_steps",
                     "2", "--num_validation_inference_steps", "2", "--output_formats", "native", steps=5)) == 0
    grids = sorted(p.name for p in out.glob("validation*.png"))
    assert grids == ["validation-step2.png", "validation-step4.png", "validation.png"]
    first, final = (Image.open(out / name) for name in ("validation-step2.png", "validation.png"))
    assert first.size == final.size == (2 * 64, 64 + 14)  # two images and their caption strip


def test_two_processes_on_cpu(world, tmp_path):
    """Two processes over gloo, started by torchrun (what accelerate launch uses for several devices)."""
    out = tmp_path / "out"
    process = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(ROOT / "train_dreambooth.py"),
                    *argv(world, out, "--with_prior_preservation", "--class_prompt", "a circle",
                          "--num_class_images", "2", "--class_inference_steps", "2", "--checkpointing_steps", "2",
                          steps=4)])
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert "2 process(es)" in output
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["README.md", "checkpoint-2", "class_images", "loss.csv", "moslora_adapter.safetensors",
                            "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"])
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 4  # written by the main process alone
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == [
        "moslora_adapter.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
    ]
    assert len(list((out / "class_images").iterdir())) == 2


def test_cached_latents_train_like_encoding_every_step(world, tmp_path):
    """With no random crop or flip, caching the latents changes nothing but the speed."""
    common = ("--center_crop", "--learning_rate", "1e-3", "--output_formats", "native")
    assert main(argv(world, tmp_path / "plain", *common, steps=4)) == 0
    assert main(argv(world, tmp_path / "cached", *common, "--cache_latents", steps=4)) == 0
    a = load_file(tmp_path / "plain" / "moslora_adapter.safetensors")
    b = load_file(tmp_path / "cached" / "moslora_adapter.safetensors")
    trained = max(a[k].abs().max().item() for k in a if k.endswith("moslora_B"))
    assert trained > 1e-3  # it did train
    # the same to rounding: the cache encodes images one at a time, the loop a batch at a time
    assert max((a[k] - b[k]).abs().max().item() for k in a if k.endswith("moslora_B")) < 0.01 * trained


def test_aspect_ratio_buckets_accumulation_and_bf16(world, tmp_path):
    from PIL import Image

    folder = tmp_path / "instance"
    folder.mkdir()
    source = Image.open(world["subject"] / "sks_circle_0.png")
    for i, size in enumerate([(64, 64), (96, 48), (48, 96), (100, 50)]):
        source.resize(size).save(folder / f"{i}.png")
    args = argv(world, tmp_path / "out", "--aspect_ratio_buckets", "--gradient_accumulation_steps", "2",
                "--mixed_precision", "bf16", "--checkpointing_steps", "2", "--output_formats", "native", steps=3)
    args[args.index("--instance_data_dir") + 1] = str(folder)
    assert main(args) == 0
    tensors, metadata = read_safetensors(tmp_path / "out" / "moslora_adapter.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # the adapter stays fp32 under bf16
    assert all(torch.isfinite(t).all() for t in tensors.values())
    training = json.loads(metadata["training"])
    assert training["mixed_precision"] == "bf16" and training["gradient_accumulation_steps"] == 2
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_resume_from_a_named_checkpoint_and_a_foreign_one(world, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--checkpointing_steps", "2", "--output_formats", "native", "--learning_rate", "1e-3")
    assert main(argv(world, out, *common, steps=4)) == 0
    finished = load_file(out / "moslora_adapter.safetensors")
    (out / "moslora_adapter.safetensors").unlink()
    assert main(argv(world, out, *common, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=4)) == 0
    again = load_file(out / "moslora_adapter.safetensors")
    assert all(torch.equal(finished[k], again[k]) for k in finished)
    # a checkpoint of another adapter (rank 2) is refused with one line, before any step
    other = tmp_path / "other"
    assert main(argv(world, other, "--rank", "2", "--checkpointing_steps", "1", steps=2)) == 0
    capsys.readouterr()
    assert main(argv(world, out, *common, "--resume_from_checkpoint", str(other / "checkpoint-1"), steps=4)) == 1
    assert "does not match the adapter being trained" in capsys.readouterr().err.strip().splitlines()[-1]


def test_prodigy_optimizer(world, tmp_path):
    out = tmp_path / "out"
    assert main(argv(world, out, "--optimizer", "prodigy", "--learning_rate", "1.0", "--output_formats", "native",
                     steps=3)) == 0
    tensors = load_file(out / "moslora_adapter.safetensors")
    ups = [v for k, v in tensors.items() if k.endswith("moslora_B")]
    assert all(torch.isfinite(u).all() for u in ups) and max(u.abs().max().item() for u in ups) > 0


def test_single_process_accelerate_cpu_launch_is_pointed_to_torchrun(world, tmp_path, capsys, monkeypatch):
    """accelerate launch --cpu --num_processes 2 (no MPI hostfile) runs one process: say so, and how to get two."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(argv(world, tmp_path / "out", "--output_formats", "native", steps=1)) == 0
    assert "for several CPU processes use: torchrun --nproc_per_node N" in capsys.readouterr().err


def test_the_loss_log_reads_back_as_written_while_it_is_written(tmp_path):
    from dreambooth_moslora.training.loop import LossLog, read_loss_log, steps_per_second

    path = tmp_path / "loss.csv"
    log = LossLog(path)
    for step in (1, 2, 3):
        log.write(step, 1 / 2**step, 1e-4)
    log.write(2, 0.9, 1e-4)  # logged again after a resume: replaces the earlier line
    log.close()
    with open(path, "a") as f:
        f.write("4,0.12,1e-04,17")  # a line still being written: no newline yet
    rows = read_loss_log(path)
    assert [(r.step, r.loss) for r in rows] == [(1, 0.5), (2, 0.9), (3, 0.125)]
    assert all(r.lr == 1e-4 and r.time is not None for r in rows)
    assert steps_per_second(rows, at_least=4) is None  # three timed rows only
    timed = [type(r)(r.step, r.loss, r.lr, 100.0 + 2 * r.step) for r in rows]  # one step every 2 s
    assert steps_per_second(timed) == 0.5 and steps_per_second(timed, since=105.0) is None  # one row since t=105
    (tmp_path / "old.csv").write_text("step,loss,lr\n1,0.5,0.0001\n")  # before the time column
    assert read_loss_log(tmp_path / "old.csv")[0].time is None and read_loss_log(tmp_path / "none.csv") == []
