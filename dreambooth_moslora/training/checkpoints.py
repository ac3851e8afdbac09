"""Checkpoints: accelerate's save_state holding only the adapter, written whole or not at all.

A checkpoint is made in a hidden temporary folder and renamed into place when every process has
written its part, so a folder named ``checkpoint-N`` is always complete. Old checkpoints are
renamed out of the way before they are deleted (``safe_files.remove_path``): a kill during the
rotation leaves a hidden leftover, never half a checkpoint under its real name. Leftovers of killed
runs are cleaned, with a warning, when a run starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import TrainingError
from ..formats import NATIVE_FILE, save_adapter
from ..inference import restore_adapter_weights
from ..safe_files import DELETING_SUFFIX, OLD_SUFFIX, PARTIAL_SUFFIX, remove_path, replace_path, temporary_sibling

logger = logging.getLogger("dreambooth_moslora")
EMBEDDINGS_FILE = "embeddings.safetensors"  # pivotal tuning's rows, in a checkpoint


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name ends in (``checkpoint-500`` → 500), or None."""
    number = Path(path).name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None


def checkpoint_dirs(output_dir: Path, complete: bool = True) -> list[Path]:
    """The checkpoints of a run, oldest first: the complete ones (holding the adapter), or the incomplete ones."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted((p for p in found if (p / NATIVE_FILE).is_file() == complete), key=checkpoint_step)


def clean_leftovers(output_dir: Path) -> list[str]:
    """Removes what killed runs left behind (unfinished checkpoints and files, half-deleted folders)."""
    leftovers = [
        p for p in Path(output_dir).glob(".*")
        if p.name.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX, OLD_SUFFIX))
    ]
    for path in leftovers:
        remove_path(path)
    if leftovers:
        logger.warning("removed %d leftover(s) of an interrupted run in %s: %s", len(leftovers), output_dir,
                       ", ".join(sorted(p.name for p in leftovers)))
    return [p.name for p in leftovers]


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """accelerate's save_state into a temporary folder renamed when complete; then the oldest rotate out."""
    final = output_dir / f"checkpoint-{step}"
    tmp = temporary_sibling(final)
    if accelerator.is_main_process:
        remove_path(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its random states
    if accelerator.is_main_process:
        replace_path(tmp, final)
        if total_limit is not None:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                remove_path(old)
    accelerator.wait_for_everyone()
    return final


def register_adapter_hooks(accelerator, components: dict, base_model: str, pivotal=None, ema=None) -> None:
    """Checkpoints hold the adapter (one native file, the live weights), pivotal tuning's token rows and the EMA,
    not the frozen models."""

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            if pivotal is not None:  # before the adapter, which names it: load_adapter finds the tokens there
                pivotal.save(Path(folder) / EMBEDDINGS_FILE)
            tokens = {"new_tokens": pivotal.new.tokens, "embeddings_file": EMBEDDINGS_FILE} if pivotal else None
            save_adapter(folder, components, formats=["native"], base_model=base_model, training=tokens)
            if ema is not None:
                ema.save(folder)
        weights.clear()

    def load_hook(models, folder):
        models.clear()
        restore_adapter_weights(components, Path(folder) / NATIVE_FILE)
        if pivotal is not None:
            pivotal.restore(Path(folder) / EMBEDDINGS_FILE)
        if ema is not None and not ema.restore(folder):
            logger.warning("%s holds no EMA of the adapter: the average starts from the weights it holds", folder)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume(accelerator, output_dir: Path, resume_from: str | None) -> int:
    """Loads a checkpoint (a folder, or "latest") into the prepared objects; returns its step (0 for none).

    The adapter, optimizer, scheduler and random states come from accelerate; the data order and the
    noise are functions of (seed, step), so they continue by themselves.
    """
    if not resume_from:
        return 0
    if resume_from == "latest":
        incomplete = checkpoint_dirs(output_dir, complete=False)
        if incomplete:
            logger.warning("ignoring %d incomplete checkpoint folder(s) (no %s in them): %s", len(incomplete),
                           NATIVE_FILE, ", ".join(p.name for p in incomplete))
        found = checkpoint_dirs(output_dir)
        if not found:
            logger.info("no checkpoint in %s: starting a new run", output_dir)
            return 0
        path = found[-1]
    else:
        path = Path(resume_from)
    if not (path / NATIVE_FILE).is_file():
        raise TrainingError(f"{path} is not a complete checkpoint (it has no {NATIVE_FILE})")
    accelerator.load_state(str(path))
    step = checkpoint_step(path) or 0
    logger.info("resumed from %s at step %d", path, step)
    return step
