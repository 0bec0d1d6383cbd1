"""Evaluating language models (Part 08, used again in Part 09): perplexity, next-token accuracy, samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from helpers.generate import generate, text_to_token_ids, token_ids_to_text
from helpers.runtime import eval_mode
from helpers.train import calc_loss_batch

__all__ = ["compare_samples", "loader_loss", "next_token_accuracy", "perplexity"]


def _batches(loader: Iterable, num_batches: int | None):
    for index, batch in enumerate(loader):
        if num_batches is not None and index >= num_batches:
            return
        yield batch


@torch.no_grad()
def loader_loss(model: nn.Module, loader: Iterable, device: torch.device | str,
                num_batches: int | None = None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over a loader's batches, and the number of tokens scored."""
    total, count = 0.0, 0
    with eval_mode(model):
        for inputs, targets in _batches(loader, num_batches):
            n_tokens = int((targets != -100).sum())
            if n_tokens == 0:  # e.g. a window holding only a masked prompt: nothing to score
                continue
            total += calc_loss_batch(inputs, targets, model, device).item() * n_tokens
            count += n_tokens
    if count == 0:
        raise ValueError("the loader yielded no tokens to score (is it empty, or drop_last with too little data?)")
    return total / count, count


def perplexity(model: nn.Module, loader: Iterable, device: torch.device | str, num_batches: int | None = None) -> float:
    """exp(mean cross-entropy per token): the model is as unsure as a uniform choice among this many tokens."""
    loss, _ = loader_loss(model, loader, device, num_batches)
    return math.exp(loss)


@torch.no_grad()
def next_token_accuracy(model: nn.Module, loader: Iterable, device: torch.device | str,
                        num_batches: int | None = None) -> float:
    """Share of positions where the most likely next token (argmax) is the actual next token."""
    correct, count = 0, 0
    with eval_mode(model):
        for inputs, targets in _batches(loader, num_batches):
            inputs, targets = inputs.to(device), targets.to(device)
            predictions = model(inputs).argmax(dim=-1)
            scored = targets != -100
            correct += int(((predictions == targets) & scored).sum())
            count += int(scored.sum())
    if count == 0:
        raise ValueError("the loader yielded no tokens to score")
    return correct / count


def compare_samples(models: Mapping[str, nn.Module], prompts: Sequence[str], tokenizer, max_new_tokens: int = 30,
                    device: torch.device | str = "cpu", seed: int | None = 123, **generate_kwargs):
    """Generate from every model for every prompt; return a pandas DataFrame (prompts x models) of continuations.

    Each model starts from the same ``seed`` (when sampling), so the columns differ only by model.
    """
    import pandas as pd

    table: dict[str, list[str]] = {name: [] for name in models}
    for name, model in models.items():
        with eval_mode(model):
            for prompt in prompts:
                if seed is not None:
                    torch.manual_seed(seed)
                idx = text_to_token_ids(prompt, tokenizer).to(device)
                out = generate(model, idx, max_new_tokens, **generate_kwargs)
                table[name].append(token_ids_to_text(out[:, idx.shape[1]:], tokenizer))
    return pd.DataFrame(table, index=pd.Index(prompts, name="prompt"))
