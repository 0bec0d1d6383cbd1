"""Classification finetuning: one epoch with per-batch padding against padding to the dataset's longest message.

Usage: python benchmarks/classify_padding.py [--rounds 2] [--layers 4 --heads 4 --width 256 --batch 8]
                                             [--trainable-blocks all|N] [--max-batches N]
The train split of the SMS spam data (1,045 messages), the same shuffled order for both, a small
GPTModel with a 2-way head (helpers.classify.prepare_for_classification), AdamW, float32. The book
pads every message to the longest of the dataset; helpers.classify pads each batch to its own
longest. Both read the class at the last real token, so they compute the same predictions (checked
before timing). Epochs are timed in alternation; each number is the median of the rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import print_report

from helpers.classify import (
    SpamDataset,
    calc_loss_batch,
    class_logits,
    classification_loader,
    count_trainable_parameters,
    load_spam_splits,
    prepare_for_classification,
)
from helpers.model import GPTConfig, GPTModel
from helpers.tokenizers import gpt2_tokenizer


def epoch_runner(model, loader, max_batches: int | None):
    """A function that trains ``model`` for one epoch of ``loader`` (or ``max_batches`` batches)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)

    def run() -> None:
        model.train()
        for index, (inputs, labels) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            optimizer.zero_grad(set_to_none=True)
            calc_loss_batch(inputs, labels, model, "cpu").backward()
            optimizer.step()
    return run


def padded_tokens(loader, max_batches: int | None) -> int:
    """Token positions the model processes in one epoch of ``loader``, padding included."""
    return sum(inputs.numel() for index, (inputs, _) in enumerate(loader)
               if max_batches is None or index < max_batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trainable-blocks", default="all", help="'all' or how many of the last blocks train")
    parser.add_argument("--max-batches", type=int, default=None, help="time only this many batches per epoch")
    args = parser.parse_args()
    trainable = None if args.trainable_blocks == "all" else int(args.trainable_blocks)

    train_df, _, _ = load_spam_splits()
    dataset = SpamDataset(train_df, gpt2_tokenizer())
    loaders = {  # the same shuffled order for both: a generator seeded alike
        "per batch (helpers)": classification_loader(dataset, args.batch, shuffle=True, drop_last=True,
                                                     generator=torch.Generator().manual_seed(0)),
        f"dataset's longest, {dataset.longest} tokens (book)": classification_loader(
            dataset, args.batch, shuffle=True, drop_last=True, pad_to=dataset.longest,
            generator=torch.Generator().manual_seed(0)),
    }
    torch.manual_seed(123)
    cfg = GPTConfig(context_length=1024, emb_dim=args.width, n_heads=args.heads, n_layers=args.layers, drop_rate=0.0)
    base = prepare_for_classification(GPTModel(cfg), trainable_blocks=trainable)

    # the same predictions either way: one batch, eval mode
    (short, _), (wide, _) = (next(iter(loader)) for loader in loaders.values())
    with torch.no_grad():
        torch.testing.assert_close(class_logits(base.eval(), short), class_logits(base, wide), rtol=1e-4, atol=1e-4)

    runners = {name: epoch_runner(copy.deepcopy(base), loader, args.max_batches) for name, loader in loaders.items()}
    for loader in loaders.values():  # warm-up: a few batches of each, on a throwaway copy
        epoch_runner(copy.deepcopy(base), loader, 3)()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = {name: padded_tokens(loader, args.max_batches) for name, loader in loaders.items()}
    book = list(medians)[1]
    print_report(f"model: {args.layers} layers, {args.heads} heads, width {args.width}, trainable blocks "
                 f"{args.trainable_blocks} ({count_trainable_parameters(base):,} trainable parameters); "
                 f"batch {args.batch}, {len(dataset):,} messages, {args.rounds} rounds",
                 ["padding", "token positions per epoch", "seconds per epoch", "speed-up"],
                 [[name, f"{tokens[name]:,}", f"{seconds:.1f}", f"{medians[book] / seconds:.2f}x"]
                  for name, seconds in medians.items()])


if __name__ == "__main__":
    main()
