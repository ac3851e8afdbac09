"""A training run's folder, read: its record (run.json), its log, loss.csv, validation grids and class images give
the run's state and progress, whichever server or process wrote them; small previews of its images for the page."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dreambooth_moslora.formats import NATIVE_FILE
from dreambooth_moslora.safe_files import save_image
from dreambooth_moslora.training.data import IMAGE_EXTENSIONS
from dreambooth_moslora.training.loop import read_loss_log, steps_per_second

RUN_FILE, LOG_FILE = "run.json", "train.log"
ACTIVE = ("starting", "running", "stopping")


@dataclass
class RunStatus:
    run_id: str | None = None
    state: str = "idle"  # idle, starting, running, stopping, done, stopped, failed
    phase: str = ""  # what the trainer is doing: loading, class images, training, saving
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    steps_per_second: float | None = None
    seconds_left: float | None = None
    loss_curve: list = field(default_factory=list)  # (step, loss)
    samples: list = field(default_factory=list)  # (path, step): validation grids, oldest first; step None: the final
    class_images: list = field(default_factory=list)  # paths, as they come
    class_images_wanted: int = 0
    error: str | None = None
    adapter_id: str | None = None  # the native file's id in the Generate tab, once written
    instance_prompt: str = ""
    resumable: bool = False

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["samples"] = [{"path": str(p), "step": s} for p, s in self.samples]
        d["class_images"] = [str(p) for p in self.class_images]
        return d




def read_record(run_dir: Path) -> dict:
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_status(run_dir: Path, record: dict, running: bool) -> RunStatus:
    """A run's progress from its files: run.json, train.log, loss.csv, the validation grids, the class images."""
    state = record.get("state", "failed")
    if state in ACTIVE and not running and not trainer_alive(record, run_dir):
        # it ended while no server watched it (the server was restarted): its files say how
        if (run_dir / NATIVE_FILE).is_file():
            state = "done"
        elif state == "stopping":
            state = "stopped"
        else:
            state, record = "failed", {**record, "error": trainer_error(run_dir / LOG_FILE, 1)}
    rows = read_loss_log(run_dir / "loss.csv")
    curve = [(r.step, r.loss) for r in rows]
    s = RunStatus(run_id=run_dir.name, state=state, max_steps=int(record.get("max_steps", 0)),
                  error=record.get("error"), instance_prompt=record.get("instance_prompt", ""), loss_curve=curve)
    s.step = curve[-1][0] if curve else 0
    s.loss = curve[-1][1] if curve else None
    # over the latest steps of the trainer now running (a resumed run's earlier steps were timed by another)
    s.steps_per_second = steps_per_second(rows, since=record.get("started", 0), window=50, at_least=3)
    if s.steps_per_second and state in ACTIVE:
        s.seconds_left = (s.max_steps - s.step) / s.steps_per_second
    s.samples = sorted(((p, int(p.stem.removeprefix("validation-step"))) for p in run_dir.glob("validation-step*.png")
                        if p.stem.removeprefix("validation-step").isdigit()), key=lambda x: x[1])
    if (run_dir / "validation.png").is_file():
        s.samples.append((run_dir / "validation.png", None))
    class_dir = Path(record["class_dir"]) if record.get("class_dir") else None
    if class_dir is not None and class_dir.is_dir():
        s.class_images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        s.class_images_wanted = int(record.get("options", {}).get("num_class_images", 0))
    s.phase = phase(run_dir / LOG_FILE, s, state)
    if (run_dir / NATIVE_FILE).is_file():
        s.adapter_id = f"{run_dir.name}/{NATIVE_FILE}"
    s.resumable = state in ("stopped",
                            "failed") and any((p / NATIVE_FILE).is_file() for p in run_dir.glob("checkpoint-*"))
    return s


def trainer_alive(record: dict, run_dir: Path) -> bool:
    """Whether the trainer a run records is running (its pid alive, with this run's folder on its command line,
    so that a pid reused by another program does not count). Where /proc is missing: False."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir).encode() in command


def phase(log: Path, s: RunStatus, state: str) -> str:
    """What the trainer is doing, from its log since the latest launch and the step reached."""
    if state not in ACTIVE:
        return state
    if s.step >= s.max_steps > 0:
        return "saving the adapter files"
    text = tail(log).rsplit("\n$ ", 1)[-1]  # each launch starts with its command line
    if s.step > 0 or "resumed from" in text or text.rfind("INFO training ") > text.rfind("INFO generating "):
        return "training"
    if "INFO generating " in text:
        return f"class images ({len(s.class_images)} of {s.class_images_wanted})"
    return "loading the base model"


def tail(path: Path, size: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def trainer_error(log: Path, code: int) -> str:
    """The trainer's one-line error from its log, else what ended it."""
    lines = [line.strip() for line in tail(log).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or line.startswith("train_dreambooth.py: error:"):
            return line.removeprefix("train_dreambooth.py: ")
    if code < 0:
        return f"the trainer was ended by signal {-code}"
    return f"the trainer failed (exit code {code}): {lines[-1][:200] if lines else 'no output'}"


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def preview(path: Path, folder: Path, side: int = 512) -> Path:
    """A small copy of an image of a run for the page to show (the page may serve only its own output folder)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}:{stat.st_size}:{side}".encode()).hexdigest()[:16]
    out = folder / "previews" / f"{key}.png"
    if not out.is_file():
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side * 4, side))  # grids are wide: bound the height, allow the width
            if image.height < 128:  # the toy world's 32 px images: shown larger, with sharp pixels
                factor = max(1, 128 // image.height)
                image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
            save_image(image, out)
    return out
