"""SDXL as one .safetensors file in the original (SGM / A1111 / ComfyUI) layout: read it, and write one.

Most community SDXL bases ship as such a file. Its tensors are named as Stability's code named them:
``model.diffusion_model.*`` (the UNet, blocks counted flatly: ``input_blocks.4.1…``), ``first_stage_model.*`` (the
VAE, its up levels counted from the bottom), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, as
transformers names it) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG: q, k and v fused in ``in_proj``,
``text_projection`` transposed). ``v_pred`` and ``ztsnr`` marker tensors say a file predicts v at zero terminal SNR,
as ComfyUI, Forge and A1111 read them.

One table serves both ways: ``original_names`` maps every tensor of the diffusers models (built from configs on the
meta device) to the file's name, so reading inverts exactly what writing does. A file is validated as data first
(safetensors header only, never unpickled), recognised or refused by what it holds, and loaded only when every
tensor of every component is accounted for — none missing, none unexpected, none of another shape — straight into
the models (memory-mapped, assigned, no second copy).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import AdapterFileError, DataError
from .safe_files import read_header, write_safetensors

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
SDXL_BASE_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"  # configs and tokenizers for files that name none
MARKERS = {"v_pred", "ztsnr"}  # presence alone says v-prediction / zero terminal SNR
IGNORED = re.compile(r"(.*\.position_ids|conditioner\.embedders\.1\.model\.logit_scale)$")  # in many files; no weights
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


# ---------------------------------------------------------------- names: diffusers → the original layout


def unet_name(key: str, config) -> str:
    """A diffusers UNet tensor's name in the original layout (``config``: the UNet's)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    per_level = config["layers_per_block"] + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{RESNET[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(\w+)", key):
        return f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{RESNET[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1  # after the attention, if the level has one
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise DataError(f"the UNet tensor {key} has no place in the original SDXL layout")


def vae_name(key: str, levels: int) -> str:
    """A diffusers VAE tensor's name in the original layout (``levels``: len(block_out_channels))."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv: the same names


def open_clip_name(key: str) -> str:
    """A bigG tensor's name in OpenCLIP's layout; q, k and v all name their fused ``in_proj`` tensor."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise DataError(f"the text encoder 2 tensor {key} has no place in the original SDXL layout")
    if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
    return f"transformer.resblocks.{m[1]}.{OPEN_CLIP[m[2]]}.{m[3]}"


def original_names(components: dict) -> dict[str, tuple[str, str]]:
    """Every tensor of the four models → (component, its name in the file), with the file's prefix."""
    names = {}
    for component, model in components.items():
        for key in model.state_dict():
            if component == "unet":
                name = unet_name(key, model.config)
            elif component == "vae":
                name = vae_name(key, len(model.config.block_out_channels))
            elif component == "text_encoder":
                name = key if key.startswith("text_model.") else f"text_model.{key}"
            else:
                name = open_clip_name(key)
            names[(component, key)] = PREFIXES[component] + name
    return names


# ---------------------------------------------------------------- writing


def file_tensors(components: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The four models' tensors under the file's names, in ``dtype`` (bigG's q, k, v fused; 1×1 convs in the VAE)."""
    tensors, fused = {}, {}
    states = {component: model.state_dict() for component, model in components.items()}
    for (component, key), name in original_names(components).items():
        tensor = states[component][key].detach()
        if component == "vae" and ".mid.attn_1." in name and name.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original VAE's attention is 1×1 convolutions
        if name.endswith("text_projection"):
            tensor = tensor.T
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            fused.setdefault(name, {})[re.search(r"([qkv])_proj", key)[1]] = tensor
            continue
        tensors[name] = tensor.to(dtype).contiguous()
    for name, parts in fused.items():
        tensors[name] = torch.cat([parts["q"], parts["k"], parts["v"]]).to(dtype).contiguous()
    return tensors


def save_single_file(components: dict, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                     schedule: dict | None = None, metadata: dict | None = None) -> Path:
    """The UNet, VAE and both text encoders as one file in the original SDXL layout, written atomically; with
    ``schedule`` v-prediction (and zero terminal SNR) marked as ComfyUI, Forge and A1111 read it."""
    tensors = file_tensors(components, dtype)
    schedule = schedule or {}
    v = schedule.get("prediction_type") == "v_prediction"
    if v:
        tensors["v_pred"] = torch.tensor([])
        if schedule.get("rescale_betas_zero_snr"):
            tensors["ztsnr"] = torch.tensor([])
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.prediction_type": "v" if v else "epsilon"}
    return write_safetensors(path, tensors, {**spec, **(metadata or {})})


# ---------------------------------------------------------------- reading


def is_single_file(path) -> bool:
    """Whether a base model named on the command line is one file (else a diffusers folder or a hub id)."""
    return Path(str(path)).suffix.lower() in (".safetensors", *PICKLES) and Path(str(path)).is_file()


def looks_like(names: set[str]) -> str:
    """What a file's tensor names say it is: "sdxl", or what else, in words for a one-line refusal."""
    def has(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if any(n.startswith(("lora_unet_", "lora_te")) or ".lora_down." in n or ".lora_A." in n for n in names):
        return "a LoRA, not a base model"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "a Stable Diffusion 3 checkpoint"
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "a Flux checkpoint"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x checkpoint"
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x checkpoint"
    if has("conditioner.embedders.0.model."):
        return "an SDXL refiner checkpoint"
    if has(PREFIXES["unet"]) and has(PREFIXES["text_encoder"]) and has(PREFIXES["text_encoder_2"]):
        return "sdxl"
    if has(PREFIXES["unet"]):
        return "a UNet without the text encoders SDXL needs"
    return "no Stable Diffusion checkpoint this toolkit knows"


def marked_schedule(names: set[str], metadata: dict[str, str]) -> dict:
    """The noise schedule a file marks: ``v_pred`` / ``ztsnr`` keys (ComfyUI's), else modelspec.prediction_type."""
    if "v_pred" in names or metadata.get("modelspec.prediction_type") == "v":
        return {"prediction_type": "v_prediction", "rescale_betas_zero_snr": "ztsnr" in names}
    if metadata.get("modelspec.prediction_type") == "epsilon":
        return {"prediction_type": "epsilon"}
    return {}


def checked_header(path: Path) -> tuple[dict, dict]:
    """The file's header, refused in one line unless it is an SDXL base checkpoint in safetensors."""
    if path.suffix.lower() in PICKLES:
        raise DataError(f"{path.name} is a pickle checkpoint ({path.suffix}), which can run code when loaded: it is "
                        "never unpickled here; use the model's .safetensors file")
    try:
        header, metadata = read_header(path)
    except AdapterFileError as exc:
        raise DataError(str(exc)) from None
    kind = looks_like(set(header))
    if kind != "sdxl":
        raise DataError(f"{path.name} looks like {kind}: an SDXL base checkpoint is needed here")
    return header, metadata


def expected_shape(name: str, model_shape) -> list[int]:
    """The shape a model tensor has in the file: transposed projection, q, k and v stacked in in_proj."""
    if name.endswith("text_projection"):
        return list(model_shape)[::-1]
    if name.endswith(("in_proj_weight", "in_proj_bias")):
        return [model_shape[0] * 3, *model_shape[1:]]
    return list(model_shape)


def account(path: Path, header: dict, names: dict, models: dict) -> None:
    """Every tensor of every model is in the file with its shape, and the file holds nothing else."""
    states = {component: model.state_dict() for component, model in models.items()}
    wanted = {name: expected_shape(name, states[component][key].shape) for (component, key), name in names.items()}
    missing = sorted(set(wanted) - set(header))
    unexpected = sorted(n for n in set(header) - set(wanted) if n not in MARKERS and not IGNORED.fullmatch(n))
    if missing or unexpected:
        what = f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else ""
        what += ("; " if what else "") + (f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else "")
        raise DataError(f"{path.name} does not fit the SDXL models its configs describe: {what}")
    for name, shape in wanted.items():
        got = header[name]["shape"]
        if got != shape and not (".mid.attn_1." in name and got == [*shape, 1, 1]):
            raise DataError(f"{path.name}: {name} is {got} in the file but {shape} in the model")


def empty_models(config_dir: str, parts=tuple(PREFIXES)) -> dict:
    """The four models from ``config_dir``'s configs (a diffusers folder or hub id), their weights on the meta
    device, to be assigned the file's tensors (buffers, which no file holds, are made for real)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = UNet2DConditionModel.load_config
    makers = {
        "unet": lambda: UNet2DConditionModel.from_config(unet_config(config_dir, subfolder="unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2")),
    }
    try:
        with init_empty_weights(include_buffers=False):
            return {part: makers[part]() for part in parts}
    except OSError:  # a hub id offline and not cached, a folder without configs
        raise DataError(f"no SDXL configs found at {config_dir!r} (offline, or not a diffusers folder): pass "
                        "--base_config with a diffusers SDXL folder here (configs and tokenizers suffice)") from None


def model_tensor(name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The file's tensor as the model holds it: q, k or v cut from the fused in_proj, the projection transposed back,
    the VAE's 1×1 attention convolutions as linear weights."""
    if name.endswith(("in_proj_weight", "in_proj_bias")):
        return tensor.chunk(3)["qkv".index(re.search(r"([qkv])_proj", key)[1])]
    if name.endswith("text_projection"):
        return tensor.T
    if ".mid.attn_1." in name and tensor.dim() == 4:
        return tensor[:, :, 0, 0]
    return tensor


def load_single_file(path: str | os.PathLike, config_dir: str, parts=tuple(PREFIXES)) -> tuple[dict, dict]:
    """The UNet, VAE and both text encoders (or those of ``parts``) from an SDXL checkpoint file, built from
    ``config_dir``'s configs, and the noise schedule the file marks (empty when it marks none). DataError, in one
    line, for a file that is not safetensors, not SDXL, or does not fit the models; nothing is left random or on
    the meta device."""
    from safetensors import safe_open

    path = Path(path)
    header, metadata = checked_header(path)
    models = empty_models(config_dir)
    names = original_names(models)
    account(path, header, names, models)  # all four, even when fewer are wanted: the file is checked whole
    models = {part: models[part] for part in parts}
    names = {(component, key): name for (component, key), name in names.items() if component in models}
    states: dict[str, dict] = {component: {} for component in models}
    with safe_open(str(path), framework="pt") as f:
        fused: dict[str, torch.Tensor] = {}
        for (component, key), name in names.items():
            if "in_proj_" not in name:
                tensor = f.get_tensor(name)
            elif name in fused:
                tensor = fused[name]
            else:
                tensor = fused[name] = f.get_tensor(name)
            states[component][key] = model_tensor(name, key, tensor).contiguous()
    for component, model in models.items():
        model.load_state_dict(states[component], assign=True, strict=True)
        model.eval()  # as from_pretrained gives models
    left = [f"{c}.{n}" for c, m in models.items() for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if left:
        raise DataError(f"{path.name}: {len(left)} tensor(s) were not loaded, e.g. {left[0]}")
    return models, marked_schedule(set(header), metadata)


def is_sdxl_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a file is an SDXL base checkpoint by its header (never its data): what a model folder may offer."""
    try:
        checked_header(Path(path))
    except DataError:
        return False
    return True


def file_schedule(path: str | os.PathLike) -> dict:
    """The noise schedule a checkpoint file marks, from its header alone (refusing a file that is no SDXL base)."""
    header, metadata = checked_header(Path(path))
    return marked_schedule(set(header), metadata)


def file_pipeline(model_path: str, base_config: str, dtype: torch.dtype):
    """An SDXL pipeline of a checkpoint file's weights, with ``base_config``'s tokenizers and scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import AutoTokenizer

    models, _ = load_single_file(model_path, base_config)
    tokenizers = [AutoTokenizer.from_pretrained(base_config, subfolder=sub, use_fast=False)
                  for sub in ("tokenizer", "tokenizer_2")]
    scheduler = EulerDiscreteScheduler.from_pretrained(base_config, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                     text_encoder_2=models["text_encoder_2"], tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=models["unet"], scheduler=scheduler)
    pipe.register_to_config(_name_or_path=str(model_path))  # as from_pretrained records its folder
    return pipe.to(dtype=dtype)
