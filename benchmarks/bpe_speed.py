"""Encoding speed of the from-scratch BPETokenizer against tiktoken, on the same text.

Usage: python benchmarks/bpe_speed.py   (needs the data files: set LLM_DATA_MIRROR offline)
Prints two markdown tables: MB/s of each on prose (cold and warm chunk cache), and seconds for one
run of 30,000 letters without a space (a single pre-tokenized chunk: the merge loop's worst case).
"""

from __future__ import annotations

import random
import string

from _common import interleaved, machine

from helpers.data import read_text
from helpers.tokenizers import BPETokenizer, gpt2_tokenizer

LONG_RUN = 30_000


def long_runs(reference) -> dict[str, str]:
    """Three runs of LONG_RUN letters: random letters, GPT-2's letter-only tokens glued, one letter repeated."""
    rng = random.Random(0)
    words = [reference.decode_single_token_bytes(token) for token in range(reference.n_vocab - 1)]
    words = sorted(word.decode("ascii") for word in words if word.isascii() and word.isalpha())
    rng.shuffle(words)
    return {
        "random letters": "".join(rng.choice(string.ascii_letters) for _ in range(LONG_RUN)),
        "GPT-2 words glued": "".join(words)[:LONG_RUN],
        "one letter repeated": "a" * LONG_RUN,
    }


def cold(tokenizer: BPETokenizer, text: str):
    def run():
        tokenizer._cache.clear()
        return tokenizer.encode_ordinary(text)

    return run


def main() -> None:
    text = read_text("tinyshakespeare") + read_text("the-verdict")
    reference = gpt2_tokenizer()
    ours = BPETokenizer.from_gpt2()
    n_bytes = len(text.encode("utf-8"))
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text), "the tokenizers disagree"
    prose = interleaved({"cold": cold(ours, text), "warm": lambda: ours.encode_ordinary(text),
                         "tiktoken": lambda: reference.encode_ordinary(text)}, rounds=3)
    runs = long_runs(reference)
    for name, run in runs.items():
        assert ours.encode_ordinary(run) == reference.encode_ordinary(run), f"the tokenizers disagree on {name}"
    run_seconds = {}
    for name, run in runs.items():
        candidates = {"ours": cold(ours, run), "tiktoken": lambda run=run: reference.encode_ordinary(run)}
        run_seconds[name] = interleaved(candidates, rounds=3)

    print(f"machine: {machine()}")
    print(f"text: tinyshakespeare + the-verdict, {n_bytes / 1e6:.2f} MB, {len(reference.encode_ordinary(text)):,} "
          "tokens (identical ids)\n")
    print("| case | BPETokenizer MB/s | tiktoken MB/s | tiktoken / ours |")
    print("| --- | --- | --- | --- |")
    for label, key in (("cold (empty chunk cache)", "cold"), ("warm (chunks seen before)", "warm")):
        ours_speed, tiktoken_speed = n_bytes / 1e6 / prose[key], n_bytes / 1e6 / prose["tiktoken"]
        print(f"| {label} | {ours_speed:.2f} | {tiktoken_speed:.2f} | {tiktoken_speed / ours_speed:.1f}x |")
    print(f"\none run of {LONG_RUN:,} letters without a space (identical ids), cold cache\n")
    print("| run | BPETokenizer s | tiktoken s | ours / tiktoken |")
    print("| --- | --- | --- | --- |")
    for name, seconds in run_seconds.items():
        ratio = seconds["ours"] / seconds["tiktoken"]
        print(f"| {name} | {seconds['ours']:.3f} | {seconds['tiktoken']:.4f} | {ratio:.0f}x |")


if __name__ == "__main__":
    main()
