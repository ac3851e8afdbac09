"""The Train tab's manager: real trainer runs (subprocesses) on the tiny SDXL, and every refusal."""

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from toyworld.tiny_sdxl import save_tiny_sdxl
from toyworld.world import write_subject
from webui.engine import Engine, RequestError
from webui.presets import TOY_PRESET
from webui.training import MAX_IMAGES, TrainRequest, Trainer, token_words

QUICK = dict(max_train_steps=6, validation_steps=3, num_class_images=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = save_tiny_sdxl(root / "random-sdxl", seed=0)
    subject = root / "uploads"
    write_subject(subject, count=5, size=32)
    data = root / "data"
    write_subject(data / "circle", count=4, size=32)
    adapters = root / "adapters"
    adapters.mkdir()
    engine = Engine(adapters, demo_model=str(model), output_dir=root / "images")
    return {"root": root, "model": model, "subject": subject, "adapters": adapters, "engine": engine, "data": data}


@pytest.fixture
def trainer(world):
    t = Trainer(world["engine"], data_root=world["data"])
    yield t
    if t._running():  # a test that failed midway leaves no trainer behind
        t._process.kill()
        t._recorded.wait(30)


def request(world, **changes) -> TrainRequest:
    images = sorted(str(p) for p in world["subject"].glob("*.png"))
    fields = dict(images=images, instance_prompt="a sks circle", class_prompt="a circle", preset=TOY_PRESET,
                  settings=dict(QUICK), captions={"sks_circle_0.png": "a sks circle, edited"})
    fields.update(changes)
    return TrainRequest(**fields)


def wait(trainer, condition, timeout=300):
    deadline = time.time() + timeout
    while True:
        status = trainer.status()
        if condition(status):
            return status
        assert status.state in ("starting", "running", "stopping"), (status.state, status.error)
        assert time.time() < deadline, status
        time.sleep(0.1)


def test_a_run_trains_shows_progress_and_its_adapter_is_listed(world, trainer):
    plan = trainer.plan(request(world))
    assert plan.startswith("6 steps of batch 2 on 5 images at 32 px")
    assert "2 images of 'a circle': generated first" in plan
    started = trainer.start(request(world))
    assert started.state == "running" and started.max_steps == 6
    run = world["adapters"] / started.run_id
    assert started.run_id.endswith("-sks") and (run / "run.json").is_file()
    done = wait(trainer, lambda s: s.state == "done")
    assert done.step == 6 and [step for step, _ in done.loss_curve] == list(range(1, 7))
    assert all(loss > 0 for _, loss in done.loss_curve) and done.loss == done.loss_curve[-1][1]
    assert done.steps_per_second is not None and done.steps_per_second > 0
    assert [step for _, step in done.samples] == [3, None]  # every 3 steps, then the final grid
    assert len(done.class_images) == 2 and done.class_images_wanted == 2
    assert done.adapter_id == f"{started.run_id}/moslora_adapter.safetensors"
    listed = {e.id: e for e in world["engine"].adapters()}
    assert listed[done.adapter_id].info["instance_prompt"] == "a sks circle"  # the Generate tab lists it, no restart
    assert (run / "instance" / "sks_circle_0.txt").read_text() == "a sks circle, edited\n"
    assert (run / "instance" / "sks_circle_1.txt").read_text() == "a sks circle\n"  # no caption given: the prompt
    assert (run / "README.md").is_file() and json.loads((run / "run.json").read_text())["exit_code"] == 0
    assert "$ " in (run / "train.log").read_text() and "Traceback" not in (run / "train.log").read_text()
    # the same class and base model again: the class images are reused, and the speed is known before the start
    again = trainer.plan(request(world))
    assert "2 already made, 0 to generate first" in again and "steps/s (measured in an earlier run)" in again


def test_masked_loss_from_the_uploads_alpha_channel(world, trainer, tmp_path):
    """The advanced panel's alpha mask: photos with transparency keep it on upload, and the trainer is told."""
    from toyworld.world import write_subject

    plain, masks = tmp_path / "plain", tmp_path / "masks"
    write_subject(plain, count=3, size=32, mask_folder=masks)
    uploads = []
    for image in sorted(plain.glob("*.png")):
        rgba = Image.open(image).convert("RGBA")
        rgba.putalpha(Image.open(masks / image.name))
        rgba.save(tmp_path / image.name)
        uploads.append(str(tmp_path / image.name))
    started = trainer.start(request(world, images=uploads, captions={}, settings=dict(QUICK, alpha_mask=True)))
    done = wait(trainer, lambda s: s.state == "done")
    run = world["adapters"] / started.run_id
    assert "--alpha_mask" in json.loads((run / "run.json").read_text())["argv"] and done.step == 6
    copied = Image.open(run / "instance" / Path(uploads[0]).name)
    assert copied.mode == "RGBA" and copied.getchannel("A").getextrema() == (0, 255)
    unmasked = trainer._argv(run, request(world, prior_preservation=False), dict(QUICK, alpha_mask=False), "base")
    assert "--alpha_mask" not in unmasked and "--max_train_steps" in unmasked  # off by default in every preset


def test_one_run_at_a_time_stop_reattach_and_resume(world, trainer):
    long = request(world, settings=dict(QUICK, max_train_steps=400, validation_steps=1000))
    started = trainer.start(long)
    wait(trainer, lambda s: s.step >= 2)
    with pytest.raises(RequestError, match="already in progress"):
        trainer.start(request(world))
    assert trainer.status().run_id == started.run_id  # a page reload asks without an id
    restarted = Trainer(world["engine"])  # a server restarted while the trainer runs: it finds the run by its pid
    assert restarted.status().run_id == started.run_id and restarted.status().state == "running"
    with pytest.raises(RequestError, match="already in progress"):
        restarted.start(request(world))
    restarted.stop()
    stopped = wait(trainer, lambda s: s.state == "stopped")
    run = world["adapters"] / started.run_id
    assert stopped.resumable and (run / f"checkpoint-{stopped.step}" / "moslora_adapter.safetensors").is_file()
    assert stopped.adapter_id is None and 2 <= stopped.step < 400
    with pytest.raises(RequestError, match="no run is in progress"):
        trainer.stop()
    trainer.resume(started.run_id)
    resumed = wait(trainer, lambda s: s.step >= stopped.step + 2)
    assert resumed.run_id == started.run_id and "resumed from" in (run / "train.log").read_text()
    trainer.stop()
    wait(trainer, lambda s: s.state == "stopped")
    steps = [int(line.split(",")[0]) for line in (run / "loss.csv").read_text().splitlines()[1:]]
    assert steps[: stopped.step] == list(range(1, stopped.step + 1)) and steps[stopped.step] == stopped.step + 1


def test_a_failing_run_shows_the_trainers_one_line_error(world, trainer, tmp_path):
    broken = world["root"] / "models" / "broken"
    shutil.copytree(world["model"], broken)
    shutil.rmtree(broken / "unet")  # loadable-looking, but the trainer cannot load it
    engine = Engine(world["adapters"], base_model=str(broken), output_dir=tmp_path)
    failing = Trainer(engine)
    started = failing.start(request(world, preset=TOY_PRESET, base_model=str(broken)))
    deadline = time.time() + 120
    while failing.status(started.run_id).state == "running":
        assert time.time() < deadline
        time.sleep(0.1)
    status = failing.status(started.run_id)
    assert status.state == "failed" and status.error.startswith("error: cannot load the base model")
    assert "\n" not in status.error and not status.resumable
    assert (world["adapters"] / started.run_id / "instance" / "sks_circle_0.png").is_file()  # what was written stays
    shutil.rmtree(world["adapters"] / started.run_id)


def test_stop_right_after_start_is_a_stop_and_a_trainer_that_cannot_start_leaves_nothing(world, trainer):
    started = trainer.start(request(world))
    trainer.stop()  # the trainer may not even have set its SIGTERM handler yet
    status = wait(trainer, lambda s: s.state not in ("starting", "running", "stopping"), timeout=120)
    assert status.run_id == started.run_id and status.state == "stopped"
    assert status.error is None and not status.resumable
    shutil.rmtree(world["adapters"] / started.run_id)

    before = sorted(world["adapters"].rglob("*"))
    broken = Trainer(world["engine"], python=str(world["root"] / "no-such-python"))
    with pytest.raises(RequestError, match="cannot start the trainer"):
        broken.start(request(world))
    assert sorted(world["adapters"].rglob("*")) == before


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size it never holds: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_uploads(world, tmp: Path, kind: str) -> list[str]:
    good = sorted(str(p) for p in world["subject"].glob("*.png"))
    if kind == "text file":
        (tmp / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
        return [*good, str(tmp / "notes.pdf")]
    if kind == "corrupt":
        data = Path(good[0]).read_bytes()
        (tmp / "cut.png").write_bytes(data[: len(data) // 2])
        return [*good, str(tmp / "cut.png")]
    if kind == "bomb":
        (tmp / "bomb.png").write_bytes(png_header(40_000, 40_000))
        return [*good, str(tmp / "bomb.png")]
    if kind == "huge":
        (tmp / "huge.png").write_bytes(png_header(10_000, 10_000))
        return [*good, str(tmp / "huge.png")]
    if kind == "big file":
        Image.new("RGB", (600, 600)).save(tmp / "noise.bmp")  # ~1 MB, over the limit set below
        return [*good, str(tmp / "noise.bmp")]
    if kind == "too many":
        return [str(shutil.copy(good[0], tmp / f"copy{i}.png")) for i in range(MAX_IMAGES + 1)]
    if kind == "too few":
        return good[:2]
    return []  # no image


@pytest.mark.parametrize("kind, message", [
    ("text file", "notes.pdf: not an image file"), ("corrupt", "cut.png: "),
                                           ("bomb", "bomb.png: too many pixels to decode safely"),
    ("huge", "huge.png: 10000×10000 pixels, over the 50 megapixel limit"),
    ("big file", "noise.bmp: 1.0 MB, over the 0.477 MB limit"), ("too many", f"at most {MAX_IMAGES} per run"),
    ("too few", "at least 3 photos"), ("none", "no image"),
])
def test_bad_uploads_are_refused_and_change_nothing(world, tmp_path, kind, message):
    trainer = Trainer(world["engine"], max_file_bytes=500_000)
    before = sorted(world["adapters"].rglob("*"))
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        trainer.start(request(world, images=bad_uploads(world, tmp_path, kind)))
    assert sorted(world["adapters"].rglob("*")) == before


@pytest.mark.parametrize("changes, message", [
    (dict(instance_prompt="a circle"), "has no token"), (dict(instance_prompt="  "), "instance prompt is empty"),
    (dict(class_prompt=""), "class prompt is empty"), (dict(preset="fastest"), "unknown preset"),
    (dict(settings={"rank": 0}), "rank must be a whole number between 1"),
                                              (dict(settings={"learning_rate": "fast"}), "learning_rate"),
    (dict(settings={"mixer": "blender"}), "mixer must be one of"),
                                              (dict(settings={"output_dir": "/etc"}), "not a setting"),
    (dict(settings={"seed": float("nan")}), "seed"), (dict(base_model="/etc"), "not one this server offers"),
    (dict(images=[], folder="../uploads"), "no folder '../uploads' under the data root"),
    (dict(instance_prompt=["a", "list"]), "must be text"),
                                              (dict(settings={"alpha_mask": "yes"}), "alpha_mask must be one of"),
])
def test_bad_requests_are_refused_and_change_nothing(world, changes, message):
    trainer = Trainer(world["engine"], data_root=world["data"])
    before = sorted(world["adapters"].rglob("*"))
    with pytest.raises(RequestError, match=message):
        trainer.start(request(world, **changes))
    assert trainer.plan(request(world, **changes)).startswith("Not ready:")
    assert sorted(world["adapters"].rglob("*")) == before


def test_a_full_disk_is_refused_before_and_while_writing(world, trainer, monkeypatch):
    import webui.training as training

    before = sorted(world["adapters"].rglob("*"))
    usage = shutil.disk_usage(world["adapters"])
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(RequestError, match="not enough disk space .* 10 MB free, this run needs about 50 MB"):
        trainer.start(request(world))
    monkeypatch.undo()

    def full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.shutil, "copyfile", full)
    with pytest.raises(RequestError, match="cannot write the run folder .*: the disk is full"):
        trainer.start(request(world))
    assert sorted(world["adapters"].rglob("*")) == before  # the half-made folder is gone


def test_a_folder_under_the_data_root_and_the_token(world, trainer):
    images = trainer.collect_images(request(world, images=[], folder="circle"))
    assert [p.name for p, _, _ in images] == [f"sks_circle_{i}.png" for i in range(4)]
    assert images[1][1] == "a sks circle on a white background"  # the caption file beside it
    assert token_words("a photo of sks dog", "a photo of dog") == ["sks"]
    assert token_words("A Photo of Dog", "a photo of dog") == []


def test_class_images_follow_the_base_models_weights(world, trainer, tmp_path):
    """A base model rewritten in place gets a new class-image folder: its prior is not the old model's."""
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    first = trainer.class_dir(str(model), "a circle", 32)
    assert trainer.class_dir(str(model), " a circle ", 32) == first  # same weights, same prompt: reused
    assert trainer.class_dir(str(model), "a square", 32) != first
    assert trainer.class_dir(str(model), "a circle", 64) != first
    weights = next(model.glob("unet/*.safetensors"))
    stat = weights.stat()
    weights.write_bytes(weights.read_bytes())  # the same size, written again (a retrained model would differ)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert trainer.class_dir(str(model), "a circle", 32) != first
    assert trainer.class_dir("org/some-model", "a circle", 32) == trainer.class_dir("org/some-model", "a circle", 32)
    assert trainer.class_dir("org/some-model", "a circle", 32).parent == world["adapters"] / "class-images"
