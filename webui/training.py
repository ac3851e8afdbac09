"""The web demo's Train tab without the web: training runs of train_dreambooth.py, one at a time.

A run is the trainer itself in a subprocess (not a second loop), in a folder of its own under the
adapters folder, named by date and token: its instance images and captions, ``run.json`` (the
command, the state), ``train.log``, and what the trainer writes (``loss.csv``, validation grids,
checkpoints, the adapter files, the model card). Progress is read from those files (run_folder.py), so a
reloaded page, a second tab or a script calling the API all see the same run; the presets are presets.py. Stop
asks the trainer to stop (SIGTERM: it ends after the current step with a checkpoint); Resume continues a stopped
run with the trainer's exact resume. Class images live in one folder per (base model, class
prompt, resolution) under ``class-images/`` and are reused by later runs.

Nothing is read outside the uploads, the data root and the adapters folder, nor written outside the
adapters folder; every refusal is a RequestError with one line, raised before anything is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dreambooth_moslora.errors import DataError, RequestError
from dreambooth_moslora.formats import NATIVE_FILE
from dreambooth_moslora.safe_files import PARTIAL_SUFFIX, WEIGHT_SUFFIXES, remove_path, write_text
from dreambooth_moslora.training.data import IMAGE_EXTENSIONS, load_image
from dreambooth_moslora.training.stopping import EXIT_CODE as STOPPED_EXIT_CODE

from .engine import Engine, _number
from .presets import ADJUSTABLE, PRESETS, SDXL_LOW_MEMORY, TOY_PRESET, Preset, Span
from .run_folder import (ACTIVE, LOG_FILE, RUN_FILE, RunStatus, format_seconds, read_record, read_status, trainer_alive,
                         trainer_error)

MIN_IMAGES, MAX_IMAGES = 3, 30
# from the header, before decoding: beyond this an upload is refused (decompression bombs)
MAX_IMAGE_PIXELS = 50 * 2**20
MAX_FILE_BYTES = 10 * 2**20
CLASS_IMAGES = "class-images"
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


@dataclass
class TrainRequest:
    images: list = field(default_factory=list)  # uploaded files: images, and optional captions (.txt of the same name)
    folder: str | None = None  # instead: a folder under the data root
    captions: dict = field(default_factory=dict)  # image file name → caption, as edited; else its .txt, else the prompt
    instance_prompt: str = ""
    class_prompt: str = ""  # what the subject is without its token; prior preservation draws it
    prior_preservation: bool = True
    preset: str = TOY_PRESET
    base_model: str | None = None
    sample_prompt: str = ""  # the validation prompt; empty: the instance prompt
    settings: dict = field(default_factory=dict)  # ADJUSTABLE options that differ from the preset


def token_words(instance_prompt: str, class_prompt: str) -> list[str]:
    """The words of the instance prompt that the class prompt lacks: the subject's token(s)."""
    known = {w.lower() for w in WORD.findall(class_prompt)}
    return [w for w in WORD.findall(instance_prompt) if w.lower() not in known]


def safe_name(text: str, fallback: str = "run") -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40]
    return name or fallback


def weights_identity(base_model: str) -> list:
    """The base model's name and, for a local folder, each weight file's path, size and modification time:
    class images are the base model's own prior, so a model rewritten in place (a retrained or updated
    folder) gets new ones instead of another model's. Stat only: a plan is drawn on every change in the page."""
    def stamp(path: Path) -> list:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    folder = Path(base_model)
    if folder.is_file():  # a single-file checkpoint
        return [base_model, *stamp(folder)]
    if not folder.is_dir():  # a hub id
        return [base_model]
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return [base_model, *([str(p.relative_to(folder)), *stamp(p)] for p in files)]


