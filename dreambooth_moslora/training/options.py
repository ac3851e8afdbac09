"""Command-line options of train_dreambooth.py.

Flag names follow diffusers' train_dreambooth_lora_sdxl.py wherever the feature is the same,
so an existing command line can be pasted. ``--config FILE`` (TOML or YAML) holds the same
options by name; flags given on the command line win. Every conflict is reported by argparse
as one line, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
import sys
import tempfile
from pathlib import Path

from ..adapter import LORA_INITS, MIXER_INITS, MIXER_MODES, AdapterConfig
from ..formats import FORMATS
from ..runtime import has_module
from ..errors import DataError
from ..single_file import SDXL_BASE_CONFIG
from .data import RESAMPLING
from .dataset_config import resolve_data
from .kohya_flags import kohya_hints
from .loss import LossSettings

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "regional")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_dreambooth.py",
        description="DreamBooth for Stable Diffusion XL with MoSLoRA adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML or YAML file of options (flags override it)")
    _add_model_and_data_options(p)
    _add_adapter_options(p)
    _add_optimisation_options(p)
    _add_output_options(p)
    return p


def _add_model_and_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path",
                   help="hub id or local folder of an SDXL model, or one .safetensors checkpoint file "
                        "(Pony, NoobAI, …)")
    g.add_argument("--pretrained_vae_model_name_or_path", help="a separate VAE (e.g. an fp16-safe one)")
    g.add_argument("--base_config", default=SDXL_BASE_CONFIG,
                   help="with a single-file base (.safetensors): the diffusers folder or hub id whose configs, "
                        "tokenizers and scheduler go with it (its weights, if any, are not used)")
    g.add_argument("--revision")
    g.add_argument("--variant", help="weight variant, e.g. fp16")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="what the base model predicts (default: its scheduler's config says)")
    g.add_argument("--rescale_betas_zero_snr", action="store_true", default=None,
                   help="zero terminal SNR, for v-prediction bases trained with it (default: the scheduler's config)")
    g.add_argument("--cache_dir", type=Path, help="where hub downloads (models, datasets) are kept")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", type=Path)
    g.add_argument("--dataset_name",
                   help="instead of --instance_data_dir: a folder of images with a metadata.jsonl or metadata.csv "
                        "(file_name and caption columns), or a dataset on the hub (needs the datasets package)")
    g.add_argument("--dataset_config_name", help="with --dataset_name: the dataset's config, if it has several")
    g.add_argument("--image_column", default="image", help="with --dataset_name: the column of the images")
    g.add_argument("--caption_column",
                   help="with --dataset_name: the column of the captions (default: --instance_prompt for all)")
    g.add_argument("--instance_prompt", help='e.g. "a photo of sks dog"')
    g.add_argument("--caption_extension", help="per-image caption files beside the images, e.g. .txt")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--class_data_dir", type=Path)
    g.add_argument("--class_prompt")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    g.add_argument("--class_inference_steps", type=int, default=50, help="denoising steps per generated class image")
    g.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"],
                   help="the dtype that draws class images (default: fp16 on a GPU, else fp32)")
    g.add_argument("--repeats", type=int, default=1, help="how many times each instance image counts in an epoch")
    g.add_argument("--train_data_dir", type=Path,
                   help="kohya's layout instead of --instance_data_dir: subfolders <repeats>_<prompt> (e.g. "
                        "'10_sks dog'), captions from .txt/.caption files beside the images, else the folder's prompt")
    g.add_argument("--reg_data_dir", type=Path,
                   help="class (regularisation) images in kohya's layout (e.g. '1_dog'): prior preservation on them")
    g.add_argument("--dataset_config", type=Path,
                   help="kohya's dataset TOML ([general], [[datasets]], [[datasets.subsets]]) instead of the folders")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="the share of draws that train on the empty caption (kohya's)")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle a caption's comma-separated tags each draw")
    g.add_argument("--keep_tokens", type=int, default=0, help="with --shuffle_caption: the first N tags stay in front")
    g.add_argument("--resolution", type=_resolution, default=1024,
                   help="side of a square image, or the area's side with buckets (kohya's 1024,1024 reads the same)")
    g.add_argument("--aspect_ratio_buckets", action="store_true", help="group images by aspect ratio")
    g.add_argument("--min_bucket_reso", type=int, help="with buckets: no side shorter (kohya's)")
    g.add_argument("--max_bucket_reso", type=int, help="with buckets: no side longer (kohya's)")
    g.add_argument("--bucket_reso_steps", type=int,
                   help="with buckets: sides are multiples of N (default 64; 8 below 512 px)")
    g.add_argument("--image_interpolation_mode", choices=tuple(RESAMPLING), default="lanczos",
                   help="the filter that resizes images to the training size")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int,
                   help="processes that read and crop images (default: up to 4 on a GPU when latents are not cached, "
                        "so the step never waits for them; else 0, the loop's own process)")
    g.add_argument("--cache_latents", action="store_true")
    g.add_argument("--mask_dir", type=Path,
                   help="masked loss: a grayscale mask per instance image, same file name (white counts)")
    g.add_argument("--alpha_mask", action="store_true",
                   help="masked loss: each instance image's alpha channel is its mask")
    g.add_argument("--masked_loss_background_weight", type=float, default=0.0,
                   help="the loss weight where a mask is black (0: the background does not count)")


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, help="default: the rank")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--mixer", choices=MIXER_MODES, default="learned")
    g.add_argument("--mixer_init", choices=MIXER_INITS, default="kaiming")
    g.add_argument("--lora_init", choices=LORA_INITS, default="gaussian",
                   help="A's init: gaussian (std 1/rank, as diffusers' scripts) or kaiming (uniform, as nn.Linear)")
    g.add_argument("--mixer_lr", type=float, help="the mixer's own learning rate (default: that of its group)")
    g.add_argument("--network_weights", type=Path,
                   help="kohya's: start from an adapter file (any of the three formats, or another tool's LoRA) with "
                        "the same rank; its ΔW exactly, whatever --mixer and --lora_alpha")
    g.add_argument("--train_text_encoder", action="store_true")
    g.add_argument("--use_dora", action="store_true", help=argparse.SUPPRESS)  # refused in one line: see validate
    g.add_argument("--train_text_encoder_ti", action="store_true",
                   help="pivotal tuning: learn new tokens for --token_abstraction in both text encoders")
    g.add_argument("--token_abstraction", default="TOK",
                   help="the word(s) in prompts and captions that new tokens replace (comma-separated for several)")
    g.add_argument("--num_new_tokens_per_abstraction", type=int, default=2)
    g.add_argument("--train_text_encoder_ti_frac", type=float, default=0.5,
                   help="the share of the steps the new tokens learn for (then they are frozen)")


def _add_optimisation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=_batch_size, default=4,
                   help="images per batch (per process), or auto: the largest that fits the memory budget")
    g.add_argument("--memory_budget_gib", type=float,
                   help="fit the run in N GiB: picks gradient checkpointing, --base_precision and (with "
                        "--train_batch_size auto) the batch, from measured figures, and prints the plan")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--text_encoder_lr", type=float, default=5e-6)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rates by batch × accumulation × processes")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--optimizer", type=str.lower, choices=["adamw", "prodigy"], default="adamw")
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--prodigy_beta3", type=float)
    g.add_argument("--prodigy_decouple", type=_bool, default=True)
    g.add_argument("--prodigy_use_bias_correction", type=_bool, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=_bool, default=True)
    g.add_argument("--adam_weight_decay", type=float, default=1e-4)
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, help="min-SNR weighting; 5.0 is the usual value")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    g.add_argument("--base_precision", choices=["auto", "bf16", "fp16", "fp8"], default="auto",
                   help="how the frozen UNet and text-encoder weights are stored: auto "
                        "(as --mixed_precision computes), "
                        "or lower, upcast layer by layer (fp8: e4m3 with a scale per output "
                        "channel, as kohya's --fp8_base)")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="accepted from diffusers' command lines: attention already runs through PyTorch's "
                        "scaled_dot_product_attention, whose kernels are memory-efficient")
    g.add_argument("--do_edm_style_training", action="store_true", help=argparse.SUPPRESS)  # refused in one line
    g.add_argument("--torch_compile", action="store_true", help="compile the UNet's step with torch.compile (inductor)")
    g.add_argument("--torch_compile_mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for the whole UNet (reduce-overhead: CUDA graphs), or regional: each "
                        "transformer block compiled once (quicker to compile)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--use_ema", action="store_true",
                   help="keep an exponential moving average of the adapter's weights and save it as the adapter "
                        "(the live weights beside it as *_live.safetensors)")
    g.add_argument("--ema_decay", type=float, default=0.995,
                   help="the EMA's decay per optimizer step (SimpleTuner's default)")
    g.add_argument("--ema_warmup", action="store_true", help="the EMA's decay ramps up as 1 - (1 + step)^(-2/3)")
    g.add_argument("--ema_cpu", action="store_true",
                   help="keep the EMA in host memory (each step then waits for the GPU)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=Path, default=Path("moslora-dreambooth-model"))
    g.add_argument("--output_formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    g.add_argument("--output_kohya_format", action="store_true",
                   help="diffusers' flag: write the kohya file too (written by default here)")
    g.add_argument("--push_to_hub", action="store_true",
                   help="upload --output_dir's files to a model repository on the hub at the end (created at the "
                        "start, so a missing login fails before training)")
    g.add_argument("--hub_model_id", help="with --push_to_hub: the repository (default: --output_dir's name)")
    g.add_argument("--hub_token", help="with --push_to_hub: a token (default: the login's)")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int)
    g.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest"')
    g.add_argument("--validation_prompt")
    g.add_argument("--sample_prompts", type=Path,
                   help="kohya's: a text file of validation prompts, one a line (a row of images each: one per "
                        "subject); instead of --validation_prompt")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=50)
    g.add_argument("--validation_steps", type=int,
                   help="validation images every N steps instead of every --validation_epochs")
    g.add_argument("--num_validation_inference_steps", type=int, default=25)
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--logging_dir", type=Path, default=Path("logs"))
    g.add_argument("--logging_steps", type=int, default=10,
                   help="read the loss every N steps (loss.csv, trackers, the NaN check): "
                        "reading it makes the host wait "
                        "for the GPU, so not every step")
    g.add_argument("--profile_steps", type=int, default=0,
                   help="profile N steps after the first two: profile.json (ops, syncs, "
                        "kernels, GPU busy share per step) "
                        "and profile-trace.json in --output_dir")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def _batch_size(text) -> int | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _resolution(text) -> int:
    """A side in pixels; sd-scripts' "width,height" is taken when square (buckets give the other shapes)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels, e.g. 1024, got {text!r}") from None
    if len(sides) > 2 or len(set(sides)) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not square: give one side, with --aspect_ratio_buckets for "
                                         "images of other shapes")
    return sides[0]


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def read_config_file(path: Path) -> dict:
    """Options from a TOML or YAML file, as a flat dict of option names."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError("the config file must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError("the config file must hold a table of option names and values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        try:
            values = read_config_file(first.config)
        except Exception as exc:  # bad syntax, missing file, no YAML library …
            parser.error(f"cannot read --config {first.config}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        known = {a.dest: a for a in parser._actions}
        unknown = sorted(set(values) - set(known) - {"config"})
        if unknown:
            parser.error(f"unknown option(s) in {first.config}: {', '.join(unknown)}"
                         f"{kohya_hints([f'--{name}' for name in unknown])}")
        # The file's values become defaults, so anything given on the command line overrides them.
        converted = {}
        for key, value in values.items():
            action = known.get(key)
            if action is None:
                continue
            if action.type is not None and value is not None and not isinstance(value, list):
                try:
                    value = action.type(value) if not isinstance(value, bool) or action.type is _bool else value
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    parser.error(f"{first.config}: bad value for {key}: {exc}")
            if action.choices is not None:
                for item in value if isinstance(value, list) else [value]:
                    if item not in action.choices:
                        parser.error(f"{first.config}: {key} must be one of "
                                     f"{', '.join(map(str, action.choices))}, got {item!r}")
            converted[key] = value
        parser.set_defaults(**converted)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{kohya_hints(unknown)}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    given = given_options(argv) | (set(values) if first.config is not None else set())
    try:
        resolve_data(args, given)
    except DataError as exc:
        parser.error(str(exc))
    validate(args, parser)
    return args


def given_options(argv: list[str]) -> set[str]:
    """The options the command line itself gives (not their defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model, so a bad command fails at once with one line."""
    if not args.pretrained_model_name_or_path:
        parser.error("--pretrained_model_name_or_path is required")
    check_diffusers_flags(args, parser)
    if args.with_prior_preservation and not args.reg_subsets:
        if not args.class_prompts:
            parser.error("--with_prior_preservation needs --class_prompt")
        if args.class_data_dir is None:
            args.class_data_dir = args.output_dir / "class_images"
        if args.num_class_images < 1:
            parser.error("--num_class_images must be at least 1")
    elif args.class_prompt or args.class_data_dir:
        print("warning: --class_prompt/--class_data_dir are ignored without --with_prior_preservation", file=sys.stderr)
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.memory_budget_gib is not None and args.memory_budget_gib <= 0:
        parser.error(f"--memory_budget_gib must be positive, got {args.memory_budget_gib:g}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay:g}")
    if not 0 <= args.caption_dropout_rate <= 1 or args.keep_tokens < 0:
        parser.error("--caption_dropout_rate must be in [0, 1] and --keep_tokens at least 0")
    numbers = ("train_batch_size",) if args.train_batch_size != "auto" else ()
    optional = [n for n in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps") if getattr(args, n) is not None]
    for name in ("rank", *numbers, "repeats", *optional, "num_train_epochs", "gradient_accumulation_steps",
                 "sample_batch_size", "class_inference_steps", "checkpointing_steps", "num_validation_images",
                 "validation_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.rescale_betas_zero_snr and args.prediction_type == "epsilon":
        parser.error("--rescale_betas_zero_snr needs --prediction_type v_prediction: at zero terminal SNR the last "
                     "timestep holds no signal to predict the noise from")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error("--dataloader_num_workers cannot be negative")
    if args.logging_steps < 1 or args.profile_steps < 0:
        parser.error("--logging_steps must be at least 1 and --profile_steps at least 0")
    for name in ("max_train_steps", "validation_steps"):  # optional: unset is fine
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.train_text_encoder_ti_frac <= 1.0 or args.num_new_tokens_per_abstraction < 1:
        parser.error("--train_text_encoder_ti_frac must be in [0, 1] and --num_new_tokens_per_abstraction at least 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be at least 1")
    if args.lora_alpha <= 0:
        parser.error(f"--lora_alpha must be positive, got {args.lora_alpha:g}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.learning_rate <= 0 or args.text_encoder_lr <= 0 or (args.mixer_lr is not None and args.mixer_lr <= 0):
        parser.error("learning rates must be positive")
    if args.mixer_lr is not None and args.mixer != "learned":
        print(f"warning: --mixer_lr is ignored with --mixer {args.mixer} (no mixer is trained)", file=sys.stderr)
    if args.prior_loss_weight < 0 or args.noise_offset < 0:
        parser.error("--prior_loss_weight and --noise_offset cannot be negative")
    if args.network_weights is not None and not args.network_weights.is_file():
        parser.error(f"--network_weights {args.network_weights} is not a file")
    if args.mask_dir is not None and not args.mask_dir.is_dir():
        parser.error(f"--mask_dir {args.mask_dir} does not exist or is not a folder")
    if args.mask_dir is not None and args.alpha_mask:
        parser.error("--mask_dir and --alpha_mask both give masks: choose one")
    if not 0 <= args.masked_loss_background_weight <= 1:
        parser.error(f"--masked_loss_background_weight must be in [0, 1], got {args.masked_loss_background_weight:g}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        parser.error("--snr_gamma must be positive")
    if args.use_8bit_adam and args.optimizer != "adamw":
        parser.error("--use_8bit_adam goes with --optimizer adamw")
    if args.cache_latents and args.random_flip:
        print("warning: with --cache_latents each image is encoded once, so --random_flip flips it once",
              file=sys.stderr)
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        parser.error(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}")
    args.validation_prompts = [args.validation_prompt] if args.validation_prompt else []
    if args.sample_prompts is not None:
        if args.validation_prompt:
            parser.error("--sample_prompts and --validation_prompt both give validation prompts: choose one")
        args.validation_prompts = read_sample_prompts(args.sample_prompts, parser)
        args.validation_prompt = args.validation_prompts[0]  # the one the model card and the web demo suggest
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder (or use 'latest')")
    _check_writable(args.output_dir, parser)


def check_diffusers_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """diffusers' flags that differ here: refused in one line where the feature is not this trainer's, noted where
    it is already on."""
    if args.use_dora:
        parser.error("--use_dora: DoRA is another adapter (a learned magnitude per weight column) that does not fold "
                     "into a plain LoRA; this trainer trains MoSLoRA (--mixer learned) or plain LoRA (--mixer none)")
    if args.do_edm_style_training:
        parser.error("--do_edm_style_training is not supported: this trainer trains DDPM-scheduled SDXL bases "
                     "(epsilon or v-prediction), not EDM ones such as Playground v2.5")
    if args.enable_xformers_memory_efficient_attention:
        print("note: --enable_xformers_memory_efficient_attention: attention already runs through PyTorch's "
              "scaled_dot_product_attention, with its memory-efficient kernels; nothing to switch on", file=sys.stderr)
    if args.output_kohya_format and "kohya" not in args.output_formats:
        args.output_formats = [*args.output_formats, "kohya"]
    if args.push_to_hub and args.hub_token and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to wandb would log the token with the run's settings: log in with "
                     "`hf auth login` instead of passing --hub_token")
    if args.report_to == "wandb" and not has_module("wandb"):  # as there: not a run that silently logs nothing
        parser.error("--report_to wandb needs the wandb package: pip install wandb (or --report_to tensorboard)")
    if (args.hub_model_id or args.hub_token) and not args.push_to_hub:
        print("warning: --hub_model_id/--hub_token are ignored without --push_to_hub", file=sys.stderr)
    for name in ("dataset_config_name", "caption_column"):
        if getattr(args, name) and not args.dataset_name:
            parser.error(f"--{name} goes with --dataset_name")


def read_sample_prompts(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """kohya's prompt file: a prompt a line, ``#`` comments and blank lines passed over. sd-scripts' per-line
    options (`` --n negative``, ``--w``, ``--d`` …) are cut off with a warning: the validation settings hold for all."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--sample_prompts {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})")
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    cut = [p for p in prompts if " --" in f" {p}"]
    if cut:
        print(f"warning: --sample_prompts {path}: per-prompt options (--n, --w, --d, ...) are not read here; "
              "the validation flags hold for every prompt", file=sys.stderr)
    prompts = [f" {p}".split(" --", 1)[0].strip() for p in prompts]
    if not all(prompts) or not prompts:
        parser.error(f"--sample_prompts {path} holds no prompt")
    return prompts


