"""The model behind a chat server: ``ChatModel`` (what a server needs) and ``load_chat_model(spec)``.

A chat server needs five things from a model, and nothing else: the network, its tokenizer, how a
conversation becomes the prompt the model was trained on, the token ids that end an answer, and a name
to report. ``ChatModel`` holds exactly those; ``helpers.serve`` takes one. ``load_chat_model`` builds
one from what ``python -m helpers.chat`` loads (a GPT-2 name such as ``gpt2-medium``, a folder in GPT-2's
Hugging Face layout written by ``save_hf_gpt2``) and from a ``save_checkpoint`` folder of either
architecture (``GPTModel`` or Part 10's ``ModernModel``). All of them use GPT-2's tokenizer and the
Alpaca-style prompt of Part 09's instruction finetuning (``alpaca_prompt``).

Another family plugs in by building its own ``ChatModel``: a model with its own template and tokenizer
passes its ``format_prompt`` (a ChatML template, say) and the id of its end-of-turn token in
``stop_ids``, and adds a branch to ``load_chat_model`` for the specs it recognises. A template whose
markers are special tokens (``<|im_start|>``) that user text must not forge overrides
``encode_prompt`` in a subclass; the default encodes the whole prompt as ordinary text.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from helpers.instruct import PROMPT_PREAMBLE, RESPONSE_HEADER
from helpers.tokenizers import encode_user_text

__all__ = ["NAMED_CHAT_MODELS", "ROLES", "ChatModel", "ChatModelError", "Message", "alpaca_prompt", "load_chat_model"]

NAMED_CHAT_MODELS = {"smollm2": "helpers.smollm2:smollm2_chat_model"}
"""Model names ``load_chat_model`` knows besides GPT-2's -> the ``"module:function"`` that builds their ``ChatModel``
(a later part's module, imported on first use: ``smollm2`` is Part 11's SmolLM2-135M-Instruct, from its wheel)."""

Message = dict[str, str]
"""One turn of a conversation: ``{"role": "system" | "user" | "assistant", "content": "..."}``."""

ROLES = ("system", "user", "assistant")
"""The roles a conversation's messages may have (a server maps OpenAI's ``developer`` to ``system``)."""


class ChatModelError(ValueError):
    """A model cannot be loaded for chatting, or a conversation cannot become its prompt; the message says why."""


@dataclass(frozen=True)
class ChatModel:
    """What a chat server needs to answer conversations with one model.

    ``model`` takes ``(batch, n_tokens)`` ids and returns logits (``GPTModel``, ``ModernModel``, or any
    module with a ``cfg.context_length``); ``tokenizer`` has ``encode`` and either ``decode`` or tiktoken's
    ``decode_single_token_bytes`` (for streaming piece by piece); ``format_prompt`` turns the messages
    into the prompt text (raising ``ChatModelError`` for a conversation it cannot format); ``stop_ids``
    are the token ids that end an answer (not part of it); ``name`` is what ``/v1/models`` reports.
    """

    name: str
    model: nn.Module
    tokenizer: object
    format_prompt: Callable[[Sequence[Message]], str]
    stop_ids: frozenset[int]

    @property
    def context_length(self) -> int:
        """The most tokens the model sees: prompt and answer together."""
        return self.model.cfg.context_length

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The prompt's token ids for ``messages``: ``format_prompt``'s text encoded as ordinary text.

        A message holding ``<|endoftext|>`` stays characters (``encode_user_text``), so it cannot end the
        prompt early. Override this for a template whose own markers must be special tokens.
        """
        return encode_user_text(self.tokenizer, self.format_prompt(messages))


def alpaca_prompt(messages: Sequence[Message]) -> str:
    """The Alpaca-style prompt (Part 09) for a conversation that ends with the user's message.

    One user message gives exactly the prompt ``python -m helpers.chat`` builds: the preamble, the
    instruction and the ``### Response:`` header. Earlier turns come before it as instruction and
    response blocks, in order; system messages, joined, replace the preamble.
    """
    if not messages or messages[-1]["role"] != "user":
        raise ChatModelError("the last message must be the user's (role 'user'): the model answers it")
    system = [message["content"] for message in messages if message["role"] == "system"]
    prompt = "\n\n".join(system) if system else PROMPT_PREAMBLE
    for message in messages:
        if message["role"] == "user":
            prompt += f"\n\n### Instruction:\n{message['content']}"
        elif message["role"] == "assistant":
            prompt += RESPONSE_HEADER + message["content"]
    return prompt + RESPONSE_HEADER


def load_chat_model(spec: str | os.PathLike, device: torch.device | str | None = None) -> ChatModel:
    """A ``ChatModel`` (in eval mode, on ``device``, default the CPU) for a GPT-2 name or a model folder.

    ``spec`` is one of ``helpers.weights.GPT2_NAMES`` (downloaded once from the hub), a name of
    ``NAMED_CHAT_MODELS`` (``smollm2``: its own tokenizer and chat template), a folder or
    ``.safetensors`` file that ``load_gpt2`` reads, or a ``save_checkpoint`` folder (one with a
    ``model.state.pt``) of either architecture. Raises ``ChatModelError`` naming ``spec`` when it is none of
    these or its model's vocabulary cannot hold GPT-2's tokens; ``load_gpt2``'s and ``load_checkpoint``'s
    own errors (``WeightsError``, ``CheckpointError``, ``OSError``) pass through.
    """
    from helpers.checkpoint import checkpoint_paths
    from helpers.tokenizers import gpt2_tokenizer
    from helpers.weights import GPT2_NAMES, load_gpt2

    if str(spec) in NAMED_CHAT_MODELS:
        module, function = NAMED_CHAT_MODELS[str(spec)].split(":")
        return getattr(importlib.import_module(module), function)(device=device)
    path = Path(spec)
    if path.exists():
        state_file = checkpoint_paths(path)[1]
        model = _load_checkpoint_model(path, device) if state_file.is_file() else load_gpt2(path, device=device)
        name = (path.parent if path.suffix == ".safetensors" else path).resolve().name
    elif str(spec) in GPT2_NAMES:
        model, name = load_gpt2(str(spec), device=device), str(spec)
    else:
        raise ChatModelError(f"{str(spec)!r} is neither a model folder nor a model name ({', '.join(GPT2_NAMES)}, "
                             f"{', '.join(NAMED_CHAT_MODELS)}); pass a folder written by save_hf_gpt2 or "
                             "save_checkpoint")
    tokenizer = gpt2_tokenizer()
    if model.cfg.vocab_size < tokenizer.n_vocab:
        raise ChatModelError(f"{spec}: the model has {model.cfg.vocab_size} token ids but GPT-2's tokenizer needs "
                             f"{tokenizer.n_vocab}; it was trained with another tokenizer, which this loader cannot "
                             "pick up: build a ChatModel with that tokenizer yourself")
    return ChatModel(name=name, model=model.eval(), tokenizer=tokenizer, format_prompt=alpaca_prompt,
                     stop_ids=frozenset({tokenizer.eot_token}))


def _load_checkpoint_model(path: Path, device: torch.device | str | None) -> nn.Module:
    """The model of a ``save_checkpoint`` folder, whichever architecture it records."""
    from helpers.checkpoint import load_checkpoint, model_from_config, read_arch, read_config

    config = read_config(path)
    if config is None:
        raise ChatModelError(f"{path} holds no model config (it was saved without one), so the model to build "
                             "is unknown; save it again with save_checkpoint from a GPTModel or ModernModel")
    model = model_from_config(config, read_arch(path)).to(device or "cpu")
    load_checkpoint(path, model)
    return model
