"""The web demo's API: the endpoints a script calls, one typed function each, over the engine and the trainer.

| endpoint | does | returns |
|---|---|---|
| `/adapters` | the adapter files under the folder, read fresh on every call | a list of {id, format, …, error} |
| `/generate` | images from the base model with at most one adapter | {images, labels, seeds, base_model, warnings} |
| `/compare` | the base model beside each of up to 4 adapters, the same seeds | as `/generate` |
| `/download` | an adapter file | the file |
| `/train` | starts a training run | {run_id, adapter_id} |
| `/train_status` | a run's state (the current or latest one) | {state, step, …, samples, adapter_id} |
| `/train_stop` | asks the running trainer to stop after its step, with a checkpoint | {run_id, state} |
| `/train_resume` | continues a stopped or failed run from its last checkpoint | {run_id, state} |

Every parameter but a prompt has a default; files come back as Gradio file data (copies in the server's output
folder, the one folder it serves), so ``gradio_client`` downloads them. A bad value is one line (``gr.Error``),
never a traceback. The page's own events are private: ``view_api()`` shows this table and nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData
from gradio.processing_utils import get_upload_folder
from gradio.utils import is_in_or_equal

from dreambooth_moslora.errors import RequestError
from dreambooth_moslora.formats import LOADED_BY, NATIVE_FILE
from dreambooth_moslora.safe_files import atomic_path

from .engine import Engine, Request
from .presets import ADJUSTABLE
from .run_folder import RunStatus
from .training import Trainer, TrainRequest

ENDPOINTS = ("adapters", "generate", "compare", "download", "train", "train_status", "train_stop", "train_resume")
PIPELINE = "pipeline"  # the concurrency group of everything that runs the one pipeline: one request at a time


def refused(exc: Exception) -> gr.Error:
    """A refusal as the client and the page see it: one line, and no traceback in the server's log."""
    return gr.Error(str(exc), print_exception=False)


