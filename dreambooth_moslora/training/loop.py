"""The DreamBooth training run, read top to bottom in ``train``: one phase a call, in the order they happen.

accelerate handles devices, mixed precision, processes and checkpoints; diffusers the models, the
noise schedule and the pipeline; the modules beside this one do one job each (options, data,
models, loss, checkpoints, validation, model card). This module only puts them in order.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..embeddings import NewTokens
from ..errors import MosloraError, TrainingError
from ..formats import save_adapter
from ..runtime import free_memory, has_module, quiet_libraries, seeded_generator
from ..safe_files import base_hashes
from ..sdxl import encode_prompts, tokenize
from ..surgery import mixer_parameters
from .checkpoints import clean_leftovers, register_adapter_hooks, resume, save_checkpoint
from .data import (DreamBoothDataset, StepPlan, batch_source, cache_latents, epoch_batches, generate_class_images,
                   process_batches, read_caption, scan_images)
from .dataset_config import Images, gather
from .ema import AdapterEMA
from .hub import ignored, push_outputs, start_hub
from .loss import StepModels, batch_loss
from .model_card import write_model_card
from .pivotal import Pivotal, embeddings_file
from .profiling import LOSS_READ, StepProfile
from .stopping import EXIT_CODE, RunStopped, install, loop_begins, loop_ends, stop_requested
from .memory_plan import Job, device_budget_gib, parameter_counts, plan
from ..single_file import is_single_file
from .models import (add_adapters, base_schedule, class_image_pipeline, load_base_model, load_vae, loading,
                     make_optimizer)
from .options import LoopSettings, adapter_config, loop_settings, optimizer_options, param_groups, settings_for_metadata
from .validation import set_adapter_training, validation_grid

logger = logging.getLogger("dreambooth_moslora")


def train(args) -> Path:
    output_dir = Path(args.output_dir)
    accelerator = start_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.report_to, output_dir,
                                    args.logging_dir, args.seed, args.allow_tf32)
    main, device = accelerator.is_main_process, accelerator.device
    if main:
        clean_leftovers(output_dir)
    repo_id = start_hub(args, main)  # --cache_dir; --push_to_hub's repository, made before anything trains
    base_id = (args.pretrained_model_name_or_path, args.revision, args.variant)
    schedule = base_schedule(args.pretrained_model_name_or_path, args.prediction_type, args.rescale_betas_zero_snr)

    # 1. Data first: a bad folder fails before any model is loaded. The subsets' images (repeated as each says), and
    #    the class images: the regularisation subsets', or those the base model draws for --class_prompt.
    instance = gather(args.subsets, warn=main)
    classes = gather(args.reg_subsets, warn=main) if args.reg_subsets else Images()
    if args.with_prior_preservation and not args.reg_subsets:
        classes = drawn_classes(args, accelerator, schedule)
    instance_images, class_images = instance.paths, classes.paths

    # 2. Models (fitted to memory first, when asked): frozen base, adapters in fp32, the optimizer over the adapters.
    fit_to_memory(args, accelerator, max(len(instance_images), len(class_images)), bool(class_images))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    base = load_base_model(*base_id, args.pretrained_vae_model_name_or_path, device, weight_dtype, args.base_precision,
                           schedule, args.base_config)
    components, params = add_adapters(base, adapter_config(args), args.train_text_encoder, args.seed,
                                      args.gradient_checkpointing, args.network_weights,
                                      args.torch_compile_mode if args.torch_compile else None)
    pivotal = Pivotal.start(args, base)  # --train_text_encoder_ti: new tokens, trained beside the adapter
    if pivotal:
        params["token_rows"] = pivotal.rows
    mixers = {id(p) for model in components.values() for p in mixer_parameters(model)}
    groups = param_groups(args, params, accelerator.num_processes, mixers)
    optimizer = make_optimizer(args.optimizer, groups, **optimizer_options(args))

    # 3. The dataset, and what is computed once: prompt embeddings while the text encoders are frozen,
    #    latents with --cache_latents (then the VAE is freed).
    dataset, prompt_cache, latent_cache, vae_config = prepare_data(args, base, instance, classes, device, pivotal)
    plan = StepPlan.make(len(epoch_batches(dataset, args.train_batch_size, 0, args.seed)), accelerator.num_processes,
                         args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)

    # 4. accelerate takes the trained models, optimizer and schedule; checkpoints hold the adapter; resume.
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, plan.max_steps,
                                     args.lr_num_cycles, args.lr_power, accelerator.num_processes)
    if pivotal:  # the rows' group is the last: it stops learning after --train_text_encoder_ti_frac of the steps
        pivotal.gate(lr_scheduler, len(groups) - 1, round(args.train_text_encoder_ti_frac * plan.max_steps)
                     * accelerator.num_processes)
    prepared = accelerator.prepare(*components.values(), optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[: len(components)]), prepared[-2], prepared[-1]
    ema = AdapterEMA([p for k, ps in params.items() if k != "token_rows" for p in ps], args.ema_decay, args.ema_warmup,
                     args.ema_cpu) if args.use_ema else None  # --use_ema: an average of the adapter's weights
    register_adapter_hooks(accelerator, components, args.pretrained_model_name_or_path, pivotal, ema)
    global_step = resume(accelerator, output_dir, args.resume_from_checkpoint)
    if main:
        tracked = {k: v for k, v in settings_for_metadata(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-moslora", config=tracked)
        logger.info("training %d step(s): %d instance image(s), %d class image(s), batch %d × "
                    "%d process(es) × %d accumulation",
                    plan.max_steps, len(instance_images), len(class_images), args.train_batch_size,
                    accelerator.num_processes, args.gradient_accumulation_steps)

    # 5. The loop.
    encoders = trained[1:] if args.train_text_encoder else base.text_encoders
    step_models = StepModels(trained[0], base.vae, vae_config, encoders, base.tokenizers, base.noise_scheduler,
                             prompt_cache, weight_dtype, device)
    run = Run(accelerator, trained, [p for ps in params.values() for p in ps], optimizer, lr_scheduler, step_models,
              components, StepProfile(args.profile_steps if main else 0, output_dir), ema)
    started = time.perf_counter()
    validate = validation_for(args, accelerator, run, base) if args.validation_prompt else None
    global_step, last_loss = train_steps(run, dataset, plan, global_step, latent_cache, loop_settings(args),
                                         output_dir, validate)

    # 6. Outputs, written by the main process alone.
    accelerator.wait_for_everyone()
    if main:
        settings = run_settings(args, plan.max_steps, base.noise_scheduler.config, last_loss, instance, classes)
        write_outputs(args, output_dir, components, settings, pivotal, ema, validate, repo_id)
        logger.info("done: %d steps in %.1f s, final loss %.4f; adapters in %s", global_step,
                    time.perf_counter() - started, last_loss, output_dir)
    end_processes(accelerator)
    return output_dir


def write_outputs(args, output_dir: Path, components: dict, settings: dict, pivotal, ema, validate,
                  repo_id: str | None) -> None:
    """The adapter files (with --use_ema the average's weights, the live ones beside them as ``*_live``), pivotal
    tuning's embeddings, the validation grid and the model card; then, with --push_to_hub, all of it to the hub."""
    embeddings = {"embeddings": pivotal.save(embeddings_file(output_dir))} if pivotal else {}  # read beside them

    def save(suffix: str = "") -> dict:
        return save_adapter(output_dir, components, formats=args.output_formats, training=settings, suffix=suffix,
                            base_model=args.pretrained_model_name_or_path,
                            embeddings=pivotal.as_embeddings() if pivotal else None) | embeddings

    if ema is not None:
        save("_live")
        with ema.swapped():
            files = save()
    else:
        files = save()
    grid = validate(output_dir / "validation.png") if validate else None
    write_model_card(output_dir, settings, files, grid)
    if repo_id:
        push_outputs(repo_id, output_dir, args.hub_token, ignored(output_dir, args.class_data_dir, args.logging_dir))


def run_settings(args, max_steps: int, schedule, last_loss: float, instance: Images, classes: Images) -> dict:
    """What the adapter files and the model card record of the run: the options as run, the noise schedule trained
    against (the model's own or the command line's), the final loss, the images (counted as kohya counts them:
    images × repeats, per folder, and their tags)."""
    settings = settings_for_metadata(args)
    hashes = base_hashes(args.pretrained_model_name_or_path)
    if hashes:  # what the files, the card and the web demo identify the base by
        settings.update(base_model_sha256=hashes["sha256"], base_model_autov2=hashes["sha256"][:10].upper())
        settings.update({"base_model_legacy_hash": hashes["legacy"]} if "legacy" in hashes else {})
    settings.update(max_train_steps=max_steps, prediction_type=schedule.prediction_type,
                    rescale_betas_zero_snr=bool(schedule.get("rescale_betas_zero_snr")), final_loss=last_loss,
                    num_train_images=len(instance.paths), num_class_images=len(classes.paths),
                    num_reg_images=len(classes.paths) if args.reg_subsets else 0,
                    dataset_dirs={**instance.folders, **classes.folders},
                    tag_frequency={**instance.tags, **classes.tags})
    new = NewTokens.plan(args.token_abstraction, args.num_new_tokens_per_abstraction) if args.train_text_encoder_ti \
        else None
    if not settings.get("instance_prompt"):  # kohya's folders and subsets: their prompts, each subject's once
        prompts = "; ".join(dict.fromkeys(s.class_tokens for s in args.subsets if s.class_tokens)) \
            or instance.captions[0]
        settings["instance_prompt"] = new.rewrite(prompts) if new else prompts
    subsets = args.subsets + args.reg_subsets  # one figure each, as sd-scripts records: the largest where they differ
    settings.update(caption_dropout_rate=max(s.caption_dropout_rate for s in subsets),
                    shuffle_caption=any(s.shuffle_caption for s in subsets),
                    keep_tokens=max(s.keep_tokens for s in subsets))
    if new:  # what the files' prompts now hold in place of the abstraction
        settings.update(new_tokens=new.tokens, embeddings_file=embeddings_file(Path(args.output_dir)).name)
    return settings


# ---------------------------------------------------------------- the phases before the loop


def start_accelerator(mixed_precision, accumulation: int, report_to: str, output_dir: Path, logging_dir, seed: int,
                      allow_tf32: bool):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    report_to = None if report_to == "none" else report_to
    if report_to == "tensorboard" and not has_module("tensorboard"):
        report_to = None  # tensorboard logs when it is installed, silently nothing otherwise
    accelerator = Accelerator(
        # On a machine without an accelerator, say so: under torchrun that selects gloo (multi-CPU).
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision, log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
    )
    level = logging.INFO if accelerator.is_main_process else logging.ERROR
    logging.basicConfig(format="%(levelname)s %(message)s", level=level)
    set_seed(seed)
    if allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def end_processes(accelerator) -> None:
    """Ends the trackers and, with several processes, the process group, together: left to the interpreter's exit,
    a process could wait forever in its gloo group's teardown for a peer that had already gone."""
    accelerator.end_training()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def progress_bars_wanted(main: bool) -> bool:
    """On the main process, unless tqdm's own TQDM_DISABLE says otherwise (an explicit disable= would override it)."""
    return main and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def drawn_classes(args, accelerator, schedule: dict) -> Images:
    """The class images the base model draws for each class prompt (one, or a subject's each: then in a folder of
    its own under --class_data_dir), made where too few are there, captioned with their prompt."""
    model = (args.pretrained_model_name_or_path, args.revision, args.variant, schedule, args.base_config,
             args.prior_generation_precision)
    classes = Images()
    for prompt in args.class_prompts:
        folder = args.class_data_dir if len(args.class_prompts) == 1 else args.class_data_dir / slug(prompt)
        paths = class_images_for_prior(accelerator, model, folder, prompt, args.num_class_images,
                                       args.sample_batch_size, args.seed, args.resolution, args.class_inference_steps)
        classes.paths += paths
        classes.captions += [read_caption(p, args.caption_extension, prompt) for p in paths]
    return classes


def slug(text: str) -> str:
    """A folder name for a prompt: "a photo of dog" → "a_photo_of_dog"."""
    return "_".join("".join(c if c.isalnum() else " " for c in text).split())[:80] or "class"


def class_images_for_prior(accelerator, model: tuple, class_dir: Path, prompt: str, count: int, batch_size: int,
                           seed: int, resolution: int, steps: int) -> list[Path]:
    """The class images, generated by the base model (on the main process) where the folder has too few; ``model``:
    (path, revision, variant, noise schedule overrides, configs of a single-file base, precision)."""
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        existing, _ = scan_images(class_dir, "class") if class_dir.is_dir() else ([], [])
        missing = count - len(existing)
        if missing > 0:
            logger.info("generating %d class image(s) of %r into %s", missing, prompt, class_dir)
            bar = tqdm(total=missing, desc="class images", disable=not progress_bars_wanted(True))
            try:
                generate_class_images(lambda: class_image_pipeline(*model[:3], accelerator.device, *model[3:]),
                                      class_dir, prompt, count, batch_size, seed, resolution, steps, progress=bar)
            finally:
                bar.close()  # before any message of a stop or an error, so that message is the last line
            free_memory()
    accelerator.wait_for_everyone()
    images, _ = scan_images(class_dir, "class")
    return images[:count]


def fit_to_memory(args, accelerator, examples: int, prior: bool) -> None:
    """With --memory_budget_gib or --train_batch_size auto, settles --train_batch_size, --gradient_checkpointing and
    --base_precision (in ``args``) by the memory plan: what the command line fixed stays; with a budget the planner
    may turn checkpointing on and store the base in fp8."""
    if args.memory_budget_gib is None and args.train_batch_size != "auto":
        return
    budget = args.memory_budget_gib or device_budget_gib(accelerator.device)
    compute = {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision, "fp32")
    with loading(f"the configs of {args.pretrained_model_name_or_path!r}"):
        model = args.pretrained_model_name_or_path
        layout = args.base_config if is_single_file(model) else model
        counts = parameter_counts(layout, adapter_config(args), args.train_text_encoder)
    job = Job(counts["unet"], counts["text_encoders"], counts["vae"], counts["adapter"], args.resolution, compute,
              2 if prior else 1, args.train_text_encoder, args.cache_latents)
    free = args.memory_budget_gib is not None  # without a budget, auto chooses the batch alone
    setting = plan(job, budget, None if args.train_batch_size == "auto" else args.train_batch_size,
                   None if free and not args.gradient_checkpointing else args.gradient_checkpointing,
                   None if free and args.base_precision == "auto" else args.base_precision, max_batch=examples)
    args.train_batch_size, args.gradient_checkpointing = setting.batch_size, setting.gradient_checkpointing
    args.base_precision = setting.base_precision
    if accelerator.is_main_process:
        logger.info("memory plan for %.1f GiB at %d px: %s, %.2f GiB at the peak; the learning rate stays as given "
                    "(--scale_lr multiplies it by the batch)", budget, args.resolution, setting.describe(),
                    setting.peak_gib)


def prepare_data(args, base, instance: Images, classes: Images, device, pivotal):
    """The dataset (captions in pivotal tuning's tokens), the prompt embeddings while the text encoders and their
    tokens are frozen and the captions are not shuffled, and the latents with --cache_latents (the VAE then freed:
    None stands for it)."""
    dataset = DreamBoothDataset(
        instance.paths, args.instance_prompt, args.resolution, classes.paths, args.class_prompt,
        args.caption_extension, args.center_crop, args.random_flip, args.aspect_ratio_buckets,
        bucket_step=args.bucket_reso_steps or (64 if args.resolution >= 512 else 8), seed=args.seed,
        mask_dir=args.mask_dir, alpha_mask=args.alpha_mask, captions=instance.captions, caption_rules=instance.rules,
        class_captions=classes.captions or None, class_caption_rules=classes.rules or None,
        length=len(instance.paths) if args.kohya_epochs else None,
        bucket_limits=(args.min_bucket_reso, args.max_bucket_reso), interpolation=args.image_interpolation_mode,
    )
    if pivotal:
        pivotal.rewrite_captions(dataset)
    shuffled = any(rule.shuffle for rule in instance.rules + classes.rules)  # too many orders to encode beforehand
    frozen = not (args.train_text_encoder or pivotal or shuffled)
    prompt_cache = cache_prompts(base, dataset, device, bool(args.validation_prompt)) if frozen else None
    latent_cache = cache_latents(dataset, base.vae, device) if args.cache_latents else None
    vae_config = base.vae.config
    if latent_cache is not None:
        base.vae = None
        free_memory()
    return dataset, prompt_cache, latent_cache, vae_config


@torch.no_grad()
def cache_prompts(base, dataset: DreamBoothDataset, device, keep_encoders: bool) -> dict:
    """caption → (hidden states, pooled) for every caption of the data; the encoders then leave the device
    unless validation images will need them."""
    dropped = {""} if dataset.captions_vary else set()  # caption dropout's empty caption
    captions = sorted(set(dataset.captions) | set(dataset.class_captions) | dropped)
    embeds, pooled = encode_prompts(base.text_encoders, tokenize(base.tokenizers, captions), device)
    if not keep_encoders:
        for encoder in base.text_encoders:
            encoder.to("cpu")
        free_memory()
    return {c: (embeds[i], pooled[i]) for i, c in enumerate(captions)}


def make_lr_scheduler(optimizer, name: str, warmup_steps: int, max_steps: int, cycles: int, power: float,
                      processes: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps * processes, num_training_steps=max_steps * processes,
        num_cycles=cycles, power=power,
    )


# ---------------------------------------------------------------- the loop


@dataclass
class Run:
    """What the loop trains and steps."""

    accelerator: object
    trained: list  # the prepared models (UNet, then the text encoders when they carry adapters)
    params: list
    optimizer: object
    lr_scheduler: object
    models: StepModels
    components: dict  # the unwrapped adapted models, by component name
    profile: StepProfile  # --profile_steps: where a step's time goes
    ema: AdapterEMA | None = None  # --use_ema


class LossLog:
    """loss.csv: one line per optimizer step, appended (a resumed run continues the file; a later line
    for a step replaces an earlier one): the loss curve without tensorboard, and with the wall-clock
    time of each step (Unix seconds) the run's speed, which the web demo reads."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115 — closed by close()
        if self.file is not None and self.file.tell() == 0:
            self.file.write("step,loss,lr,time\n")

    def write(self, step: int, loss: float, lr: float, at: float | None = None) -> None:
        """``at``: when the step was taken (Unix seconds; default now)."""
        if self.file is not None:
            self.file.write(f"{step},{loss:.6g},{lr:.6g},{time.time() if at is None else at:.3f}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass(frozen=True)
class LossRow:
    step: int
    loss: float
    lr: float
    time: float | None  # None in files written before loss.csv had the time column


def read_loss_log(path: Path) -> list[LossRow]:
    """What LossLog wrote, oldest step first: a step logged again (after a resume) replaces the earlier line; a
    line not yet finished (the run is writing it) or unreadable is left out; a missing file has no rows."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    lines = text.split("\n")[1:-1]  # the header; the part after the last newline is a line still being written
    rows = {}
    for line in lines:
        parts = line.split(",")
        try:
            time_ = float(parts[3]) if len(parts) > 3 else None
            rows[int(parts[0])] = LossRow(int(parts[0]), float(parts[1]), float(parts[2]), time_)
        except (ValueError, IndexError):
            continue
    return [rows[step] for step in sorted(rows)]


def steps_per_second(rows: list[LossRow], since: float = 0.0, skip: int = 0, window: int | None = None,
                     at_least: int = 2) -> float | None:
    """Steps per second between the first and last timed rows logged at or after ``since`` (Unix time), the first
    ``skip`` of those left out and the last ``window`` kept; None with fewer than ``at_least`` rows."""
    timed = [(r.step, r.time) for r in rows if r.time is not None and r.time >= since][skip:]
    timed = timed[-window:] if window else timed
    if len(timed) < max(2, at_least) or timed[-1][1] <= timed[0][1]:
        return None
    return (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])


