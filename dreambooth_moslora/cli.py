"""``moslora``: inspect, convert, resize, merge and fuse adapter files (also ``python -m dreambooth_moslora``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import MosloraError
from .formats import FORMATS

EPILOG = """examples:
  moslora inspect out/moslora_adapter.safetensors
  moslora convert out/moslora_adapter.safetensors --to kohya -o dog_kohya.safetensors
  moslora resize out/pytorch_lora_weights.safetensors --rank 2 -o dog_r2.safetensors
  moslora merge dog.safetensors style.safetensors --weights 1 0.6 -o dog_style.safetensors
  moslora fuse --base stabilityai/stable-diffusion-xl-base-1.0 dog.safetensors -o sdxl-dog/"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moslora", description="Inspect, convert, resize, merge and fuse MoSLoRA / LoRA "
                                "adapter files (native, diffusers or kohya).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base_help = ("diffusers folder whose layer layout the file is for (default: the base model the file records, "
                 "when it is a folder here, else SDXL base's published layout)")

    s = sub.add_parser("inspect", help="what a file holds: format, settings, layers, ‖ΔW‖ per block")
    s.add_argument("file", type=Path)
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--base", help=base_help)

    s = sub.add_parser("convert", help="the same adapter in another format (exact)")
    s.add_argument("file", type=Path)
    s.add_argument("--to", choices=FORMATS, required=True, help="native (trainable MoSLoRA), diffusers, or kohya")
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--base", help=base_help)

    s = sub.add_parser("resize", help="a lower rank by truncated SVD of each layer's ΔW")
    s.add_argument("file", type=Path)
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the new rank of every layer")
    how.add_argument("--energy", type=float,
                     help="per layer, the smallest rank keeping this share of ‖ΔW‖² (e.g. 0.99)")
    s.add_argument("--to", choices=FORMATS, help="output format (default: the input's)")
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--base", help=base_help)

    s = sub.add_parser("merge", help="a weighted sum of adapters: exact, or compressed with --rank")
    s.add_argument("files", type=Path, nargs="+")
    s.add_argument("--weights", type=float, nargs="+", help="one per file (default: 1 each)")
    s.add_argument("--rank", type=int, help="compress the sum to this rank by SVD (default: exact, ranks add up)")
    s.add_argument("--to", choices=FORMATS, default="kohya", help="output format")
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--force", action="store_true", help="merge files trained on different base models")
    s.add_argument("--base", help=base_help)

    s = sub.add_parser("fuse", help="the base model with the adapter merged into its weights: a folder or one file")
    s.add_argument("file", type=Path)
    s.add_argument("--base", required=True, help="the base model: hub id, diffusers folder or .safetensors checkpoint")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("-o", "--output", type=Path, required=True,
                   help="the new diffusers folder, or FILE.safetensors: one checkpoint in the original SDXL layout")
    s.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="the single file's weights")
    s.add_argument("--base_config", help="with a checkpoint-file base: the diffusers folder or hub id of its configs")
    return p


def print_report(report: dict) -> None:
    print(f"{report['file']}: {report['format']} adapter, rank {report['rank']}, α "
          f"{report['alpha']:g}, mixer {report['mixer']}")
    print(f"  base model: {report['base_model'] or 'not recorded'}; instance prompt: "
          f"{report['instance_prompt'] or 'not recorded'}")
    print("  layers: " + ", ".join(f"{c} {n}" for c, n in report["layers"].items()))
    if report["new_tokens"]:
        print("  new tokens: " + ", ".join(f"{name} = {''.join(group)}" for name, group in report["new_tokens"].items())
              + " (write either in prompts)")
    if report["operation"]:
        print(f"  made by: moslora {report['operation'].get('operation')} of " +
              ", ".join(i.get("file", "?") for i in report["operation"].get("inputs", [])))
    keys = ("max_train_steps", "learning_rate", "train_batch_size", "resolution", "lora_init", "train_text_encoder")
    settings = {k: report["training"][k] for k in keys if k in report["training"]}
    if settings:
        print("  training: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    print(f"  ‖ΔW‖ (Frobenius) per block, total {report['delta_norm']:.4g}:")
    for block, norm in report["delta_norm_by_block"].items():
        print(f"    {block:24s} {norm:.4g}")


def run(args) -> int:
    from . import tools

    if args.command == "fuse":
        print(f"fused into {tools.fuse(args.base, args.file, args.output, args.scale, args.dtype, args.base_config)}")
        return 0
    if args.command == "merge":
        loaded = [tools.load(f, args.base) for f in args.files]
        errors = tools.merge(loaded, args.weights or [1.0] * len(loaded), args.output, args.to, args.rank, args.force)
        _print_errors(errors)
        print(f"wrote {args.output}")
        return 0
    loaded = (tools.load_for_inspection if args.command == "inspect" else tools.load)(args.file, args.base)
    if args.command == "inspect":
        report = tools.inspect(loaded)
        print(json.dumps(report, indent=2)) if args.json else print_report(report)
    elif args.command == "convert":
        print(f"wrote {tools.convert(loaded, args.to, args.output)}")
    elif args.command == "resize":
        errors = tools.resize(loaded, args.output, args.to or loaded.adapter.format, args.rank, args.energy)
        _print_errors(errors)
        print(f"wrote {args.output}")
    return 0


def _print_errors(errors: dict) -> None:
    if errors:
        print("relative Frobenius error of ΔW left by the truncation:")
        for block, error in sorted(errors.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
            print(f"  {block:24s} {error:.3e}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import quiet_libraries

    quiet_libraries()
    try:
        return run(args)
    except (MosloraError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
