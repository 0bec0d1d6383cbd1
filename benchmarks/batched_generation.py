"""Answering the instruction test split: one entry at a time, equal-length batches, and left-padded batches (Part 09).

Usage: python benchmarks/batched_generation.py [--new-tokens 16] [--entries 64] [--batch-sizes 8 32]
       [--rounds 1] [--width 256] [--layers 4] [--device cpu] [--threads N]

Three ways to answer the same entries greedily with the KV cache:

- one at a time: ``generate_responses(..., batch_size=1)``;
- equal-length batches: ``generate_responses(..., batch_size=n)`` as it is today, which batches only
  entries whose prompts have the same number of tokens (no padding, no attention mask);
- left-padded batches: the prompts sorted by length, cut into batches of n and answered by
  ``helpers.generate.generate_batch`` (padding on the left, hidden by the attention mask); the answers
  are decoded as ``generate_responses`` decodes them. This is what ``generate_responses`` would do with
  ``generate_batch``.

Every way's answers are checked against one at a time before the table is printed. The model is
GPT-2-shaped but small, with random weights (GPT-2's initialisation); such a model never emits
end-of-text, so every answer runs to ``--new-tokens``: no row leaves its batch early, the case most
favourable to equal-length batches and neutral to left-padded ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from _common import print_report, random_gpt2

from helpers.generate import generate_batch
from helpers.instruct import RESPONSE_HEADER, format_input, generate_responses, load_instruction_splits
from helpers.model import GPTConfig, GPTModel, count_parameters
from helpers.runtime import eval_mode
from helpers.tokenizers import gpt2_tokenizer

EOS_ID = 50256


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_gpt2(args.width, args.layers, args.device)
    cfg = model.cfg
    tokenizer = gpt2_tokenizer()
    entries = load_instruction_splits()[1][: args.entries]
    prompts = [tokenizer.encode(format_input(entry) + RESPONSE_HEADER) for entry in entries]

    candidates: dict[str, Callable[[], list[str]]] = {
        "one at a time": lambda: responses(generate_responses(model, tokenizer, entries, args.new_tokens,
                                                              batch_size=1, progress=False))}
    for size in args.batch_sizes:
        candidates[f"equal-length batches of <= {size}"] = (
            lambda size=size: responses(generate_responses(model, tokenizer, entries, args.new_tokens,
                                                           batch_size=size, progress=False)))
    for size in args.batch_sizes:
        candidates[f"left-padded batches of {size}"] = (
            lambda size=size: answer_left_padded(model, tokenizer, prompts, args.new_tokens, size))

    answer_left_padded(model, tokenizer, prompts[:2], 2, 2)  # warm-up
    walls, cpus, answers = measure(candidates, args.rounds)
    reference = answers["one at a time"]
    same = all(result == reference for result in answers.values())
    lengths = [len(ids) for ids in prompts]
    print_report(describe(model, cfg, args, lengths, same), ["answering", "wall s", "entries/s", "speed-up",
                                                             "CPU s", "speed-up in CPU time"],
                 [[name, f"{walls[name]:.2f}", f"{len(entries) / walls[name]:.2f}",
                   f"{walls['one at a time'] / walls[name]:.2f}x", f"{cpus[name]:.2f}",
                   f"{cpus['one at a time'] / cpus[name]:.2f}x"] for name in candidates])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--entries", type=int, default=64, help="how many test-split entries to answer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def answer_left_padded(model: GPTModel, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Answers as ``generate_responses`` decodes them, from left-padded batches of prompts of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    answers = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            new_ids = generate_batch(model, [prompts[i] for i in group], max_new_tokens, pad_id=EOS_ID,
                                     eos_id=EOS_ID)
            for i, ids in zip(group, new_ids):
                answers[i] = tokenizer.decode([t for t in ids if t != EOS_ID]).strip()
    return answers


def responses(results: list[dict]) -> list[str]:
    return [result["model_response"] for result in results]


def measure(candidates: dict[str, Callable[[], list[str]]],
            rounds: int) -> tuple[dict[str, float], dict[str, float], dict[str, list[str]]]:
    """Median wall and CPU seconds of each candidate, timed in alternation, and its answers."""
    walls: dict[str, list[float]] = {name: [] for name in candidates}
    cpus: dict[str, list[float]] = {name: [] for name in candidates}
    answers: dict[str, list[str]] = {}
    for _ in range(rounds):  # interleaved: drift on a shared machine hits every candidate alike
        for name, run in candidates.items():
            (wall, cpu), answers[name] = timed(run)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return ({name: statistics.median(values) for name, values in walls.items()},
            {name: statistics.median(values) for name, values in cpus.items()}, answers)


def timed(run: Callable[[], list[str]]) -> tuple[tuple[float, float], list[str]]:
    """Wall-clock and CPU seconds of one call of ``run`` (CPU time moves less on a busy machine), and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start, time.process_time() - start_cpu), result


def padding_share(lengths: list[int], batch_size: int) -> float:
    """The share of prompt positions that are padding when length-sorted prompts are batched batch_size at a time."""
    ordered = sorted(lengths)
    batches = [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]
    padded = sum(max(batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / padded


def describe(model: GPTModel, cfg: GPTConfig, args: argparse.Namespace, lengths: list[int], same: bool) -> str:
    counts = Counter(lengths)
    padding = ", ".join(f"{padding_share(lengths, size):.1%} in batches of {size}" for size in args.batch_sizes)
    return (f"model: {count_parameters(model) / 1e6:.1f}M parameters (width {cfg.emb_dim}, {cfg.n_layers} layers, "
            f"tied head), {args.device}; {len(lengths)} test entries, prompts of {min(lengths)}-{max(lengths)} "
            f"tokens (mean {statistics.mean(lengths):.0f}) in {len(counts)} distinct lengths (largest group "
            f"{max(counts.values())}); {args.new_tokens} new tokens each, greedy, {args.rounds} round(s)\n"
            f"left padding (prompts sorted by length): {padding} of the prompt positions\n"
            f"answers identical to one at a time: {same}")


if __name__ == "__main__":
    main()
