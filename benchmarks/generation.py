"""Generation speed: 200 new tokens from a 124M-shaped GPT-2, with and without the KV cache, and
against transformers' GPT2LMHeadModel.generate with the same weights.

Usage: python benchmarks/generation.py [--new-tokens 200] [--rounds 3]
All three are timed interleaved in one process (median of the rounds); greedy decoding, batch 1.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import interleaved, machine

from helpers.generate import generate
from helpers.model import GPT_CONFIGS, GPTModel, init_gpt2_weights
from helpers.weights import save_hf_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT_CONFIGS["gpt2"].__class__(**{**GPT_CONFIGS["gpt2"].to_dict(), "qkv_bias": True, "tie_weights": True,
                                           "drop_rate": 0.0})
    ours = init_gpt2_weights(GPTModel(cfg)).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_hf_gpt2(ours, folder)
        reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 8))
    n = args.new_tokens

    with torch.no_grad():
        cached = generate(ours, prompt, n, use_cache=True)
        hf = reference.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, attention_mask=torch.ones_like(prompt))
        same = torch.equal(cached, hf)
    times = interleaved({
        "helpers, KV cache": lambda: generate(ours, prompt, n, use_cache=True),
        "helpers, no cache": lambda: generate(ours, prompt, n, use_cache=False),
        "transformers generate": lambda: reference.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                                            do_sample=False, pad_token_id=0,
                                                            attention_mask=torch.ones_like(prompt)),
    }, rounds=args.rounds)
    print(f"machine: {machine()}")
    print(f"GPT-2 124M shape (random weights), prompt 8 tokens, {n} new tokens, greedy; "
          f"tokens identical to transformers: {same}\n")
    print("| generator | tokens/s | vs no cache | vs transformers |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {n / seconds:.1f} | {times['helpers, no cache'] / seconds:.2f}x | "
              f"{times['transformers generate'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
