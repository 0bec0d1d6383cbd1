"""Pretraining throughput, MFU and peak memory of the 124M-shaped GPTModel at context 256.

Usage: python benchmarks/pretrain_throughput.py [--batch 4] [--steps 4] [--context 256] [--precision auto]
MFU uses helpers.pretrain.flops_per_token and, as the denominator, helpers.runtime.peak_flops: this
machine's measured float32 matmul peak on a CPU, or the known bf16 peak on a GPU. The compute dtype
is helpers.runtime's precision policy (auto: bf16 on GPUs that support it, else float32), as in pretraining.
Peak memory is the process's maximum resident set size (CPU) or torch's peak allocation (GPU).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from _common import machine

from helpers import runtime
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel
from helpers.pretrain import flops_per_token
from helpers.train import calc_loss_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", choices=runtime.PRECISIONS, default="auto")
    args = parser.parse_args()
    device = runtime.device()
    torch.manual_seed(0)
    cfg = GPTConfig(**{**GPT_CONFIGS["gpt2"].to_dict(), "context_length": args.context, "drop_rate": 0.0})
    model = GPTModel(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    dtype = str(runtime.compute_dtype(device, args.precision)).removeprefix("torch.")
    peak, source = runtime.peak_flops(device)
    peak_label = f"{peak / 1e9:,.0f} GFLOP/s ({source})" if peak else "unknown"

    def step():
        inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device=device)
        with runtime.autocast(device, args.precision):
            loss = calc_loss_batch(inputs, torch.roll(inputs, -1, 1), forward, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = args.steps * args.batch * args.context / elapsed
    mfu = rate * flops_per_token(cfg) / peak if peak else float("nan")
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"machine: {machine()}")
    print(f"GPT-2 124M shape (untied, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), context "
          f"{args.context}, batch {args.batch}, AdamW, {dtype}"
          f"{', compiled' if args.compile else ''}; peak {peak_label}\n")
    print("| device | tokens/s | MFU | peak memory (GiB) |")
    print("| --- | --- | --- | --- |")
    print(f"| {device.type} | {rate:,.0f} | {100 * mfu:.1f}% | {memory:.2f} |")


if __name__ == "__main__":
    main()
