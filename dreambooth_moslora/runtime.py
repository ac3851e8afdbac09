"""What every command shares at run time: the one seed scheme, quiet libraries, freeing memory.

The seed scheme: every random draw that must come out the same in a resumed run, in another
process or with another batch size takes its own generator, seeded by a hash of where it is used (a
named stream) and its place (seed, epoch, index, …) — never the global random state.
"""

from __future__ import annotations

import hashlib
import importlib.util

import torch

# The named streams. Integers, as the first of them always were: the same numbers give the same draws.
CROP_AND_FLIP = (0, 1)  # (instance, class) examples: crops and flips, per (seed, epoch, stream, index)
BATCH_ORDER = -1  # the order of an epoch's batches, per (seed, epoch)
CLASS_IMAGE_NOISE = -2  # the starting noise of class image i, per (seed, i)
LOADER_WORKERS = -3  # the seeds a data loader hands its workers, per (epoch)
IMAGE_NOISE = -4  # the starting noise of generated image i (samples, evaluations), per (seed, i)
CAPTIONS = -5  # caption dropout and tag shuffling, per (seed, epoch, stream, 0 instance | 1 class, index)


def seed_from(*numbers: int) -> int:
    """A 63-bit seed that depends on all the numbers, the same in every process and Python version."""
    digest = hashlib.sha256(",".join(str(int(n)) for n in numbers).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def seeded_generator(*numbers: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed_from(*numbers))


def image_generators(seed: int, indices, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """The starting noise of generated images: image ``i`` always gets the same noise, whatever the batch."""
    return [seeded_generator(seed, IMAGE_NOISE, i, device=device) for i in indices]


def quiet_libraries() -> None:
    """Our progress bars and log lines, not every library's loading bars and notices."""
    import warnings

    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
