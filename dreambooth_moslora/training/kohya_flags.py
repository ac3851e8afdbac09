"""sd-scripts' flag names, for a kohya command line pasted here: an unknown flag that sd-scripts has is answered
with what does its job in this trainer (or why nothing needs to), in the one-line error that refuses it.

The trainer's flags are diffusers' where the feature is the same in both; only a feature that only sd-scripts has
keeps sd-scripts' name (``--train_data_dir``, ``--shuffle_caption``, ``--sample_prompts``, ``--network_weights`` …).
"""

from __future__ import annotations

SDPA = "nothing to switch on: attention runs through PyTorch's scaled_dot_product_attention"

# sd-scripts' flag (sdxl_train_network.py) → what does its job here
KOHYA_FLAGS = {
    "network_dim": "--rank",
    "network_alpha": "--lora_alpha (sd-scripts' default is 1, this trainer's the rank)",
    "network_dropout": "--lora_dropout",
    "network_module": "not needed: the adapter is MoSLoRA (--mixer none for plain LoRA)",
    "network_train_unet_only": "not needed: the text encoders train only with --train_text_encoder",
    "network_train_text_encoder_only": "not supported: the UNet's adapter always trains",
    "unet_lr": "--learning_rate",
    "max_train_epochs": "--num_train_epochs",
    "optimizer_type": "--optimizer adamw|prodigy (AdamW8bit: --use_8bit_adam)",
    "min_snr_gamma": "--snr_gamma",
    "lr_scheduler_num_cycles": "--lr_num_cycles",
    "lr_scheduler_power": "--lr_power",
    "xformers": SDPA,
    "sdpa": SDPA,
    "mem_eff_attn": SDPA,
    "enable_bucket": "--aspect_ratio_buckets",
    "flip_aug": "--random_flip",
    "caption_extention": "--caption_extension",
    "masked_loss": "--alpha_mask, or --mask_dir DIR",
    "resize_interpolation": "--image_interpolation_mode",
    "fp8_base": "--base_precision fp8",
    "fp8_base_unet": "--base_precision fp8",
    "full_bf16": "--mixed_precision bf16 (the adapter stays fp32)",
    "full_fp16": "--mixed_precision fp16 (the adapter stays fp32)",
    "no_half_vae": "not needed: the VAE stays fp32 unless --pretrained_vae_model_name_or_path gives an fp16-safe one",
    "vae": "--pretrained_vae_model_name_or_path",
    "cache_latents_to_disk": "--cache_latents (kept on the device)",
    "cache_text_encoder_outputs": "not needed: prompt embeddings are computed once while the text encoders are frozen",
    "max_data_loader_n_workers": "--dataloader_num_workers",
    "persistent_data_loader_workers": "not needed",
    "v_parameterization": "--prediction_type v_prediction (read from a checkpoint file's markers)",
    "zero_terminal_snr": "--rescale_betas_zero_snr",
    "output_name": "not needed: the files have fixed names in --output_dir",
    "save_model_as": "--output_formats native diffusers kohya",
    "save_precision": "not needed: the files are written in fp32, exactly what trained",
    "save_every_n_steps": "--checkpointing_steps",
    "save_every_n_epochs": "--checkpointing_steps (in steps)",
    "save_last_n_steps": "--checkpoints_total_limit",
    "save_last_n_epochs": "--checkpoints_total_limit",
    "save_state": "not needed: every checkpoint holds the whole training state",
    "resume": "--resume_from_checkpoint DIR|latest",
    "sample_every_n_steps": "--validation_steps",
    "sample_every_n_epochs": "--validation_epochs",
    "sample_sampler": "not supported: samples use the base model's scheduler",
    "log_with": "--report_to",
    "config_file": "--config",
    "huggingface_repo_id": "--push_to_hub --hub_model_id",
    "huggingface_token": "--hub_token",
    "tokenizer_cache_dir": "--cache_dir",
    "dynamo_backend": "--torch_compile",
    "clip_skip": "not supported: SDXL already reads both text encoders' penultimate layer",
    "max_token_length": "not supported: prompts are cut at 77 tokens",
    "no_metadata": "not supported: the files always record how they were trained",
}


def kohya_hints(unknown: list[str]) -> str:
    """For each of sd-scripts' flags among unrecognized arguments, what to use here ("" when none is)."""
    flags = [item.split("=", 1)[0] for item in unknown if item.startswith("--")]
    known = [f"{flag} → {KOHYA_FLAGS[flag[2:]]}" for flag in dict.fromkeys(flags) if flag[2:] in KOHYA_FLAGS]
    return f". sd-scripts' flags here: {'; '.join(known)}" if known else ""
