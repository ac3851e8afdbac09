"""DreamBooth training with MoSLoRA adapters: ``train_dreambooth.py`` is ``training.main``.

    options      the command line (diffusers' flag names) and config files
    data         images read safely, captions, buckets, batches, cached latents, class images
    dataset_config  kohya's folders and dataset TOMLs as subsets of images, repeats, caption rules
    hf_dataset   --dataset_name: an imagefolder with a metadata file, or a dataset the datasets package loads
    ema          --use_ema: a moving average of the adapter's weights
    models       the frozen base model, the adapters put in, the optimizer
    loss         the denoising loss of a batch, with prior preservation
    checkpoints  whole-or-nothing checkpoints that hold the adapter; resume
    validation   sample images during and after training
    stopping     SIGTERM: stop at a step's end, with a checkpoint
    model_card   the README.md beside a trained adapter
    hub          --cache_dir; --push_to_hub: the repository made before training, the files uploaded after
    kohya_flags  sd-scripts' flag names, answered with what does their job here
    loop         the run, phase by phase
"""

from .loop import main, train
from .options import parse_args

__all__ = ["main", "parse_args", "train"]
