"""DreamBooth's standard metrics for real SDXL runs: DINO and CLIP-I (subject fidelity), CLIP-T (prompt fidelity).

    python -m dreambooth_moslora.metrics --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --adapter out/pytorch_lora_weights.safetensors --instance_data_dir dog --prompts prompts.txt

- DINO: mean cosine similarity of DINOv2 [CLS] embeddings between each generated image and each
  instance image (how much the generated subject looks like the real one; the DreamBooth paper's
  preferred subject metric, since it separates individuals of one class better than CLIP).
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity of CLIP embeddings between each generated image and its prompt.

The command generates the images for each prompt with the base model and with the adapter (same
seeds) and reports both, so the adapter's effect shows against its own baseline. The models are
transformers' CLIP and DINOv2, by hub id or folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-small"


def _features(output) -> torch.Tensor:
    """transformers returns a tensor (4.x) or a model output with the projected pooled features (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    def __init__(self, model_id: str = DEFAULT_CLIP, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_id)
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)


class DinoScorer:
    def __init__(self, model_id: str = DEFAULT_DINO, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(model_id).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_id)
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)  # [CLS]


def mean_pairwise_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two sets of unit vectors."""
    return float((a @ b.T).mean())


def subject_fidelity(generated, references, scorer) -> float:
    """DINO or CLIP-I, by the scorer given: generated images against the real subject's images."""
    return mean_pairwise_similarity(scorer.image_embeddings(generated), scorer.image_embeddings(references))


def prompt_fidelity(images, prompts: list[str], clip: ClipScorer) -> float:
    """CLIP-T: each image against its own prompt."""
    if len(images) != len(prompts):
        raise ValueError("one prompt per image")
    return float((clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1).mean())


def evaluate(pipe, adapter: str | None, prompts: list[str], references, clip: ClipScorer, dino: DinoScorer,
             images_per_prompt: int = 4, seed: int = 0, **generate) -> dict:
    """Generates images_per_prompt images for each prompt, base model and adapter, and scores both."""
    from .inference import load_adapter, unload_adapter
    from .runtime import image_generators

    report = {}
    for name in ("base", "adapter"):
        if name == "adapter":
            if adapter is None:
                break
            load_adapter(pipe, adapter)
        texts = [prompt for prompt in prompts for _ in range(images_per_prompt)]
        # image i gets the same noise with and without the adapter
        generators = image_generators(seed, range(len(texts)))
        images = [pipe(prompt, generator=g, **generate).images[0] for prompt, g in zip(texts, generators)]
        report[name] = {
            "DINO": subject_fidelity(images, references, dino),
            "CLIP-I": subject_fidelity(images, references, clip),
            "CLIP-T": prompt_fidelity(images, texts, clip),
            "images": len(images),
        }
        if name == "adapter":
            unload_adapter(pipe)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_moslora.metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--adapter", help="any of the three adapter files; without it only the base model is scored")
    parser.add_argument("--instance_data_dir", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="a text file, one prompt per line")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--clip_model", default=DEFAULT_CLIP)
    parser.add_argument("--dino_model", default=DEFAULT_DINO)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)

    from .errors import DataError, MosloraError
    from .runtime import quiet_libraries
    from .safe_files import write_text
    from .training.data import load_image, scan_images

    quiet_libraries()
    try:
        prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"{args.prompts} holds no prompt")
        paths, _ = scan_images(args.instance_data_dir)
        if not paths:
            raise DataError(f"no usable image in {args.instance_data_dir}")
        references = [load_image(p) for p in paths]
        from diffusers import StableDiffusionXLPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(args.pretrained_model_name_or_path,
                                                         torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        clip, dino = ClipScorer(args.clip_model, device), DinoScorer(args.dino_model, device)
        report = evaluate(
            pipe, args.adapter, prompts, references, clip, dino, args.images_per_prompt, args.seed,
            num_inference_steps=args.num_inference_steps, height=args.resolution, width=args.resolution,
            guidance_scale=args.guidance_scale,
        )
    except (MosloraError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{'':8s} {'DINO':>7s} {'CLIP-I':>7s} {'CLIP-T':>7s}  images")
    for name, scores in report.items():
        print(f"{name:8s} {scores['DINO']:7.3f} {scores['CLIP-I']:7.3f} {scores['CLIP-T']:7.3f}  {scores['images']}")
    if args.output:
        write_text(args.output, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