class Trainer:
    """The training runs of one server: at most one running; every run's folder under the engine's adapters folder."""

    def __init__(self, engine: Engine, data_root: str | os.PathLike | None = None, max_file_bytes: int = MAX_FILE_BYTES,
                 python: str = sys.executable):
        self.engine = engine
        self.root = engine.root
        self.data_root = Path(data_root).resolve() if data_root else None
        self.max_file_bytes = max_file_bytes
        self.python = python
        self.lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._run_dir: Path | None = None
        self._recorded = threading.Event()  # set once the watcher has recorded how the current run ended

    @property
    def default_preset(self) -> str:
        """The toy world's preset on a demo server (its base model is the toy world's), else SDXL's low-memory one."""
        return TOY_PRESET if self.engine.demo_model else SDXL_LOW_MEMORY

    # ---- what a request would do

    def options_for(self, r: TrainRequest) -> tuple[dict, Preset]:
        """The trainer's options for a request (preset, then the checked adjustments), without the paths."""
        if r.preset not in PRESETS:
            raise RequestError(f"unknown preset {str(r.preset)[:60]!r}: choose one of {', '.join(PRESETS)}")
        preset = PRESETS[r.preset]
        options = dict(preset.options)
        if not isinstance(r.settings, dict):
            raise RequestError("settings must be a table of option names and values")
        for name, value in r.settings.items():
            if name not in ADJUSTABLE:
                raise RequestError(f"{str(name)[:40]!r} is not a setting the page may change: {', '.join(ADJUSTABLE)}")
            if value is None or value == "":
                continue
            rule = ADJUSTABLE[name]
            if isinstance(rule, Span):
                kind = "a whole number " if rule.whole else ""
                value = _number(value, f"{name} must be {kind}between {rule.low:g} and {rule.high:g}", rule.low,
                                rule.high, rule.whole)
            elif value not in rule:
                raise RequestError(f"{name} must be one of {', '.join(map(str, rule))}")
            options[name] = value
        return options, preset

    def base_model_for(self, r: TrainRequest, preset: Preset) -> str:
        if r.base_model and str(r.base_model).strip():
            model = self.engine.allowed_base(str(r.base_model))
            if model is None:
                raise RequestError(f"base model {str(r.base_model).strip()[:200]!r} is not one this server offers: "
                                   f"choose from {', '.join(self.engine.base_models()) or 'none'}")
        else:
            model = (self.engine.demo_model if preset.prefers_demo_model
                     else None) or self.engine.default_base or self.engine.demo_model
            if model is None:
                raise RequestError("no base model: choose one (the server offers none; start "
                                   "it with --base_model or --demo)")
        if Path(model).is_dir():  # a folder must hold a diffusers pipeline; a hub id is checked by the trainer
            try:
                json.loads((Path(model) / "model_index.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise RequestError(f"base model {model} cannot be loaded: no readable model_index.json in it") from None
        return model

    def check_prompts(self, r: TrainRequest) -> str:
        """The token (first word the class prompt lacks), or RequestError."""
        for name in ("instance_prompt", "class_prompt", "sample_prompt"):
            if not isinstance(getattr(r, name), str):
                raise RequestError(f"the {name.replace('_', ' ')} must be text")
        if not r.instance_prompt.strip():
            raise RequestError('the instance prompt is empty: name the subject with a rare '
                               'token, e.g. "a photo of sks dog"')
        if not r.class_prompt.strip():
            raise RequestError('the class prompt is empty: say what the subject is without '
                               'its token, e.g. "a photo of dog"')
        tokens = token_words(r.instance_prompt, r.class_prompt)
        if not tokens:
            example = ("a sks " + r.class_prompt.strip().removeprefix("a "))[:80]
            raise RequestError(f"the instance prompt {r.instance_prompt.strip()[:80]!r} has no token: it needs a rare "
                               f"word the class prompt lacks, e.g. {example!r}")
        return tokens[0]

    def class_dir(self, base_model: str, class_prompt: str, resolution: int) -> Path:
        """One folder of class images per (base model, class prompt, resolution): later runs reuse it."""
        identity = [weights_identity(base_model), class_prompt.strip(), resolution]
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]
        return self.root / CLASS_IMAGES / f"{safe_name(class_prompt, 'class')}-{key}"

    def plan(self, r: TrainRequest) -> str:
        """What Start would do, in words (or why it would refuse)."""
        try:
            options, preset = self.options_for(r)
            base = self.base_model_for(r, preset)
            self.check_prompts(r)
            count = len(self._pictures(r))
        except RequestError as exc:
            return f"Not ready: {exc}"
        if not MIN_IMAGES <= count <= MAX_IMAGES:
            return f"Not ready: {count} image(s); upload {MIN_IMAGES} to {MAX_IMAGES} photos of the subject."
        steps = options["max_train_steps"]
        batch = options["train_batch_size"] * options.get("gradient_accumulation_steps", 1)
        lines = [f"{steps} steps of batch {batch} on {count} images at {options['resolution']} px on "
                 f"{base}; rank {options['rank']}, "
                 f"mixer {options['mixer']}, adapters on the "
                 f"UNet{' and text encoders' if options['train_text_encoder'] else ''}."]
        if r.prior_preservation:
            folder = self.class_dir(base, r.class_prompt, options["resolution"])
            have = len([p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]) if folder.is_dir() else 0
            wanted = options["num_class_images"]
            lines.append(f"Prior preservation on {wanted} images of {r.class_prompt.strip()!r}: "
                         + (f"{have} already made, {max(0, wanted - have)} to generate first." if have
                            else "generated first."))
        lines.append(f"Samples every {options['validation_steps']} steps.")
        rate = self.measured_rate(base, options)
        lines.append(f"About {format_seconds(steps / rate)} of training at {rate:.2f} "
                     "steps/s (measured in an earlier run)."
                     if rate else "The time left is estimated once the first steps are timed.")
        return " ".join(lines)

    def measured_rate(self, base: str, options: dict) -> float | None:
        """Steps per second of the latest finished run with the same base model, resolution, batch and rank."""
        same = ("resolution", "train_batch_size", "rank", "train_text_encoder")
        for record in reversed(self.runs()):
            o = record.get("options", {})
            alike = record.get("base_model") == base and all(o.get(k) == options.get(k) for k in same)
            if alike and record.get("steps_per_second"):
                return float(record["steps_per_second"])
        return None

    # ---- starting, stopping, resuming

    def start(self, r: TrainRequest) -> RunStatus:
        """Checks everything, writes the run folder (whole or not at all), starts the trainer."""
        with self.lock:
            self._refuse_if_running()
            options, preset = self.options_for(r)
            base = self.base_model_for(r, preset)
            token = self.check_prompts(r)
            images = self.collect_images(r)
            need = preset.min_free_bytes + sum(size for _, _, size in images)
            free = shutil.disk_usage(self.root).free
            if free < need:
                raise RequestError(f"not enough disk space in {self.root}: {free / 2**20:.0f} MB free, "
                                   f"this run needs about {need / 2**20:.0f} MB")
            run_dir = self._new_run_dir(token)
            self._write_run_folder(run_dir, r, images, options, base)
            try:
                return self._launch(run_dir, resume=False)
            except RequestError:
                remove_path(run_dir)  # nothing started: nothing stays
                raise

    def stop(self) -> RunStatus:
        """Asks the running trainer to stop after its current step (it writes a checkpoint); asked again, ends it at
        once."""
        with self.lock:
            if self._running() and self._process.poll() is None:
                run_dir = self._run_dir
                pid = self._process.pid
            elif detached := self._detached():  # started by this server before a restart: known by its pid
                run_dir, pid = self.root / detached["id"], detached["pid"]
            else:
                raise RequestError("no run is in progress")
            second = read_record(run_dir).get("state") == "stopping"
            try:  # a second Stop ends it at once (the last checkpoint is intact)
                os.kill(pid, signal.SIGKILL if second else signal.SIGTERM)
            except ProcessLookupError:
                raise RequestError("no run is in progress") from None
            if not second:
                self._update_record(run_dir, state="stopping")
        return self.status(run_dir.name)

    def resume(self, run_id: str) -> RunStatus:
        """Continues a stopped or failed run from its latest checkpoint (the trainer's exact resume)."""
        with self.lock:
            self._refuse_if_running()
            run_dir = self.run_dir(run_id)
            if self.status(run_id).state not in ("stopped", "failed") or not read_record(run_dir).get("argv"):
                raise RequestError(f"run {run_id} cannot be resumed")
            if not any((p / NATIVE_FILE).is_file() for p in run_dir.glob("checkpoint-*")):
                raise RequestError(f"run {run_id} has no checkpoint to resume from: start a new run")
            return self._launch(run_dir, resume=True)

    def _running(self) -> bool:
        """A run in progress: its trainer alive, or its end not yet recorded."""
        return self._process is not None and not self._recorded.is_set()

    def _detached(self) -> dict | None:
        """The record of a run whose trainer is still alive though this server did not start it (it was restarted)."""
        for record in reversed(self.runs()):
            if record.get("state") in ACTIVE and trainer_alive(record, self.root / record["id"]):
                return record
        return None

    def _refuse_if_running(self) -> None:
        busy = self._run_dir.name if self._running() else (self._detached() or {}).get("id")
        if busy:
            raise RequestError(f"a run is already in progress ({busy}): stop it or wait for it to end")

    def _new_run_dir(self, token: str) -> Path:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        name, n = f"{stamp}-{safe_name(token)}", 1
        while (self.root / name).exists():
            n += 1
            name = f"{stamp}-{safe_name(token)}-{n}"
        return self.root / name

    def _write_run_folder(self, run_dir: Path, r: TrainRequest, images: list, options: dict, base: str) -> None:
        """The instance images with their captions and run.json, made in a hidden folder renamed when complete."""
        partial = run_dir.with_name(f".{run_dir.name}{PARTIAL_SUFFIX}")
        instance = partial / "instance"
        try:
            instance.mkdir(parents=True)
            for name, (source, caption, _size) in zip(unique_names([n for n, _, _ in images]), images):
                shutil.copyfile(source, instance / name)
                write_text((instance / name).with_suffix(".txt"), (caption or r.instance_prompt).strip() + "\n")
            argv = self._argv(run_dir, r, options, base)
            record = dict(id=run_dir.name, argv=argv, options=options, base_model=base, preset=r.preset,
                          state="created", instance_prompt=r.instance_prompt.strip(),
                          class_prompt=r.class_prompt.strip(), prior_preservation=bool(r.prior_preservation),
                          max_steps=options["max_train_steps"],
                          class_dir=argv[argv.index("--class_data_dir") + 1] if r.prior_preservation else None,
                          created=time.time())
            write_text(partial / RUN_FILE, json.dumps(record, indent=1))
            os.replace(partial, run_dir)
        except OSError as exc:
            remove_path(partial)
            reason = "the disk is full" if exc.errno == 28 else (exc.strerror or str(exc))
            raise RequestError(f"cannot write the run folder in {self.root}: {reason}") from None

    def _argv(self, run_dir: Path, r: TrainRequest, options: dict, base: str) -> list[str]:
        fixed = dict(pretrained_model_name_or_path=base, base_config=self.engine.base_config,
                     instance_data_dir=run_dir / "instance",
                     instance_prompt=r.instance_prompt.strip(), caption_extension=".txt", output_dir=run_dir,
                     validation_prompt=(r.sample_prompt or "").strip() or r.instance_prompt.strip(), report_to="none")
        if r.prior_preservation:
            fixed.update(with_prior_preservation=True, class_prompt=r.class_prompt.strip(),
                         class_data_dir=self.class_dir(base, r.class_prompt, options["resolution"]))
        argv = []
        for name, value in {**options, **fixed}.items():
            if value is True:
                argv.append(f"--{name}")
            elif value is not False and value is not None:
                argv += [f"--{name}", str(value)]
        return argv

    def _launch(self, run_dir: Path, resume: bool) -> RunStatus:
        record = read_record(run_dir)
        argv = record["argv"] + (["--resume_from_checkpoint", "latest"] if resume else [])
        command = [self.python, "-m", "dreambooth_moslora.training", *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        try:
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, start_new_session=True)
        except OSError as exc:
            raise RequestError(f"cannot start the trainer: {exc.strerror or exc}") from None
        self._recorded = threading.Event()
        self._process, self._run_dir = process, run_dir
        self._update_record(run_dir, state="running", started=time.time(), pid=process.pid, error=None)
        threading.Thread(target=self._watch, args=(process, run_dir), daemon=True).start()
        return self.status(run_dir.name)

    def _watch(self, process: subprocess.Popen, run_dir: Path) -> None:
        """Waits for the trainer and records how it ended."""
        code = process.wait()
        status = self.status(run_dir.name)
        with self.lock:  # stop() signals and records "stopping" under this lock: read the state after it has
            asked_to_stop = read_record(run_dir).get("state") == "stopping"  # SIGTERM before the handler is set: -15
            if code == 0 and (run_dir / NATIVE_FILE).is_file():
                state, error = "done", None
            elif code == STOPPED_EXIT_CODE or (asked_to_stop and code in (-signal.SIGTERM, -signal.SIGKILL)):
                state, error = "stopped", None
            else:
                state, error = "failed", trainer_error(run_dir / LOG_FILE, code)
            self._update_record(run_dir, state=state, error=error, ended=time.time(), exit_code=code,
                                steps_per_second=status.steps_per_second)
            self._recorded.set()

    def _update_record(self, run_dir: Path, **changes) -> None:
        record = read_record(run_dir)
        record.update(changes)
        write_text(run_dir / RUN_FILE, json.dumps(record, indent=1))

    # ---- what the page shows

    def runs(self) -> list[dict]:
        """Every run's record, oldest first."""
        records = []
        for path in sorted(self.root.glob(f"*/{RUN_FILE}")):
            record = read_record(path.parent)
            if record:
                records.append(record)
        return sorted(records, key=lambda r: r.get("created", 0))

    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RequestError("no run named")
        path = self.root / run_id
        if not (path / RUN_FILE).is_file():
            raise RequestError(f"no run {run_id!r} in the adapters folder")
        return path

    def status(self, run_id: str | None = None) -> RunStatus:
        """A run's state and progress (the running one, else the latest, when none is named)."""
        if run_id:
            run_dir = self.run_dir(run_id)
        elif self._run_dir is not None:
            run_dir = self._run_dir
        else:
            records = self.runs()
            if not records:
                return RunStatus()
            run_dir = self.root / records[-1]["id"]
        return read_status(run_dir, read_record(run_dir), running=run_dir == self._run_dir and self._running())

    def collect_images(self, r: TrainRequest) -> list[tuple[Path, str | None, int]]:
        """(file, caption, size) for each training image, every one checked as an image, or RequestError."""
        files = self._files(r)
        texts = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
        pictures = self._pictures(r, files)
        if not pictures:
            raise RequestError("no image: upload 3 to 30 photos of the subject")
        if len(pictures) > MAX_IMAGES:
            raise RequestError(f"{len(pictures)} images: at most {MAX_IMAGES} per run")
        if len(pictures) < MIN_IMAGES:
            raise RequestError(f"{len(pictures)} image(s): DreamBooth needs at least {MIN_IMAGES} "
                               "photos of the subject")
        captions = r.captions if isinstance(r.captions, dict) else {}
        checked = []
        for f in pictures:
            size = self._check_image(f)
            caption = captions.get(f.name) or captions.get(display_name(f))
            if not (isinstance(caption, str) and caption.strip()) and f.stem in texts:
                caption = read_small_text(texts[f.stem], self.max_file_bytes)
            checked.append((f, caption.strip() if isinstance(caption, str) and caption.strip() else None, size))
        return checked

    def _files(self, r: TrainRequest) -> list[Path]:
        """The request's files: its uploads, or the files of its folder under the data root."""
        if r.folder:
            return self._folder_files(r.folder)
        if not isinstance(r.images, (list, tuple)):
            raise RequestError("images must be a list of files")
        return [Path(str(f)) for f in r.images]

    def _pictures(self, r: TrainRequest, files: list[Path] | None = None) -> list[Path]:
        """The files meant as images (captions aside), not yet checked."""
        return [f for f in (self._files(r) if files is None else files) if f.suffix.lower() != ".txt"]

    def _folder_files(self, folder: str) -> list[Path]:
        if self.data_root is None:
            raise RequestError("this server has no data root: upload the images instead")
        path = (self.data_root / str(folder)).resolve()
        if not path.is_relative_to(self.data_root) or not path.is_dir():
            raise RequestError(f"no folder {str(folder)[:80]!r} under the data root")
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))

    def _check_image(self, path: Path) -> int:
        name = display_name(path)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise RequestError(f"{name}: not an image file (expected {', '.join(sorted(IMAGE_EXTENSIONS))})")
        try:
            size = path.stat().st_size
        except OSError:
            raise RequestError(f"{name}: cannot be read") from None
        if size > self.max_file_bytes:
            raise RequestError(f"{name}: {size / 2**20:.1f} MB, over the "
                               f"{self.max_file_bytes / 2**20:.3g} MB limit per file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as header:  # the header alone: a decompression bomb is refused before decoding
                    width, height = header.size
        except Image.DecompressionBombError:
            raise RequestError(f"{name}: too many pixels to decode safely (a decompression bomb?)") from None
        except (OSError, ValueError, SyntaxError):
            raise RequestError(f"{name}: not an image this server can read") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise RequestError(f"{name}: {width}×{height} pixels, over the {MAX_IMAGE_PIXELS // 2**20} megapixel limit")
        try:
            load_image(path)  # a full decode: truncated and corrupt files are refused now, not mid-training
        except DataError as exc:
            raise RequestError(f"{name}: {str(exc).split(': ', 1)[-1]}") from None
        return size


def display_name(path: Path) -> str:
    """An upload's own file name (Gradio keeps it as the last part of its cache path)."""
    return Path(path).name


def unique_names(names: list[str]) -> list[str]:
    """Safe, distinct file names (same suffix) for the run folder."""
    taken, out = set(), []
    for name in names:
        stem, suffix = safe_name(Path(name).stem, "image"), Path(name).suffix.lower()
        candidate, n = f"{stem}{suffix}", 1
        while candidate.lower() in taken or Path(candidate).stem.lower() in {Path(t).stem for t in taken}:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def read_small_text(path: Path, limit: int) -> str | None:
    try:
        if path.stat().st_size > min(limit, 64 * 1024):
            return None
        return " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return None