class PendingLosses:
    """The losses of the steps since the last read, kept on the device. Reading a loss makes the host wait for the
    GPU to finish everything queued, so the loop reads them every ``--logging_steps`` steps, before a checkpoint or
    validation images, and at the end: then they go to loss.csv, the trackers and the progress bar, and a loss that
    is not finite stops the run (within that many steps, before any checkpoint holds what came of it)."""

    def __init__(self, accelerator, log: LossLog, progress):
        self.accelerator, self.log, self.progress = accelerator, log, progress
        self.rows: list[tuple[int, torch.Tensor, float, float]] = []  # step, loss on the device, lr, host time
        self.last = float("nan")

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.rows.append((step, loss.detach().reshape(()), lr, time.time()))
        self.progress.update(1)

    def read(self) -> float:
        """Logs the pending steps (one wait for the device); returns the latest loss."""
        if not self.rows:
            return self.last
        with torch.profiler.record_function(LOSS_READ):  # the one wait for the device, named for the profile
            stacked = torch.stack([loss for _, loss, _, _ in self.rows]).float()
            values = self.accelerator.gather(stacked).reshape(-1, len(self.rows)).mean(dim=0).tolist()
        for (step, _, lr, at), value in zip(self.rows, values):
            if not math.isfinite(value):
                self.rows.clear()
                raise TrainingError(f"the loss became {value} at step {step}: stopping. The last good checkpoint and "
                                    "adapter files are untouched; try a lower --learning_rate or "
                                    "--mixed_precision bf16")
            self.accelerator.log({"loss": value, "lr": lr}, step=step)
            self.log.write(step, value, lr, at)
        self.progress.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{self.rows[-1][2]:.2e}")
        self.rows.clear()
        self.last = values[-1]
        return self.last