def _check_writable(directory: Path, parser: argparse.ArgumentParser) -> None:
    """Fails now, not after hours of training, when the outputs could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        parser.error(f"--output_dir {directory} is not writable ({exc.strerror or exc})")


def settings_for_metadata(args: argparse.Namespace) -> dict:
    """The training settings as plain JSON values, for the adapter files and the model card."""
    def plain(value):
        if isinstance(value, list):
            return [v.to_json() if hasattr(v, "to_json") else plain(v) for v in value]
        return str(value) if isinstance(value, os.PathLike) else value

    secret = ("local_rank", "hub_token")  # a token never goes into a file or a tracker
    return {k: plain(v) for k, v in sorted(vars(args).items()) if k not in secret}


# ---------------------------------------------------------------- the options as the values each phase takes


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    return AdapterConfig(rank=args.rank, alpha=args.lora_alpha, mixer=args.mixer, mixer_init=args.mixer_init,
                         dropout=args.lora_dropout, lora_init=args.lora_init)


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop reads of the options."""

    batch_size: int
    accumulation: int
    seed: int
    max_grad_norm: float
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_epochs: int
    validation_steps: int | None
    dataloader_workers: int
    loss: LossSettings
    logging_steps: int = 10


def loop_settings(args: argparse.Namespace) -> LoopSettings:
    return LoopSettings(args.train_batch_size, args.gradient_accumulation_steps, args.seed, args.max_grad_norm,
                        args.checkpointing_steps, args.checkpoints_total_limit, args.validation_epochs,
                        args.validation_steps, dataloader_workers(args), loss_settings(args),
                        args.logging_steps)


