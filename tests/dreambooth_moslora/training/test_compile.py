"""--torch_compile: the compiled step trains what the eager one does; the whole adapted UNet is one graph."""

import torch
from torch._dynamo.utils import counters
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from dreambooth_moslora import AdapterConfig
from dreambooth_moslora.sdxl import square_time_ids
from dreambooth_moslora.surgery import inject_adapter
from dreambooth_moslora.training import main

from .conftest import argv


def test_regionally_compiled_training_gives_the_eager_adapter(world, tmp_path):
    common = ("--learning_rate", "1e-3", "--output_formats", "native", "--cache_latents", "--center_crop")
    assert main(argv(world, tmp_path / "eager", *common, steps=3)) == 0
    assert main(argv(world, tmp_path / "compiled", *common, "--torch_compile", "--torch_compile_mode", "regional",
                     steps=3)) == 0
    eager = load_file(tmp_path / "eager" / "moslora_adapter.safetensors")
    compiled = load_file(tmp_path / "compiled" / "moslora_adapter.safetensors")
    assert eager.keys() == compiled.keys()
    trained = max(t.abs().max().item() for k, t in eager.items() if k.endswith("moslora_B"))
    assert trained > 1e-4
    # inductor's kernels round differently: the same adapter to floating-point tolerance, not bit for bit
    for name in eager:
        assert (eager[name] - compiled[name]).abs().max() <= 1e-2 * eager[name].abs().max() + 1e-7, name
    eager_losses, compiled_losses = ([float(row.split(",")[1]) for row in rows[1:]]
                                     for rows in ((tmp_path / run / "loss.csv").read_text().splitlines()
                                                  for run in ("eager", "compiled")))
    assert len(eager_losses) == 3 and all(abs(a - b) <= 1e-4 * a for a, b in zip(eager_losses, compiled_losses))


def test_the_whole_adapted_unet_is_captured_without_a_break(world):
    """What --torch_compile_mode default and reduce-overhead capture: the mixer banks' products, then the UNet with
    its adapters (B·M·A) and checkpointed blocks whole, no break that would send a step back to Python."""
    unet = UNet2DConditionModel.from_pretrained(world["model"], subfolder="unet")
    inject_adapter(unet, AdapterConfig(rank=4, mixer="learned"))
    unet.enable_gradient_checkpointing()
    unet.train()
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, config.cross_attention_dim))
    conditioning = {"text_embeds": torch.randn(2, pooled), "time_ids": square_time_ids(64, 2)}
    graphs = []

    def backend(graph_module, example_inputs):  # records what dynamo captured; runs it as it is
        graphs.append(graph_module)
        return graph_module.forward

    counters.clear()
    unet.compile(backend=backend)  # as the trainer compiles (fullgraph=True would hide the second step's retrace)
    unet(*inputs, added_cond_kwargs=conditioning).sample.square().mean().backward()
    # two graphs, no break: the forward pre-hook's batched B·M for each group of layers, then the whole UNet
    assert len(graphs) == 2 and not counters["graph_break"]
    hook, forward = ([str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs)
    assert sum("bmm" in c for c in hook) == len(unet.moslora_mixer_banks)
    assert all("bmm" in c or "getitem" in c for c in hook)
    assert not any("bmm" in c for c in forward) and sum("checkpoint" in c.lower() for c in forward) > 0
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    # the next step, after an optimizer step, compiles nothing more (the forward hook, which has no tensor operation
    # and so is skipped by dynamo, once shared its code with the pre-hook and the second step traced that again)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()
    unet(*inputs, added_cond_kwargs=conditioning).sample.square().mean().backward()
    assert len(graphs) == 2