def optimizer_step(run: Run, batch: dict, rng: torch.Generator, settings, max_grad_norm: float) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation) the optimizer step of one batch; nothing in it waits
    for the device."""
    accelerator = run.accelerator
    with accelerator.accumulate(*run.trained):
        loss = batch_loss(run.models, batch, rng, settings)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def settle_heap() -> None:
    """Collects once and freezes what survives, so that Python's full collections skip it: the models, and after the
    first step the graphs torch.compile built (a million objects), which each full collection would otherwise walk
    (mid-run stalls of 0.4–1.8 s a step on the tiny SDXL). The loop unfreezes them at its end."""
    gc.collect()
    gc.freeze()


def train_steps(run: Run, dataset, plan: StepPlan, global_step: int, latent_cache, s: LoopSettings, output_dir: Path,
                validate):
    """The epochs from where the run stands to ``plan.max_steps``; returns the final step and loss.
    A stop request (SIGTERM) ends it at the end of a step, with a checkpoint of that step."""
    from tqdm.auto import tqdm

    accelerator, first_step = run.accelerator, global_step
    main, rank, world, device = (accelerator.is_main_process, accelerator.process_index, accelerator.num_processes,
                                 accelerator.device)
    progress = tqdm(total=plan.max_steps, initial=global_step, desc="steps", disable=not progress_bars_wanted(main))
    losses = PendingLosses(accelerator, LossLog(output_dir / "loss.csv" if main else None), progress)
    set_adapter_training(run.components, True)
    settle_heap()
    loop_begins()  # from here a stop request waits for the end of a step
    try:
        for epoch in range(global_step // plan.steps_per_epoch, plan.num_epochs):
            batches = epoch_batches(dataset, s.batch_size, epoch, s.seed)
            mine = process_batches(batches, plan.steps_per_epoch * s.accumulation * world, rank, world)
            done = (global_step - epoch * plan.steps_per_epoch) * s.accumulation
            source = batch_source(dataset, mine[done:], epoch, latent_cache, s.dataloader_workers,
                                  device.type == "cuda")
            for batch_number, batch in enumerate(source, start=done):
                # Every random draw of a batch comes from a generator on the device seeded by its place in the run.
                rng = seeded_generator(s.seed, epoch, batch_number, rank, device=device)
                with run.profile.batch():
                    loss = optimizer_step(run, batch, rng, s.loss, s.max_grad_norm)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                if global_step == first_step + 1:
                    settle_heap()
                if run.ema is not None:
                    run.ema.update()
                losses.add(global_step, loss, run.lr_scheduler.get_last_lr()[0])
                checkpointed = global_step % s.checkpointing_steps == 0 and global_step < plan.max_steps
                validating = validate and main and s.validation_steps and global_step % s.validation_steps == 0 \
                    and global_step < plan.max_steps
                read = global_step >= plan.max_steps or checkpointed or validating or global_step % s.logging_steps == 0
                if read:
                    losses.read()
                if global_step >= plan.max_steps:
                    break
                if checkpointed:
                    save_checkpoint(accelerator, output_dir, global_step, s.checkpoints_total_limit)
                if validating:
                    validate(output_dir / f"validation-step{global_step}.png")
                # one process reads its own flag; several agree (a collective) when they read their losses
                if (world == 1 or read) and stop_requested(accelerator):
                    losses.read()
                    if not checkpointed:
                        save_checkpoint(accelerator, output_dir, global_step, s.checkpoints_total_limit)
                    raise RunStopped(global_step)
            by_epoch = validate and main and not s.validation_steps and (epoch + 1) % s.validation_epochs == 0
            if by_epoch and global_step < plan.max_steps:
                losses.read()
                validate(output_dir / f"validation-step{global_step}.png")
            if global_step >= plan.max_steps:
                break
    finally:
        loop_ends()
        run.profile.close()
        gc.unfreeze()
        progress.close()  # before any error message, so that message is the last line
        losses.log.close()
    return global_step, losses.last


def validation_for(args, accelerator, run: Run, base):
    """The validation images' call, path → grid, with what it needs of the options bound."""
    vae_id = (args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision, args.variant,
              args.base_config)
    sampling = dict(prompt=args.validation_prompts, count=args.num_validation_images, seed=args.seed,
                    steps=args.num_validation_inference_steps, resolution=args.resolution)
    return lambda path: validation_images(accelerator, run, base, vae_id, sampling, path)


