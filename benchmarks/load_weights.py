"""Loading GPT-2 124M-sized weights with ``load_gpt2``: its own safetensors reader against ``safe_open``.

Usage: python benchmarks/load_weights.py [--rounds 3]
Writes a 124M-shaped GPT-2 (tied head, qkv bias, GPT-2's initialisation) with ``save_hf_gpt2`` to a
temporary folder, then loads it with ``load_gpt2`` once per reader and round, each load in a fresh
Python process, and prints the median wall time of the load and the median rise of the process's peak
resident memory (VmHWM, which counts the pages of a memory-mapped file that were touched too). ``safe_open`` hands out
views of its memory-mapped file; "safe_open, copied" clones each, so the model owns its memory as it
does with the helpers reader.
Readers alternate within each round, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine
from safetensors import safe_open

import helpers.weights
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel, init_gpt2_weights
from helpers.weights import load_gpt2, save_hf_gpt2

READERS = ("helpers reader", "safe_open", "safe_open, copied")


class SafeOpenTensors:
    """``helpers.weights``' reader interface served by ``safetensors.safe_open(...).get_tensor``."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[object, str]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            self.metadata.update(handle.metadata() or {})
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                self.where[key.removeprefix("transformer.")] = (handle, key)

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> list[int]:
        handle, key = self.where[name]
        return list(handle.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle, key = self.where[name]
        return handle.get_tensor(key)


class CopiedSafeOpenTensors(SafeOpenTensors):
    """As ``SafeOpenTensors``, but every tensor gets memory of its own instead of a view of the mapped file."""

    def get(self, name: str) -> torch.Tensor:
        return super().get(name).clone()


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(reader: str, folder: str) -> None:
    """Load ``folder`` once with ``reader``; print seconds and peak-RSS rise as JSON."""
    if reader != READERS[0]:
        helpers.weights._Tensors = SafeOpenTensors if reader == "safe_open" else CopiedSafeOpenTensors
    before = _peak_rss_mib()
    start = time.perf_counter()
    model = load_gpt2(folder)
    seconds = time.perf_counter() - start
    rise = _peak_rss_mib() - before
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"seconds": seconds, "rise_mib": rise, "weights_mib": weights_mib}))


def _one_load(reader: str, folder: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", reader, folder], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("READER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.manual_seed(0)
    cfg = GPTConfig(**{**GPT_CONFIGS["gpt2"].to_dict(), "qkv_bias": True, "tie_weights": True})
    results: dict[str, list[dict]] = {reader: [] for reader in READERS}
    with tempfile.TemporaryDirectory() as folder:
        save_hf_gpt2(init_gpt2_weights(GPTModel(cfg)), folder)
        file_mib = (Path(folder) / "model.safetensors").stat().st_size / 2**20
        for _ in range(args.rounds):
            for reader in READERS:
                results[reader].append(_one_load(reader, folder))
    weights_mib = results[READERS[0]][0]["weights_mib"]
    print(f"machine: {machine()}")
    print(f"GPT-2 124M shape, tied, float32: {weights_mib:,.0f} MiB of weights, file {file_mib:,.0f} MiB "
          f"(in the page cache); median of {args.rounds} loads, each in a fresh process\n")
    print("| reader | load seconds (min-max) | peak RSS rise, MiB (min-max) | rise / weights |")
    print("| --- | --- | --- | --- |")
    for reader, rows in results.items():
        seconds = sorted(row["seconds"] for row in rows)
        rise = sorted(row["rise_mib"] for row in rows)
        print(f"| {reader} | {statistics.median(seconds):.2f} ({seconds[0]:.2f}-{seconds[-1]:.2f}) | "
              f"{statistics.median(rise):,.0f} ({rise[0]:,.0f}-{rise[-1]:,.0f}) | "
              f"{statistics.median(rise) / weights_mib:.2f}x |")


if __name__ == "__main__":
    main()
