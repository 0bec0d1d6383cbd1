"""Training-step throughput (forward, loss, backward, AdamW) of GPTModel against transformers' GPT-2.

Usage: python benchmarks/train_step.py [--rounds 5] [--layers 4 --heads 4 --width 256 --context 256 --batch 8]
Both models have the same shape, weights tied, qkv bias on. Ours computes the loss with
helpers.train.calc_loss_batch (chunked cross-entropy, no full logits); transformers computes
the logits and then F.cross_entropy. Also shown: ours through full logits + F.cross_entropy, to
separate the loss path from the rest. Timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from _common import interleaved, print_report

from helpers.model import GPTConfig, GPTModel
from helpers.train import calc_loss_batch
from helpers.weights import save_hf_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPTConfig(context_length=args.context, emb_dim=args.width, n_heads=args.heads, n_layers=args.layers,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True)
    ours = GPTModel(cfg).train()
    ours_logits_path = GPTModel(cfg).train()
    with tempfile.TemporaryDirectory() as folder:
        save_hf_gpt2(ours, folder)
        reference = GPT2LMHeadModel.from_pretrained(folder).train()
    inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.context))
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.context))

    def step_fn(model, loss_fn):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    candidates = {
        "helpers GPTModel + calc_loss_batch": step_fn(ours, lambda m: calc_loss_batch(inputs, targets, m, "cpu")),
        "helpers GPTModel, full logits + F.cross_entropy": step_fn(
            ours_logits_path, lambda m: F.cross_entropy(m(inputs).flatten(0, 1), targets.flatten())),
        "transformers GPT2LMHeadModel, logits + F.cross_entropy": step_fn(
            reference, lambda m: F.cross_entropy(m(inputs).logits.flatten(0, 1), targets.flatten())),
    }
    times = interleaved(candidates, rounds=args.rounds)
    tokens = args.batch * args.context
    base = times["transformers GPT2LMHeadModel, logits + F.cross_entropy"]
    print_report(f"shape: {args.layers} layers, {args.heads} heads, width {args.width}, context {args.context}, "
                 f"batch {args.batch} ({tokens:,} tokens per step), AdamW, float32",
                 ["training step", "tokens/s", "vs transformers"],
                 [[name, f"{tokens / seconds:,.0f}", f"{base / seconds:.2f}x"] for name, seconds in times.items()])


if __name__ == "__main__":
    main()
