"""The run and the hub: where downloads are kept (``--cache_dir``), and ``--push_to_hub``, the run's files in a
model repository there, as diffusers' script puts them.

The repository is created (or found) before anything trains, so a missing login or a name that is not the user's
fails in one line at once; the files go up after the last one is written. Checkpoints, class images, logs and the
exported dataset images stay local.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import TrainingError
from .hf_dataset import EXPORT_FOLDER

logger = logging.getLogger("dreambooth_moslora")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def start_hub(args, main: bool) -> str | None:
    """Sets --cache_dir; with --push_to_hub, on the main process, creates the repository and returns its id."""
    use_hub_cache(args.cache_dir)
    return create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token) if args.push_to_hub and main else None


def use_hub_cache(folder: Path | None) -> None:
    """--cache_dir: where hub downloads are kept. diffusers, transformers and huggingface_hub all read the hub's
    cache setting when they download, so setting it once stands for passing cache_dir to every load."""
    if folder is None:
        return
    import huggingface_hub.constants

    os.environ["HF_HUB_CACHE"] = str(folder)
    huggingface_hub.constants.HF_HUB_CACHE = str(folder)


def create_hub_repo(repo_id: str | None, output_dir: Path, token: str | None) -> str:
    """The repository's full id (``user/name``): --hub_model_id, or --output_dir's name under the login's user."""
    from huggingface_hub import create_repo

    name = repo_id or Path(output_dir).resolve().name
    try:
        return create_repo(name, exist_ok=True, token=token).repo_id
    except Exception as exc:  # offline, no login, not allowed, bad name: the hub library raises many kinds
        raise TrainingError(f"--push_to_hub: cannot create the model repository {name!r} ({_first_line(exc)}): "
                            "check the network and the login (`hf auth login`, or --hub_token)") from None


def ignored(output_dir: Path, class_data_dir: Path | None, logging_dir: Path) -> list[str]:
    """What stays local: checkpoints, the exported dataset images, and the class images and logs when they lie
    in the output folder."""
    patterns = ["checkpoint-*", "checkpoint-*/**", f"{EXPORT_FOLDER}/**", ".*", "*.partial"]
    for folder in (class_data_dir, output_dir / logging_dir):
        if folder is not None and Path(folder).resolve().is_relative_to(output_dir.resolve()):
            patterns.append(f"{Path(folder).resolve().relative_to(output_dir.resolve()).as_posix()}/**")
    return patterns


def push_outputs(repo_id: str, output_dir: Path, token: str | None, ignore_patterns: list[str]) -> None:
    from huggingface_hub import upload_folder

    try:
        commit = upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="End of training",
                               ignore_patterns=ignore_patterns, token=token)
    except Exception as exc:
        raise TrainingError(f"--push_to_hub: the upload to {repo_id} failed ({_first_line(exc)}); the files are "
                            f"all in {output_dir}") from None
    logger.info("pushed to %s", getattr(commit, "commit_url", repo_id))
