"""Encoding speed of the from-scratch BPETokenizer against tiktoken, on the same text.

Usage: python benchmarks/bpe_speed.py   (needs the data files: set LLM_DATA_MIRROR offline)
Prints a markdown table: MB/s of each, and the ratio, for a cold cache and a warm one.
"""

from __future__ import annotations

import time

from _common import machine

from helpers.data import read_text
from helpers.tokenizers import BPETokenizer, gpt2_tokenizer


def megabytes_per_second(encode, text: str) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = encode(text)
    return len(text.encode("utf-8")) / 1e6 / (time.perf_counter() - start), ids


def main() -> None:
    text = read_text("tinyshakespeare") + read_text("the-verdict")
    tiktoken_encoding = gpt2_tokenizer()
    ours = BPETokenizer.from_gpt2()
    rows = []
    for label in ("cold (empty chunk cache)", "warm (chunks seen before)"):
        if label.startswith("cold"):
            ours._cache.clear()
        ours_speed, ours_ids = megabytes_per_second(ours.encode_ordinary, text)
        tiktoken_speed, tiktoken_ids = megabytes_per_second(tiktoken_encoding.encode_ordinary, text)
        assert ours_ids == tiktoken_ids, "the tokenizers disagree; the benchmark compares equal work only"
        rows.append((label, ours_speed, tiktoken_speed))
    print(f"machine: {machine()}")
    print(f"text: tinyshakespeare + the-verdict, {len(text.encode()) / 1e6:.2f} MB, {len(tiktoken_ids):,} tokens "
          "(identical ids)\n")
    print("| case | BPETokenizer MB/s | tiktoken MB/s | tiktoken / ours |")
    print("| --- | --- | --- | --- |")
    for label, ours_speed, tiktoken_speed in rows:
        print(f"| {label} | {ours_speed:.2f} | {tiktoken_speed:.2f} | {tiktoken_speed / ours_speed:.1f}x |")


if __name__ == "__main__":
    main()
