"""What the web demo does, without the web: the adapters on disk, one cached pipeline, generation.

The Gradio page (app.py) is a thin layer over this, so the behaviour is tested here directly.
Only files under the configured folder can be loaded, whatever name a request sends.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth_moslora.embeddings import is_embedding, unused_line
from dreambooth_moslora.errors import AdapterError, AdapterFileError, RequestError
from dreambooth_moslora.formats import AdapterFile, summarize
from dreambooth_moslora.single_file import SDXL_BASE_CONFIG, file_pipeline, is_sdxl_checkpoint, is_single_file
from dreambooth_moslora.inference import base_mismatch, load_adapter, sampling_config, set_scale, unload_adapter
from dreambooth_moslora.safe_files import atomic_path, read_header, save_image, sha256_of

SCHEDULERS = ("Euler", "Euler a", "DPM++ 2M", "DDIM")
MIN_SIDE, MAX_SIDE = 32, 2048  # 32: the toy world the offline demo uses
MAX_IMAGES = 4
MAX_COMPARE = 4  # adapters beside the base model in one compare request
MAX_SEED = 2**63 - 1
DEFAULT_TIME_LIMIT = 300.0  # seconds a request may run before it is cut off
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class TimeLimit(Exception):
    """Raised inside the denoising loop when a request has run too long."""


@dataclass
class AdapterEntry:
    id: str  # the path below the adapters folder, with forward slashes: what the page and the API send
    path: Path
    format: str | None = None
    info: dict = field(default_factory=dict)
    error: str | None = None  # why the file cannot be used, for files listed as unreadable

    @property
    def suggested_prompt(self) -> str | None:
        """What the Generate tab pre-fills: the prompt its trainer sampled with, else its instance prompt."""
        return self.info.get("validation_prompt") or self.info.get("instance_prompt")

    @property
    def label(self) -> str:
        if self.error:
            return f"{self.id} — unreadable: {self.error}"
        i = self.info
        parts = [self.format, f"rank {i.get('rank', '?')}", f"α {i.get('alpha', '?')}", f"mixer {i.get('mixer', '?')}"]
        if i.get("steps"):
            parts.append(f"{i['steps']} steps")
        parts.append(i.get("date", ""))
        return f"{self.id} — " + ", ".join(str(p) for p in parts if p)


def describe(path: Path, root: Path) -> AdapterEntry | None:
    """An adapter file's format and metadata from its header alone; None for files that are no adapter."""
    entry = AdapterEntry(path.relative_to(root).as_posix(), path)
    try:
        summary = summarize(path)
    except (AdapterFileError, OSError) as exc:
        entry.error = str(exc).split(": ", 1)[-1]
        return entry
    if summary is None:
        if is_embedding(read_header(path)[0]):
            return None  # pivotal tuning's tokens: they come with their adapter, not on their own
        if "lora" in path.name.lower() or "adapter" in path.name.lower():
            entry.error = "not a LoRA/MoSLoRA file this toolkit knows"
            return entry
        return None  # a model's weights, say: not listed
    entry.format = summary.pop("format")
    entry.info = {**summary, "date": dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")}
    return entry


def discover(root: Path) -> list[AdapterEntry]:
    """Every adapter file below ``root`` (training checkpoints aside), readable or not, sorted by path."""
    entries = []
    for path in sorted(root.rglob("*.safetensors")):
        relative = path.relative_to(root).parts
        if any(part.startswith(("checkpoint-", ".")) for part in relative[:-1]) or path.name.startswith("."):
            continue
        problem = _link_problem(path, root)
        if problem:
            entries.append(AdapterEntry(path.relative_to(root).as_posix(), path, error=problem))
            continue
        entry = describe(path, root)
        if entry is not None:
            entries.append(entry)
    return entries


def _link_problem(path: Path, root: Path) -> str | None:
    """Why a path cannot be used as it links (outside the folder, in a loop, to nothing), or None."""
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 reports a symlink loop this way
        return "a symbolic link loop"
    except OSError as exc:
        return "a symbolic link loop" if exc.errno == 40 else "a link to nothing"
    if not target.is_relative_to(root):
        return "links outside the adapters folder"
    return None


def _number(value, message: str, low: float, high: float, whole: bool = False):
    """A finite number in [low, high] (a whole one when asked), from whatever a client sent; else
    RequestError(message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(message)
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise RequestError(message) from None
    if isinstance(number, float):
        if not math.isfinite(number) or (whole and not number.is_integer()):
            raise RequestError(message)
        number = int(number) if whole else number
    if not low <= number <= high:
        raise RequestError(message)
    return number


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def file_hash(path: Path) -> str:
    return sha256_of(path)[:12]


@dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    adapters: list[str] = field(default_factory=list)  # adapter ids; several only with compare
    compare: bool = False  # the base model beside each adapter, same seeds
    base_model: str | None = None
    steps: int = 25
    guidance: float = 5.0
    seed: int = -1  # -1: a random seed, reported back
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    scheduler: str = "Euler"
    scale: float = 1.0


@dataclass
class Result:
    path: Path  # the PNG, with its generation parameters in a text chunk
    label: str
    parameters: dict


def is_base_model(path: Path) -> bool:
    """A diffusers folder, or an SDXL checkpoint file (by its header)."""
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.suffix == ".safetensors" and is_sdxl_checkpoint(path)


class Engine:
    """Base models come only from an allowed list: the operator's ``base_model``, the ``demo_model``,
    diffusers folders and SDXL checkpoint files (read with ``base_config``'s configs) directly under ``models_dir``,
    and hub ids while the hub can be reached."""

    def __init__(self, adapters_dir: str | os.PathLike, base_model: str | None = None, demo_model: str | None = None,
                 device: str | None = None, output_dir: str | os.PathLike | None = None,
                 models_dir: str | os.PathLike | None = None, time_limit: float = DEFAULT_TIME_LIMIT,
                 base_config: str = SDXL_BASE_CONFIG):
        self.root = Path(adapters_dir).resolve()
        if not self.root.is_dir():
            raise RequestError(f"adapters folder {adapters_dir} does not exist")
        self.default_base = base_model
        self.demo_model = demo_model  # used when no other base model is given or found
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.base_config = base_config  # the configs and tokenizers of checkpoint-file bases
        self.time_limit = float(time_limit)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="moslora-webui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one generation at a time on the one pipeline
        self._pipe = None
        self._pipe_id: str | None = None
        self._scheduler_config = None
        self._loaded: tuple | None = None  # (path, mtime) of the adapter now in the pipeline
        self._adapter: AdapterFile | None = None  # and the adapter itself
        self._hashes: dict[tuple, str] = {}

    # ---- adapters

    def adapters(self) -> list[AdapterEntry]:
        return discover(self.root)

    def resolve(self, adapter_id: str) -> Path:
        """The file for an adapter id, refusing anything outside the adapters folder."""
        if not isinstance(adapter_id, str) or not adapter_id or "\0" in adapter_id:
            raise RequestError("no adapter named")
        candidate = (self.root / adapter_id).resolve()
        if not candidate.is_relative_to(self.root) or candidate.suffix != ".safetensors" or not candidate.is_file():
            raise RequestError(f"no adapter {adapter_id!r} in the adapters folder")
        return candidate

    def entry(self, adapter_id: str) -> AdapterEntry:
        path = self.resolve(adapter_id)
        entry = describe(path, self.root)
        if entry is None or entry.error:
            raise RequestError(f"{adapter_id} cannot be used: {entry.error if entry else 'not an adapter file'}")
        return entry

    def download_copy(self, entry: AdapterEntry) -> Path:
        """A copy of an adapter file in the output folder, which the page may serve (the adapters folder it may not)."""
        copy = self.output_dir / "downloads" / self._hash(entry.path) / entry.path.name
        if not copy.is_file():
            with atomic_path(copy) as tmp:
                shutil.copyfile(entry.path, tmp)
        return copy

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = file_hash(path)
        return self._hashes[key]

    # ---- the pipeline

    def allowed_base(self, name: str) -> str | None:
        """``name`` as a loadable model id when it is on the allowed list, else None."""
        name = name.strip()
        for fixed in (self.default_base, self.demo_model):
            if fixed and (name == fixed or _same_folder(name, fixed)):
                return fixed
        if self.models_dir is not None and name and "\0" not in name:
            candidate = (self.models_dir / name).resolve()
            if candidate.parent == self.models_dir and is_base_model(candidate):
                return str(candidate)
        hub_reachable = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on")
        if hub_reachable and HUB_ID.fullmatch(name) and not Path(name).exists():
            return name
        return None

    def base_models(self) -> list[str]:
        """The base models a request may name (hub ids aside)."""
        listed = [m for m in (self.default_base, self.demo_model) if m]
        if self.models_dir is not None and self.models_dir.is_dir():
            listed += sorted(p.name for p in self.models_dir.iterdir() if is_base_model(p))
        return listed

    def base_for(self, request: Request, entries: list[AdapterEntry]) -> str:
        """The request's base model (from the allowed list), else the operator's, else the first adapter's
        recorded base when it is allowed, else the demo model. Adapter metadata never overrides the operator."""
        if request.base_model and str(request.base_model).strip():
            allowed = self.allowed_base(str(request.base_model))
            if allowed is None:
                raise RequestError(f"base model {str(request.base_model).strip()[:200]!r} "
                                   "is not one this server offers: "
                                   f"choose from {', '.join(self.base_models()) or 'the default'}")
            return allowed
        if self.default_base:
            return self.default_base
        for entry in entries:
            recorded = entry.info.get("base_model")
            if isinstance(recorded, str) and recorded and (allowed := self.allowed_base(recorded)):
                return allowed
        if self.demo_model:
            return self.demo_model
        raise RequestError("no base model: start the server with --base_model, or pick an "
                           "adapter that records an allowed one")

    def pipeline(self, model_id: str):
        """The pipeline for a base model, kept between requests: switching adapters or scale does not reload it."""
        if self._pipe_id != model_id:
            from diffusers import StableDiffusionXLPipeline

            # free the old one first, and forget it: after a failed load no request may find a half-set pipeline
            self._pipe, self._pipe_id, self._loaded = None, None, None
            try:
                if is_single_file(model_id):
                    pipe = file_pipeline(model_id, self.base_config, self.dtype)
                else:
                    pipe = StableDiffusionXLPipeline.from_pretrained(model_id, torch_dtype=self.dtype)
            except Exception as exc:  # a hub id while offline, a wrong folder …
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise RequestError(f"cannot load base model {model_id!r}: {first_line}") from None
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._pipe_id, self._loaded = pipe, model_id, None
            self._scheduler_config = dict(pipe.scheduler.config)
        return self._pipe

    def _use_scheduler(self, pipe, name: str, schedule: dict | None = None) -> float:
        """The chosen sampler, configured for the noise schedule an adapter was trained with (else the base model's
        own); returns the guidance rescale that schedule wants (0.7 at zero terminal SNR, else 0)."""
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                               EulerDiscreteScheduler)

        classes = {"Euler": EulerDiscreteScheduler, "Euler a": EulerAncestralDiscreteScheduler,
                   "DPM++ 2M": DPMSolverMultistepScheduler, "DDIM": DDIMScheduler}
        if name not in classes:
            raise RequestError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
        pipe.scheduler = classes[name].from_config(sampling_config(self._scheduler_config, schedule or {}))
        return 0.7 if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0

    def _use_adapter(self, pipe, path: Path | None, scale: float) -> AdapterFile | None:
        """Puts the adapter and its new tokens in the pipeline (live, so that taking it out restores the base
        exactly); returns it, for its prompt rewriting."""
        key = None if path is None else (str(path), path.stat().st_mtime_ns)
        if key != self._loaded:
            unload_adapter(pipe)
            self._loaded, self._adapter = None, None
            if path is not None:
                try:
                    self._adapter = load_adapter(pipe, path, scale=scale, check_base=False)  # warned of per image
                except AdapterError as exc:
                    raise RequestError(str(exc)) from None
                self._loaded = key
        elif path is not None:
            set_scale(pipe, scale)
        return self._adapter if path is not None else None

    # ---- generation

    def check(self, r: Request) -> Request:
        """The request with every field checked and of its proper type; RequestError names the first bad one."""
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise RequestError("the prompt is empty")
        if not isinstance(r.adapters, (list, tuple)) or not all(isinstance(a, str) for a in r.adapters):
            raise RequestError("adapters must be a list of adapter names")
        if len(r.adapters) > 1 and not r.compare:
            raise RequestError("several adapters at once only in compare mode")
        if len(r.adapters) > MAX_COMPARE:
            raise RequestError(f"at most {MAX_COMPARE} adapters in one comparison")
        if r.scheduler not in SCHEDULERS:
            raise RequestError(f"unknown scheduler {str(r.scheduler)[:40]!r}: choose one of {', '.join(SCHEDULERS)}")
        sides = f"width and height must be multiples of 8 between {MIN_SIDE} and {MAX_SIDE}"
        width, height = (_number(v, sides, MIN_SIDE, MAX_SIDE, whole=True) for v in (r.width, r.height))
        if width % 8 or height % 8:
            raise RequestError(sides)
        return dataclasses.replace(
            r, prompt=r.prompt, negative_prompt=r.negative_prompt if isinstance(r.negative_prompt, str) else "",
            adapters=list(r.adapters), compare=bool(r.compare), width=width, height=height,
            steps=_number(r.steps, "steps must be between 1 and 150", 1, 150, whole=True),
            guidance=_number(r.guidance, "guidance must be between 0 and 30", 0, 30),
            seed=_number(r.seed, f"the seed must be -1 (random) or between 0 and {MAX_SEED}", -1, MAX_SEED, whole=True),
            num_images=_number(r.num_images, f"between 1 and {MAX_IMAGES} images", 1, MAX_IMAGES, whole=True),
            scale=_number(r.scale, "the adapter scale must be between 0 and 1.5", 0, 1.5),
        )

    def generate(self, r: Request, progress=None) -> list[Result]:
        """Renders the request; in compare mode the base model first, then each adapter, with the same seeds."""
        r = self.check(r)
        entries = [self.entry(a) for a in r.adapters]  # refuses a bad name before any work
        seed = random.randrange(2**31) if r.seed < 0 else r.seed
        variants: list[AdapterEntry | None] = ([None] if r.compare or not entries else []) + entries
        results: list[Result] = []
        total, started = len(variants) * r.steps * r.num_images, time.monotonic()
        with self.lock:
            model_id = self.base_for(r, entries)
            pipe = self.pipeline(model_id)
            try:
                warnings = {v.id: w for v in variants if v and (w := base_mismatch(v.info, model_id, v.id))}
                for variant in variants:
                    rescale = self._use_scheduler(pipe, r.scheduler,
                                                  variant.info.get("noise_schedule") if variant else None)
                    adapter = self._use_adapter(pipe, variant.path if variant else None, r.scale)
                    prompt = adapter.rewrite(r.prompt) if adapter else r.prompt  # pivotal tuning's TOK → <s0><s1>
                    if adapter and adapter.embeddings and (unused := unused_line(adapter.embeddings[1], r.prompt)):
                        warnings[variant.id] = "; ".join(filter(None, (warnings.get(variant.id), unused)))
                    for i in range(r.num_images):
                        done = len(results) * r.steps
                        on_step = self._step_callback(progress, done, total, variant.id if variant else "base model",
                                                      started)
                        image = pipe(
                            prompt=prompt, negative_prompt=r.negative_prompt or None, num_inference_steps=r.steps,
                            guidance_scale=r.guidance, guidance_rescale=rescale, width=r.width, height=r.height,
                            generator=torch.Generator("cpu").manual_seed(seed + i), callback_on_step_end=on_step,
                        ).images[0]
                        results.append(self._save(image, r, model_id, seed + i, variant))
                        if variant and variant.id in warnings:
                            results[-1].parameters["warning"] = warnings[variant.id]
            except TimeLimit:
                raise RequestError(f"the request ran longer than {self.time_limit:g} s and was cut off: "
                                   "ask for fewer steps, images or pixels") from None
            finally:
                self._use_adapter(pipe, None, 1.0)  # the base model again between requests
        return results

    def _step_callback(self, progress, done: int, total: int, label: str, started: float):
        def on_step(pipeline, step, timestep, kwargs):
            if progress is not None:
                progress((done + step + 1) / total, desc=label)
            if time.monotonic() - started > self.time_limit:
                raise TimeLimit
            return kwargs

        return on_step

    def _save(self, image: Image.Image, r: Request, model_id: str, seed: int, variant: AdapterEntry | None) -> Result:
        path = variant.path if variant else None
        parameters = {
            "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": seed, "steps": int(r.steps),
            "guidance": float(r.guidance), "width": int(r.width), "height": int(r.height), "scheduler": r.scheduler,
            "base_model": model_id, "adapter": variant.id if variant else None,
            "adapter_scale": float(r.scale) if variant else None, "adapter_sha256": self._hash(path) if path else None,
        }
        text = (
            f"{r.prompt}\nNegative prompt: {r.negative_prompt}\nSteps: {int(r.steps)}, Sampler: {r.scheduler}, "
            f"CFG scale: {float(r.guidance):g}, Seed: {seed}, Size: {int(r.width)}x{int(r.height)}, Model: {model_id}"
        )
        if variant:
            text += f", Lora: {variant.id}, Lora scale: {float(r.scale):g}, Lora hash: {parameters['adapter_sha256']}"
        info = PngInfo()
        info.add_text("parameters", text)  # the key A1111 and ComfyUI read
        info.add_text("dreambooth_moslora", json.dumps(parameters))
        label = f"{'base model' if variant is None else variant.id.removesuffix('.safetensors')} · seed {seed}"
        name = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{seed}-{hashlib.sha1(text.encode()).hexdigest()[:8]}.png"
        out = save_image(image, self.output_dir / name, pnginfo=info)
        return Result(out, label, parameters)
