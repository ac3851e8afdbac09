"""Stopping a run on request, with a checkpoint to resume from.

SIGTERM is what ``kill``, job schedulers and the web demo's Stop button send. During the training
loop it is honoured at the end of the current optimizer step: a checkpoint of that step is written
(unless one was just written) and the run ends, to be continued with ``--resume_from_checkpoint
latest``. Before the loop (loading, generating class images) there is nothing to keep but what is
already on disk, which is written atomically, so the run ends at once. Ctrl-C (SIGINT) keeps its
usual meaning: stop now, keep the last checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

logger = logging.getLogger("dreambooth_moslora")
EXIT_CODE = 143  # what a shell reports for a process ended by SIGTERM


class RunStopped(BaseException):
    """The run ended because it was asked to; ``step`` is the checkpointed step (None: before training began).
    Like KeyboardInterrupt, not an Exception: no ``except Exception`` on the way may swallow it."""

    def __init__(self, step: int | None):
        self.step = step
        if step is None:
            message = "stopped before training began: nothing to resume (class images already written are kept)"
        else:
            message = (f"stopped at step {step}: checkpoint-{step} holds the run; continue it with "
                       "--resume_from_checkpoint latest")
        super().__init__(message)


class _State:
    in_loop = False
    requested = False


_state = _State()


def install() -> None:
    """Makes SIGTERM a stop request (from the main thread only, as Python's signal module requires)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    if not _state.in_loop:
        raise RunStopped(None)
    if not _state.requested:
        logger.warning("stop requested: finishing this step, then writing a checkpoint")
    _state.requested = True


def loop_begins() -> None:
    """From now on a stop request waits for the end of a step."""
    _state.in_loop, _state.requested = True, False


def loop_ends() -> None:
    _state.in_loop = False


def stop_requested(accelerator) -> bool:
    """Whether any process was asked to stop (all processes agree, so they stop at the same step)."""
    if accelerator.num_processes == 1:
        return _state.requested
    flag = torch.tensor([1.0 if _state.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
