"""Answering the instruction test split: one entry at a time against batches of equal-length prompts (Part 09).

Usage: python benchmarks/batched_generation.py [--new-tokens 16] [--entries 48] [--batch-sizes 4 8]
       [--rounds 1] [--width 256] [--layers 4] [--device cpu]

``helpers.instruct.generate_responses`` groups entries whose prompts have the same number of tokens and
answers each group as one batch: no padding, so no attention mask is needed and the greedy answers are
exactly those of one at a time (checked here before timing). The model is GPT-2-shaped but small, with
random weights (GPT-2's initialisation); such a model never emits end-of-text, so every answer runs to
``--new-tokens``, which is the case most favourable to batching (a trained model's batch waits for its
longest answer).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from _common import machine

from helpers.instruct import RESPONSE_HEADER, format_input, generate_responses, load_instruction_splits
from helpers.model import GPTConfig, GPTModel, count_parameters, init_gpt2_weights
from helpers.tokenizers import gpt2_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--entries", type=int, default=48, help="how many test-split entries to answer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = GPTConfig(context_length=512, emb_dim=args.width, n_heads=max(1, args.width // 64), n_layers=args.layers,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True)
    model = init_gpt2_weights(GPTModel(cfg)).to(args.device).eval()
    tokenizer = gpt2_tokenizer()
    entries = load_instruction_splits()[1][: args.entries]
    lengths = Counter(len(tokenizer.encode(format_input(e) + RESPONSE_HEADER)) for e in entries)

    def answer(batch_size: int):
        return lambda: generate_responses(model, tokenizer, entries, args.new_tokens, batch_size=batch_size,
                                          progress=False)

    generate_responses(model, tokenizer, entries[:2], 2, progress=False)  # warm-up
    sizes = [1, *args.batch_sizes]
    walls, cpus, answers = {size: [] for size in sizes}, {size: [] for size in sizes}, {}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every candidate alike
        for size in sizes:
            (wall, cpu), answers[size] = timed(answer(size))
            walls[size].append(wall)
            cpus[size].append(cpu)
    same = {size: answers[size] == answers[1] for size in args.batch_sizes}
    times = {size: statistics.median(values) for size, values in walls.items()}
    cpu_times = {size: statistics.median(values) for size, values in cpus.items()}
    print(f"machine: {machine()}")
    print(f"model: {count_parameters(model) / 1e6:.1f}M parameters (width {cfg.emb_dim}, {cfg.n_layers} layers, "
          f"tied head), {args.device}; {len(entries)} test entries in {len(lengths)} distinct prompt lengths "
          f"(largest group {max(lengths.values())}); {args.new_tokens} new tokens each, greedy")
    print(f"answers identical to one at a time: {same}\n")
    print("| answering | wall s | entries/s | speed-up | CPU s | speed-up in CPU time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, seconds in times.items():
        name = "one at a time" if size == 1 else f"equal-length batches of <= {size}"
        print(f"| {name} | {seconds:.2f} | {len(entries) / seconds:.2f} | {times[1] / seconds:.2f}x | "
              f"{cpu_times[size]:.2f} | {cpu_times[1] / cpu_times[size]:.2f}x |")


def timed(run: Callable[[], list[dict]]) -> tuple[tuple[float, float], list[dict]]:
    """Wall-clock and CPU seconds of one call of ``run`` (CPU time moves less on a busy machine), and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start, time.process_time() - start_cpu), result

if __name__ == "__main__":
    main()
