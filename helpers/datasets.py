"""Sliding-window next-token datasets and loaders (Part 02)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from helpers.runtime import check_count

__all__ = ["GPTDataset", "create_dataloader"]


class GPTDataset(Dataset):
    """Input/target windows over a token sequence; the target is the input shifted by one token.

    Window ``i`` starts at token ``i * stride``; there is one window for every start that leaves
    ``max_length + 1`` tokens (the input and its last target).
    """

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, max_length: int, stride: int):
        check_count("max_length", max_length, 1)
        check_count("stride", stride, 1)
        self.token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        self.max_length = max_length
        self.stride = stride
        n_tokens = len(self.token_ids)
        if n_tokens <= max_length:
            raise ValueError(
                f"the text has {n_tokens} tokens, too few for one window of max_length={max_length} "
                f"(a window needs max_length + 1 = {max_length + 1} tokens); use more text or a smaller max_length"
            )
        self.n_windows = (n_tokens - max_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n_windows <= index < self.n_windows:
            raise IndexError(f"window {index} out of range for {self.n_windows} windows")
        start = (index % self.n_windows) * self.stride
        chunk = self.token_ids[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      tokenizer=None, seed: int | None = None) -> DataLoader:
    """Tokenize ``text`` (GPT-2's BPE unless ``tokenizer`` is given) and batch its sliding windows.

    Each batch is a pair of ``(batch_size, max_length)`` long tensors: inputs and targets. With
    ``seed``, the shuffling order is fixed by that seed instead of PyTorch's global generator.
    ``<|endoftext|>`` in the text becomes its special id where the tokenizer has one.
    """
    for name, value, smallest in [("batch_size", batch_size, 1), ("max_length", max_length, 1),
                                  ("stride", stride, 1), ("num_workers", num_workers, 0)]:
        check_count(name, value, smallest)
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    from helpers.tokenizers import encode_with_endoftext, gpt2_tokenizer

    if tokenizer is None:
        tokenizer = gpt2_tokenizer()
    dataset = GPTDataset(encode_with_endoftext(tokenizer, text), max_length, stride)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
