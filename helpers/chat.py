"""A terminal chat with an instruction-finetuned model (Part 09): ``python -m helpers.chat --model DIR``.

Each message is wrapped in the Alpaca-style prompt (``helpers.instruct.format_input``) and the answer
is printed token by token as ``stream_generate`` produces it. Ctrl-D or Ctrl-C ends the chat.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Sequence
from typing import TextIO

import torch
from torch import nn

from helpers.generate import stream_generate
from helpers.instruct import RESPONSE_HEADER, format_input
from helpers.runtime import eval_mode

__all__ = ["PROMPT_MARKER", "TokenTextStream", "answer", "chat", "main", "stream_generate"]

PROMPT_MARKER = ">>> "
_EOS_ID = 50256


class TokenTextStream:
    """Turns token ids into text piece by piece, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (empty while a multi-byte character is still incomplete)."""
        single = getattr(self.tokenizer, "decode_single_token_bytes", None)
        data = single(token_id) if single is not None else self.tokenizer.decode([token_id]).encode("utf-8")
        return self.decoder.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end of the answer (a replacement character for an incomplete one)."""
        return self.decoder.decode(b"", final=True)


def answer(model: nn.Module, tokenizer, message: str, out: TextIO, *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> str:
    """Write the model's answer to ``message`` to ``out`` as it is generated; return the whole answer."""
    prompt = format_input({"instruction": message, "input": ""}) + RESPONSE_HEADER
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    text = TokenTextStream(tokenizer)
    pieces = []
    for token in stream_generate(model, idx, max_new_tokens, temperature, top_k, top_p, _EOS_ID,
                                 generator=generator):
        pieces.append(text.push(token))
        out.write(pieces[-1])
        out.flush()
    pieces.append(text.flush())
    out.write(pieces[-1] + "\n")
    out.flush()
    return "".join(pieces)


def chat(model: nn.Module, tokenizer, stdin: TextIO, stdout: TextIO, **options) -> None:
    """Read messages from ``stdin`` until it ends and answer each on ``stdout`` (``options`` go to ``answer``)."""
    with eval_mode(model):
        while True:
            stdout.write(PROMPT_MARKER)
            stdout.flush()
            line = stdin.readline()
            if not line:  # end of input (Ctrl-D)
                stdout.write("\n")
                return
            message = line.strip()
            if message in {"/exit", "/quit"}:
                return
            if message:
                answer(model, tokenizer, message, stdout, **options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a folder written by helpers.weights.save_hf_gpt2, or a GPT-2 name such as gpt2-medium")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the top-p nucleus")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag whose value cannot work."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chat; return the exit status (0 at the end of input, 1 for a bad model, 2 for bad options)."""
    args = _parser().parse_args(argv)
    try:
        _validate(args)
    except ValueError as error:
        print(f"helpers.chat: {error}", file=sys.stderr)
        return 2
    from helpers import runtime
    from helpers.tokenizers import gpt2_tokenizer
    from helpers.weights import load_gpt2

    try:
        model = load_gpt2(args.model, device=args.device or runtime.device())
        tokenizer = gpt2_tokenizer()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"helpers.chat: cannot load the model {args.model!r}: {error}", file=sys.stderr)
        return 1
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    print(f"Chatting with {args.model}. Type a message and press Enter; Ctrl-D or /exit ends.", file=sys.stderr)
    try:
        chat(model, tokenizer, sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    except KeyboardInterrupt:
        print(file=sys.stdout)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