def file_data(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def served_copy(path: Path, folder: Path) -> Path:
    """A copy of a file of a run under the output folder (which the server may serve), kept by content key."""
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
    copy = folder / "served" / key / path.name
    if not copy.is_file():
        with atomic_path(copy) as tmp:
            shutil.copyfile(path, tmp)
    return copy


def uploaded(files) -> list[str]:
    """The paths of files a client uploaded for this request; anything else (a path on the server) is refused."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        raise RequestError("images must be a list of uploaded files")
    paths = []
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
            raise RequestError("images must be files uploaded with the request (gradio_client's handle_file)")
        paths.append(path)
    return paths


class Api:
    """The documented endpoints of one server (``register`` inside its open gr.Blocks)."""

    def __init__(self, engine: Engine, trainer: Trainer | None, default_size: int):
        self.engine, self.trainer, self.default_size = engine, trainer, default_size

    def register(self) -> None:
        gr.api(self.adapters, api_name="adapters", concurrency_limit=None)
        gr.api(self.generate, api_name="generate", concurrency_id=PIPELINE, concurrency_limit=1)
        gr.api(self.compare, api_name="compare", concurrency_id=PIPELINE, concurrency_limit=1)
        gr.api(self.download, api_name="download", concurrency_limit=None)
        if self.trainer is not None:
            gr.api(self.train, api_name="train", concurrency_limit=1)
            gr.api(self.train_status, api_name="train_status", concurrency_limit=None)
            gr.api(self.train_stop, api_name="train_stop", concurrency_limit=None)
            gr.api(self.train_resume, api_name="train_resume", concurrency_limit=1)

    # ---- adapters and generation

    def adapters(self) -> list[dict]:
        """The adapter files under the adapters folder, with what their headers record; unreadable ones with `error`."""
        listed = []
        for e in self.engine.adapters():
            listed.append({"id": e.id, "format": e.format, "loads_in": LOADED_BY.get(e.format) if e.format else None,
                           "suggested_prompt": e.suggested_prompt, "error": e.error, **e.info})
        return listed

    def generate(self, prompt: str, adapters: list[str] | None = None, negative_prompt: str = "", base_model: str = "",
                 steps: int = 25, guidance: float = 5.0, seed: int = -1, width: int | None = None,
                 height: int | None = None, num_images: int = 1, scheduler: str = "Euler",
                 scale: float = 1.0) -> dict:
        """Images of the prompt with at most one adapter (none: the base model; base_model empty: the adapter's
        recorded base when the server allows it, else the server's); seed -1 draws one; width and height default to
        the server's size."""
        return self._render(Request(
            prompt=prompt, negative_prompt=negative_prompt or "", adapters=adapters or [], compare=False,
            base_model=base_model or None, steps=steps, guidance=guidance, seed=seed, width=width or self.default_size,
            height=height or self.default_size, num_images=num_images, scheduler=scheduler, scale=scale,
        ))

    def compare(self, prompt: str, adapters: list[str] | None = None, negative_prompt: str = "", base_model: str = "",
                steps: int = 25, guidance: float = 5.0, seed: int = -1, width: int | None = None,
                height: int | None = None, num_images: int = 1, scheduler: str = "Euler",
                scale: float = 1.0) -> dict:
        """The base model, then each adapter (up to 4), from the same seeds."""
        return self._render(Request(
            prompt=prompt, negative_prompt=negative_prompt or "", adapters=adapters or [], compare=True,
            base_model=base_model or None, steps=steps, guidance=guidance, seed=seed, width=width or self.default_size,
            height=height or self.default_size, num_images=num_images, scheduler=scheduler, scale=scale,
        ))

    def _render(self, request: Request) -> dict:
        if isinstance(request.adapters, str):  # one id for a list of one: what a script means
            request.adapters = [request.adapters]
        results = generate(self.engine, request)
        warnings = dict.fromkeys(r.parameters["warning"] for r in results if r.parameters.get("warning"))
        return {"images": [file_data(r.path) for r in results], "labels": [r.label for r in results],
                "seeds": [r.parameters["seed"] for r in results], "base_model": results[0].parameters["base_model"],
                "warnings": list(warnings)}

    def download(self, adapter: str) -> FileData:
        """An adapter file, by its id (as `/adapters` lists it)."""
        try:
            return file_data(self.engine.download_copy(self.engine.entry(adapter)))
        except RequestError as exc:
            raise refused(exc) from None

    # ---- training

    def train(self, images: list[FileData] | None = None, instance_prompt: str = "", class_prompt: str = "",
              prior_preservation: bool = True, preset: str = "", base_model: str = "", sample_prompt: str = "",
              folder: str = "", captions: dict[str, str] | None = None, rank: int | None = None,
              lora_alpha: float | None = None, mixer: str | None = None, mixer_init: str | None = None,
              lora_init: str | None = None, learning_rate: float | None = None, text_encoder_lr: float | None = None,
              max_train_steps: int | None = None, train_text_encoder: bool | None = None, seed: int | None = None,
              validation_steps: int | None = None, num_class_images: int | None = None,
              alpha_mask: bool | None = None) -> dict:
        """Starts a run on uploaded images (a .txt of the same name is a caption; `captions` maps a file name to its
        caption) or on a folder under the server's data root. preset empty: the server's default; a setting left
        out (None) is the preset's."""
        settings = {name: value for name, value in locals().items() if name in ADJUSTABLE}
        try:
            request = TrainRequest(
                images=uploaded(images), folder=folder or None, captions=captions or {},
                instance_prompt=instance_prompt, class_prompt=class_prompt, prior_preservation=bool(prior_preservation),
                preset=preset or self.trainer.default_preset, base_model=base_model or None,
                sample_prompt=sample_prompt or "", settings=settings,
            )
            status = self.trainer.start(request)
        except RequestError as exc:
            raise refused(exc) from None
        return {"run_id": status.run_id, "adapter_id": f"{status.run_id}/{NATIVE_FILE}"}

    def train_status(self, run_id: str = "") -> dict:
        """step, max_steps, loss, steps_per_second, seconds_left, phase, state (idle, starting, running, stopping,
        done, stopped, failed), error, adapter_id once written, resumable, samples (validation grids as files)."""
        try:
            return self.status_dict(self.trainer.status(run_id or None))
        except RequestError as exc:
            raise refused(exc) from None

    def status_dict(self, s: RunStatus) -> dict:
        d = s.as_dict()
        out = self.engine.output_dir
        d["samples"] = [{"image": file_data(served_copy(p, out)), "step": step} for p, step in s.samples if p.is_file()]
        d["class_images"] = len(s.class_images)
        return d

    def train_stop(self) -> dict:
        """Asks the running trainer to stop after its current step (a checkpoint of that step is written)."""
        try:
            s = self.trainer.stop()
        except RequestError as exc:
            raise refused(exc) from None
        return {"run_id": s.run_id, "state": s.state}

    def train_resume(self, run_id: str) -> dict:
        """Continues a stopped or failed run from its last checkpoint, with the trainer's exact resume."""
        try:
            s = self.trainer.resume(run_id)
        except RequestError as exc:
            raise refused(exc) from None
        return {"run_id": s.run_id, "state": s.state}


def generate(engine: Engine, request: Request, progress=None) -> list:
    """The engine's images, its refusals and failures as one line (the page and the API both call this)."""
    try:
        return engine.generate(request, progress=progress)
    except RequestError as exc:
        raise refused(exc) from None
    except Exception as exc:  # a bug or an exhausted machine: one line for the client, the server goes on
        import logging

        logging.getLogger("webui").exception("generation failed")
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise gr.Error(f"generation failed: {type(exc).__name__}: {first}") from None
