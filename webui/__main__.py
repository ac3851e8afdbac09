"""python -m webui — serve the demo page (127.0.0.1:7860 unless --listen or --share)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m webui", description="Generate the trained subject from saved adapters.")
    p.add_argument("--adapters", type=Path, default=Path("outputs"), help="the folder of trained adapters")
    p.add_argument("--base_model", help="hub id or folder; default: the one an adapter records, when it is allowed")
    p.add_argument("--models_dir", type=Path,
                   help="base models requests may choose: the diffusers folders and SDXL .safetensors "
                        "checkpoints in it")
    p.add_argument("--base_config", help="configs and tokenizers for checkpoint files (default: SDXL base's; the "
                                         "demo model's with --demo)")
    p.add_argument("--time_limit", type=float, default=300.0, help="seconds a request may run before it is cut off")
    p.add_argument("--max_upload", default="10mb", help="the largest file a client may upload")
    p.add_argument("--demo", action="store_true",
                   help="offline: the toy world's model (python -m toyworld.demo trains on it)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="serve on all interfaces, not only this machine")
    p.add_argument("--share", action="store_true", help="a public gradio.live link")
    p.add_argument("--queue_size", type=int, default=16, help="requests waiting beyond this are refused")
    p.add_argument("--output_dir", type=Path, help="where generated PNGs are kept (default: a temporary folder)")
    p.add_argument("--data_root", type=Path,
                   help="folders of training images the Train tab may offer (nothing else is read)")
    p.add_argument("--no_train", action="store_true", help="no Train tab: generation only")
    return p.parse_args(argv)


def demo_model(adapters: Path) -> str:
    """The demo's base model: a random tiny SDXL beside the adapters if there is one, else the pretrained
    toy world the offline demo trains on, else a random tiny SDXL built into the cache."""
    from toyworld.recipe import WORLD_MODEL_DIR
    from toyworld.tiny_sdxl import save_tiny_sdxl

    for candidate in (adapters / "random-sdxl", adapters.parent / "random-sdxl", WORLD_MODEL_DIR):
        if (candidate / "model_index.json").is_file():
            return str(candidate)
    cache = Path.home() / ".cache" / "dreambooth-moslora" / "random-sdxl"
    if not (cache / "model_index.json").is_file():
        save_tiny_sdxl(cache)
    return str(cache)


def main(argv=None) -> int:
    args = parse(argv)
    from dreambooth_moslora.errors import RequestError
    from dreambooth_moslora.runtime import quiet_libraries
    from dreambooth_moslora.single_file import SDXL_BASE_CONFIG

    quiet_libraries()
    from gradio import utils as gradio_utils

    from .app import CSS, build
    from .engine import Engine
    from .training import Trainer

    if args.demo and not args.adapters.is_dir():
        args.adapters.mkdir(parents=True)
    try:
        demo = demo_model(args.adapters) if args.demo else None
        engine = Engine(args.adapters, base_model=args.base_model, demo_model=demo, output_dir=args.output_dir,
                        models_dir=args.models_dir, time_limit=args.time_limit,
                        base_config=args.base_config or demo or SDXL_BASE_CONFIG)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data_root is not None and not args.data_root.is_dir():
        print(f"error: --data_root {args.data_root} is not a folder", file=sys.stderr)
        return 2
    # the Train tab's limit per file is the upload limit, read as gradio reads --max_upload
    try:
        max_file_bytes = gradio_utils._parse_file_size(args.max_upload)
    except ValueError:
        print(f"error: --max_upload {args.max_upload!r} is not a size such as 10mb", file=sys.stderr)
        return 2
    trainer = None if args.no_train else Trainer(engine, data_root=args.data_root, max_file_bytes=max_file_bytes)
    page = build(engine, default_size=32 if args.demo else 1024, trainer=trainer,
                 demo=args.demo)  # the toy world: 32 px
    page.queue(max_size=args.queue_size, default_concurrency_limit=1)
    page.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
        allowed_paths=[str(engine.output_dir)], show_error=True, max_file_size=max_file_bytes, css=CSS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