def dataloader_workers(args: argparse.Namespace, cuda: bool | None = None) -> int:
    """--dataloader_num_workers, or by default: with a GPU and latents not cached, images are decoded and resized
    in worker processes (half the cores, at most 4), off the thread that queues the GPU's work; else in the loop."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return max(1, min(4, (os.cpu_count() or 2) // 2)) if cuda and not args.cache_latents else 0


def loss_settings(args: argparse.Namespace) -> LossSettings:
    return LossSettings(prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
                        noise_offset=args.noise_offset,
                        masked_loss_background_weight=args.masked_loss_background_weight)


def param_groups(args: argparse.Namespace, params: dict[str, list], processes: int,
                 mixers: set[int] = frozenset()) -> list[dict]:
    """The UNet's adapter at --learning_rate, the text encoders' at --text_encoder_lr (× batch with --scale_lr);
    with --mixer_lr the mixers of each (``mixers``: their ids) in a group of their own at that rate (same weight
    decay)."""
    factor = args.train_batch_size * args.gradient_accumulation_steps * processes if args.scale_lr else 1
    wanted = [(params["unet"], args.learning_rate, args.adam_weight_decay)]
    if "text_encoder" in params:
        wanted.append((params["text_encoder"] + params["text_encoder_2"], args.text_encoder_lr,
                       args.adam_weight_decay_text_encoder))
    if "token_rows" in params:  # pivotal tuning's new tokens: last, so that their rate can stop on its own
        wanted.append((params["token_rows"], args.text_encoder_lr, args.adam_weight_decay_text_encoder))
    groups = []
    for group_params, lr, decay in wanted:
        own = [p for p in group_params if id(p) in mixers] if args.mixer_lr is not None else []
        groups.append({"params": [p for p in group_params if id(p) not in {id(m) for m in own}], "lr": lr * factor,
                       "weight_decay": decay})
        if own:
            groups.append({"params": own, "lr": args.mixer_lr * factor, "weight_decay": decay})
    return groups


def optimizer_options(args: argparse.Namespace) -> dict:
    """``make_optimizer``'s keyword arguments."""
    prodigy = dict(beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                   use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup)
    return dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam,
                prodigy=prodigy)