def validation_images(accelerator, run: Run, base, vae_id: tuple, sampling: dict, path: Path) -> Path:
    """The validation grid; ``vae_id`` = (model, separate VAE, revision, variant, configs of a single-file base) to
    reload a VAE freed by caching,
    ``sampling``: prompt, count, seed, steps, resolution."""
    vae = run.models.vae
    if vae is None:  # freed after caching latents: load it again for the pictures
        vae = load_vae(*vae_id).to(accelerator.device)
    encoders = [accelerator.unwrap_model(e).to(accelerator.device) for e in run.models.text_encoders]
    parts = dict(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=base.tokenizers[0],
                 tokenizer_2=base.tokenizers[1], scheduler_config=base.noise_scheduler.config)
    with run.ema.swapped() if run.ema is not None else nullcontext():  # --use_ema: the images of the average
        return validation_grid(parts, run.components, sampling["prompt"], sampling["count"], sampling["seed"],
                               sampling["steps"], sampling["resolution"], accelerator.device,
                               accelerator.mixed_precision != "no", path)


# ---------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    from .options import parse_args

    args = parse_args(argv)  # bad options end here, with argparse's one-line message
    quiet_libraries()
    if os.environ.get("ACCELERATE_USE_CPU",
                      "").lower() == "true" and os.environ.get("MASTER_ADDR") and not os.environ.get("WORLD_SIZE"):
        # accelerate launch --cpu --num_processes N sets these, then starts one process unless given an MPI hostfile
        print("warning: accelerate launch --cpu starts a single process without --mpirun_hostfile; for several CPU "
              "processes use: torchrun --nproc_per_node N train_dreambooth.py ...", file=sys.stderr)
    install()  # SIGTERM: stop with a checkpoint (see stopping.py)
    try:
        train(args)
    except RunStopped as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CODE
    except MosloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint and any adapter files already written are intact", file=sys.stderr)
        return 130
    return 0
