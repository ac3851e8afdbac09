"""What the mixer costs: train-step time and memory of MoSLoRA vs PEFT's LoRA on an SDXL-shaped UNet.

    python benchmarks/adapter_overhead.py                     # CPU, SDXL-shaped small UNet
    python benchmarks/adapter_overhead.py --device cuda --full-size --dtype bf16   # real SDXL UNet shape

Every variant adapts the same layers (to_q, to_k, to_v, to_out.0 of every attention) at the same
rank on copies of one UNet, and trains with AdamW on the same batch. Variants run interleaved,
round after round in shuffled order; each round gives each variant's time over PEFT's time in
that round, so drift of the machine cancels, and the table gives the median of those ratios.

Memory: on CUDA, the peak allocated during a step. On the CPU there is no allocator counter,
so it reports what a step holds beyond the frozen model: the activations autograd saves for
backward (counted with saved-tensor hooks) plus the trainable weights, their gradients and
AdamW's two moments.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from diffusers.utils import logging as diffusers_logging

from dreambooth_moslora import UNET_TARGETS, AdapterConfig, inject_adapter
from dreambooth_moslora.sdxl import SDXL_UNET_CONFIG, square_time_ids

# SDXL's block layout (3 levels, 1/2/10 transformer layers, text_time conditioning) at a tenth of its width.
SMALL_SDXL_SHAPED = dict(
    SDXL_UNET_CONFIG,
    block_out_channels=(32, 64, 128),
    attention_head_dim=(1, 2, 4),
    cross_attention_dim=256,
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 128,
    sample_size=32,
)
FULL_SIZE = dict(SDXL_UNET_CONFIG)
POOLED_DIM = {"small": 128, "full": 1280}


def make_unet(config: dict, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn where they live: seconds on a GPU, not minutes on its host
        unet = UNet2DConditionModel(**config).to(dtype)
    unet.requires_grad_(False)
    return unet


def make_batch(config: dict, pooled_dim: int, batch: int, resolution: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    latent = resolution // 8
    return dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
        timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
        encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled_dim, generator=g).to(device, dtype),
            "time_ids": square_time_ids(resolution, batch, device, dtype),
        },
        target=torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
    )


def add_peft_lora(unet, rank: int):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the adapter in fp32, as in diffusers' training scripts
        p.data = p.data.float()
    return params


def add_moslora(unet, rank: int, mixer: str):
    params = inject_adapter(unet, AdapterConfig(rank=rank, alpha=rank, mixer=mixer), UNET_TARGETS)
    with torch.no_grad():
        for p in params:
            if p.shape[1] == rank and p.shape[0] != rank:  # B starts at zero; give it values as after a few steps
                p.normal_(0, 1e-3)
    return params


class Variant:
    def __init__(self, name, unet, params, batch, autocast_dtype):
        self.name, self.unet, self.params, self.batch = name, unet, params, batch
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.autocast_dtype = autocast_dtype
        self.times: list[float] = []
        self.device = batch["sample"].device

    def step(self):
        b = self.batch
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            pred = self.unet(b["sample"], b["timestep"], b["encoder_hidden_states"],
                             added_cond_kwargs=b["added_cond_kwargs"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), b["target"].float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_steps(self, n):
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        self.times.append((time.perf_counter() - start) / n)

    def operations(self) -> tuple[int, int]:
        """(aten operations, matrix multiplications) dispatched in one step, counted by the profiler:
        deterministic, unlike time, and what a launch-bound GPU step's time follows."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.step()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        matmuls = ("aten::mm", "aten::addmm", "aten::bmm")
        return sum(e.count for e in events), sum(e.count for e in events if e.key in matmuls)

    def memory(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(), "peak CUDA memory allocated in a step (model included)"
        state = sum(p.numel() * p.element_size() * 4 for p in self.params)  # weight, grad, 2 AdamW moments
        # Saving a tensor that is a model weight costs nothing: it is held anyway.
        held = {p.untyped_storage().data_ptr() for p in self.unet.parameters()}
        saved = {}  # storage → bytes: a storage saved several times (views of it) is held once

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in held:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        b = self.batch
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                pred = self.unet(b["sample"], b["timestep"], b["encoder_hidden_states"],
                                 added_cond_kwargs=b["added_cond_kwargs"]).sample
        pred.float().mean().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(saved.values()) + state, "saved activations (each storage once) + trainable state"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="the real SDXL UNet shape (for a GPU)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="base weights; autocast to it")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default 256 small, 1024 full)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed block")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    config, size = (FULL_SIZE, "full") if args.full_size else (SMALL_SDXL_SHAPED, "small")
    resolution = args.resolution or (1024 if args.full_size else 256)
    autocast_dtype = None if dtype == torch.float32 else dtype
    base = make_unet(config, device, dtype)
    batch = make_batch(config, POOLED_DIM[size], args.batch, resolution, device, dtype)

    builders = {
        "peft LoRA": lambda u: add_peft_lora(u, args.rank),
        "MoSLoRA mixer=none": lambda u: add_moslora(u, args.rank, "none"),
        "MoSLoRA mixer=frozen": lambda u: add_moslora(u, args.rank, "frozen"),
        "MoSLoRA mixer=learned": lambda u: add_moslora(u, args.rank, "learned"),
    }
    variants = []
    for name, build in builders.items():
        unet = copy.deepcopy(base)
        params = build(unet)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        variants.append(Variant(name, unet, params, batch, autocast_dtype))
    del base

    print(f"SDXL-shaped UNet ({size}), {args.device}, {args.dtype}, rank {args.rank}, "
          f"batch {args.batch}, {resolution} px"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    for v in variants:  # warm-up
        v.step()
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            v.timed_steps(args.steps)
    memories = {v.name: v.memory() for v in variants}
    operations = {v.name: v.operations() for v in variants}

    ref = variants[0]
    ref_mem = memories[ref.name][0]
    n_params = {v.name: sum(p.numel() for p in v.params) for v in variants}
    print(f"memory counted as: {memories[ref.name][1]}")
    print("time × is the median over rounds of (variant time / PEFT time in the same round), with its quartiles")
    print(f"{'variant':24s} {'params':>10s} {'median ms':>10s} {'best ms':>8s} {'time ×':>7s} "
          f"{'quartiles':>13s} {'memory MiB':>11s} "
          f"{'mem ×':>7s} {'ops/step':>9s} {'ops ×':>6s} {'matmuls':>8s}")
    for v in variants:
        ratios = sorted(t / r for t, r in zip(v.times, ref.times))
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        mem = memories[v.name][0]
        print(
            f"{v.name:24s} {n_params[v.name]:>10,d} {statistics.median(v.times) * 1e3:10.1f} {min(v.times) * 1e3:8.1f} "
            f"{q2:7.3f} {q1:6.3f}–{q3:5.3f} {mem / 2**20:11.1f} {mem / ref_mem:7.3f} {operations[v.name][0]:9,d} "
            f"{operations[v.name][0] / operations[ref.name][0]:6.3f} {operations[v.name][1]:8,d}"
        )
    print(f"goal: MoSLoRA ≤ 1.02× the time, ≤ 1.01× the memory and ≤ 1.02× the operations of PEFT LoRA "
          f"({args.rounds} rounds × {args.steps} steps)")


if __name__ == "__main__":
    main()
