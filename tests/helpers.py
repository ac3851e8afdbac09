"""What several test modules share: measurements of training, free ports, a web demo server."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from dreambooth_moslora.sdxl import square_time_ids, unet_prediction
from dreambooth_moslora.training.data import prepare


@torch.no_grad()
def denoising_loss(pipe, image_paths, captions, resolution=64, draws=8, seed=0) -> float:
    """The mean noise-prediction error on the given images, with fixed noise and timesteps."""
    scheduler_config = pipe.scheduler.config
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for path, caption in zip(image_paths, captions):
        pixels, _ = prepare(Image.open(path).convert("RGB"), (resolution, resolution), True, False, g)
        latents = pipe.vae.encode(pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        latents = latents.repeat(draws, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.linspace(50, 950, draws).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = square_time_ids(resolution, draws)
        pred = unet_prediction(pipe.unet, noisy, timesteps, embeds.repeat(draws, 1, 1), pooled.repeat(draws, 1),
                               time_ids)
        target = (noise if scheduler.config.prediction_type == "epsilon"
                  else scheduler.get_velocity(latents, noise, timesteps))
        total += torch.nn.functional.mse_loss(pred, target).item()
    return total / len(image_paths)


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def webui_server(log_path: Path, *args: str):
    """``python -m webui *args`` on a free port, offline, until the block ends: yields (url, port, process)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "webui", *args, "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert process.poll() is None, Path(log_path).read_text()
                    assert time.time() < deadline, "the server did not start"
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/", port, process
        finally:
            process.terminate()
            process.wait(timeout=30)
