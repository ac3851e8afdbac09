import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from dreambooth_moslora import AdapterConfig, adapter_layers, inject_components, pipeline_components
from toyworld.tiny_sdxl import build_tiny_sdxl

PROMPT = "a photo of sks dog on the beach"


@pytest.fixture
def tiny_pipe():
    pipe = build_tiny_sdxl(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_adapter_(components, seed=1, std=0.05):
    """Non-zero A, M and B everywhere, so that every part of ΔW shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for model in components.values():
        for layer in adapter_layers(model).values():
            with torch.no_grad():
                for p in (layer.lora_A, layer.lora_B, layer.lora_M):
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=g) * std + (0.0 if p is not layer.lora_M else 0.3))


@pytest.fixture
def adapted_pipe(tiny_pipe):
    """The tiny SDXL with a MoSLoRA adapter (rank 4, alpha 7 ≠ r, learned mixer) on all three models."""
    components = pipeline_components(tiny_pipe)
    torch.manual_seed(0)
    inject_components(components, AdapterConfig(rank=4, alpha=7.0, mixer="learned"))
    randomize_adapter_(components)
    return tiny_pipe
