"""Shared helpers for the benchmark scripts: interleaved timing and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """One line naming the CPU/GPU, core count and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternation so drift hits all alike."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_report(description: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print the machine, one line describing the run, and the results as a markdown table."""
    print(f"machine: {machine()}")
    print(description + "\n")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def random_gpt2(width: int, layers: int, device: str, context_length: int = 512):
    """A GPT-2-shaped model with random weights (GPT-2's init), tied head, in eval mode: what the benchmarks time."""
    from helpers.model import GPTConfig, GPTModel, init_gpt2_weights

    torch.manual_seed(0)
    cfg = GPTConfig(context_length=context_length, emb_dim=width, n_heads=max(1, width // 64), n_layers=layers,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True)
    return init_gpt2_weights(GPTModel(cfg)).to(device).eval()
