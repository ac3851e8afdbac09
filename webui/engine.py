"""What the web demo does, without the web: the adapters on disk, one cached pipeline, generation.

The Gradio page (app.py) is a thin layer over this, so the behaviour is tested here directly.
Only files under the configured folder can be loaded, whatever name a request sends.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth_moslora.errors import AdapterError, AdapterFileError, RequestError
from dreambooth_moslora.formats import summarize
from dreambooth_moslora.inference import load_adapter, set_scale, unload_adapter
from dreambooth_moslora.safe_files import save_image, sha256_of

SCHEDULERS = ("Euler", "Euler a", "DPM++ 2M", "DDIM")
MIN_SIDE, MAX_SIDE = 32, 2048  # 32: the toy world the offline demo uses
MAX_IMAGES = 4


@dataclass
class AdapterEntry:
    id: str  # the path below the adapters folder, with forward slashes: what the page and the API send
    path: Path
    format: str | None = None
    info: dict = field(default_factory=dict)
    error: str | None = None  # why the file cannot be used, for files listed as unreadable

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
    except AdapterFileError as exc:
        entry.error = str(exc).split(": ", 1)[-1]
        return entry
    if summary is None:
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
        if not path.resolve().is_relative_to(root):
            entries.append(AdapterEntry(path.relative_to(root).as_posix(), path, error="links outside the adapters folder"))
            continue
        entry = describe(path, root)
        if entry is not None:
            entries.append(entry)
    return entries


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


class Engine:
    def __init__(self, adapters_dir: str | os.PathLike, base_model: str | None = None, demo_model: str | None = None,
                 device: str | None = None, output_dir: str | os.PathLike | None = None):  # fmt: skip
        self.root = Path(adapters_dir).resolve()
        if not self.root.is_dir():
            raise RequestError(f"adapters folder {adapters_dir} does not exist")
        self.default_base = base_model
        self.demo_model = demo_model  # used when no other base model is given or found
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="moslora-webui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one generation at a time on the one pipeline
        self._pipe = None
        self._pipe_id: str | None = None
        self._scheduler_config = None
        self._loaded: tuple | None = None  # (path, mtime) of the adapter now in the pipeline
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

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = file_hash(path)
        return self._hashes[key]

    # ---- the pipeline

    def base_for(self, request: Request, entries: list[AdapterEntry]) -> str:
        """The base model: the request's, else the first adapter's recorded base (when it can be found), else the default."""
        if request.base_model and request.base_model.strip():
            return request.base_model.strip()
        for entry in entries:
            recorded = entry.info.get("base_model")
            if recorded and (Path(recorded).is_dir() or not self.demo_model):
                return recorded
        if self.default_base:
            return self.default_base
        if self.demo_model:
            return self.demo_model
        raise RequestError("no base model: give one, or pick an adapter that records its base model")

    def pipeline(self, model_id: str):
        """The pipeline for a base model, kept between requests: switching adapters or scale does not reload it."""
        if self._pipe_id != model_id:
            from diffusers import StableDiffusionXLPipeline

            self._pipe = None  # free the old one first
            try:
                pipe = StableDiffusionXLPipeline.from_pretrained(model_id, torch_dtype=self.dtype)
            except Exception as exc:  # a hub id while offline, a wrong folder …
                raise RequestError(f"cannot load base model {model_id!r}: {str(exc).splitlines()[0][:200]}") from None
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._pipe_id, self._loaded = pipe, model_id, None
            self._scheduler_config = dict(pipe.scheduler.config)
        return self._pipe

    def _use_scheduler(self, pipe, name: str) -> None:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

        classes = {"Euler": EulerDiscreteScheduler, "Euler a": EulerAncestralDiscreteScheduler,
                   "DPM++ 2M": DPMSolverMultistepScheduler, "DDIM": DDIMScheduler}  # fmt: skip
        if name not in classes:
            raise RequestError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
        pipe.scheduler = classes[name].from_config(self._scheduler_config)

    def _use_adapter(self, pipe, path: Path | None, scale: float) -> None:
        """Puts the adapter in the pipeline (live, so that taking it out restores the base exactly)."""
        key = None if path is None else (str(path), path.stat().st_mtime_ns)
        if key != self._loaded:
            unload_adapter(pipe)
            self._loaded = None
            if path is not None:
                try:
                    load_adapter(pipe, path, scale=scale)
                except AdapterError as exc:
                    raise RequestError(str(exc)) from None
                self._loaded = key
        elif path is not None:
            set_scale(pipe, scale)

    # ---- generation

    def check(self, r: Request) -> Request:
        if not r.prompt or not r.prompt.strip():
            raise RequestError("the prompt is empty")
        if not 1 <= int(r.steps) <= 150:
            raise RequestError("steps must be between 1 and 150")
        if not 0 <= float(r.guidance) <= 30:
            raise RequestError("guidance must be between 0 and 30")
        for side in (r.width, r.height):
            if not MIN_SIDE <= int(side) <= MAX_SIDE or int(side) % 8:
                raise RequestError(f"width and height must be multiples of 8 between {MIN_SIDE} and {MAX_SIDE}")
        if not 1 <= int(r.num_images) <= MAX_IMAGES:
            raise RequestError(f"between 1 and {MAX_IMAGES} images")
        if not 0 <= float(r.scale) <= 1.5:
            raise RequestError("the adapter scale must be between 0 and 1.5")
        if len(r.adapters) > 1 and not r.compare:
            raise RequestError("several adapters at once only in compare mode")
        if r.scheduler not in SCHEDULERS:
            raise RequestError(f"unknown scheduler {r.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        return r

    def generate(self, r: Request, progress=None) -> list[Result]:
        """Renders the request; in compare mode the base model first, then each adapter, with the same seeds."""
        self.check(r)
        entries = [self.entry(a) for a in r.adapters]  # refuses a bad name before any work
        paths = [e.path for e in entries]
        seed = random.randrange(2**31) if int(r.seed) < 0 else int(r.seed)
        variants: list[AdapterEntry | None] = ([None] if r.compare or not entries else []) + entries
        results: list[Result] = []
        total = len(variants) * int(r.steps) * int(r.num_images)
        done = 0
        with self.lock:
            model_id = self.base_for(r, entries)
            pipe = self.pipeline(model_id)
            self._use_scheduler(pipe, r.scheduler)
            try:
                for variant, path in zip(variants, [None] * (len(variants) - len(paths)) + paths):
                    self._use_adapter(pipe, path, float(r.scale))
                    for i in range(int(r.num_images)):

                        def on_step(pipeline, step, timestep, kwargs):
                            if progress is not None:
                                progress((done + step + 1) / total, desc=variant.id if variant else "base model")
                            return kwargs

                        image = pipe(
                            prompt=r.prompt, negative_prompt=r.negative_prompt or None, num_inference_steps=int(r.steps),
                            guidance_scale=float(r.guidance), width=int(r.width), height=int(r.height),
                            generator=torch.Generator("cpu").manual_seed(seed + i), callback_on_step_end=on_step,
                        ).images[0]  # fmt: skip
                        done += int(r.steps)
                        results.append(self._save(image, r, model_id, seed + i, variant, path))
            finally:
                self._use_adapter(pipe, None, 1.0)  # the base model again between requests
        return results

    def _save(self, image: Image.Image, r: Request, model_id: str, seed: int, variant, path) -> Result:
        parameters = {
            "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": seed, "steps": int(r.steps),
            "guidance": float(r.guidance), "width": int(r.width), "height": int(r.height), "scheduler": r.scheduler,
            "base_model": model_id, "adapter": variant.id if variant else None,
            "adapter_scale": float(r.scale) if variant else None, "adapter_sha256": self._hash(path) if path else None,
        }  # fmt: skip
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
