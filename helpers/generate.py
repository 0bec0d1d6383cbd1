"""Text generation (Parts 06 and 07): greedy decoding, temperature, top-k and top-p sampling, KV cache."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn

from helpers.model import GPTModel, KVCache
from helpers.runtime import check_count
from helpers.tokenizers import encode_with_endoftext

__all__ = ["filter_logits", "generate", "next_token_logits", "sample_next_token", "stream_generate",
           "text_to_token_ids", "token_ids_to_text"]


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode ``text`` into a ``(1, n_tokens)`` tensor (``<|endoftext|>`` allowed where the tokenizer has it)."""
    return torch.tensor(encode_with_endoftext(tokenizer, text), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a ``(1, n_tokens)`` or ``(n_tokens,)`` tensor of ids back into text."""
    if token_ids.dim() == 2:
        if token_ids.shape[0] != 1:
            raise ValueError(f"expected one sequence, got a batch of {token_ids.shape[0]}; decode them one by one")
        token_ids = token_ids[0]
    return tokenizer.decode(token_ids.tolist())


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (not _is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Return ``logits / temperature`` with everything outside the top-k and the top-p nucleus set to -inf.

    ``softmax`` of the result is the distribution ``sample_next_token`` samples from (temperature > 0).
    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the most
    likely token always stays).
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        raise ValueError("temperature 0 means greedy decoding, which has no distribution to filter")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``(batch, vocab)``; return ids ``(batch, 1)``.

    Temperature 0 is greedy (argmax). Otherwise the logits go through ``filter_logits`` and one
    token is sampled from their softmax.
    """
    _check_sampling(temperature, top_k, top_p)
    _check_logits(logits, "sample_next_token")
    return _pick(logits, temperature, top_k, top_p, generator)


def _check_logits(logits: torch.Tensor, where: str) -> None:
    """Refuse logits that give no distribution: NaN, +inf, or a row that is -inf everywhere."""
    # one reduction: a row's max is NaN if it holds a NaN, +inf if it holds +inf, -inf if all are -inf
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        raise ValueError(
            f"{where}: the model produced NaN or infinite logits, so there is no next token to pick; "
            "its weights have probably diverged (NaN/inf parameters) or its input is out of range"
        )


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``idx`` ``(batch, n_tokens)`` by up to ``max_new_tokens``; return the whole sequences.

    The model sees at most ``context_size`` tokens (default: its ``cfg.context_length``); longer
    contexts are cropped to the most recent tokens. Generation stops early once every sequence has
    produced ``eos_id``; sequences that finished earlier are padded with ``eos_id``.

    With ``use_cache`` (``GPTModel`` only) the prompt is run once and every later step feeds only
    the new token, reusing cached keys and values; the tokens are the same as without the cache.
    When the context outgrows ``context_size`` the cache is rebuilt from the cropped window, since
    absolute position embeddings shift with the window.
    """
    _check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (batch, n_tokens) with at least one token, got shape {tuple(idx.shape)}")
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    if eos_id is not None and (not _is_integer(eos_id) or eos_id < 0):
        raise ValueError(f"eos_id must be a token id (an integer >= 0) or None, got {eos_id!r}")
    context_size = _context_size(model, context_size)
    use_cache = use_cache and isinstance(model, GPTModel)

    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    for step in range(max_new_tokens):
        logits, cache = next_token_logits(model, idx, cache, context_size, use_cache)
        _check_logits(logits, f"generate, step {step + 1} of {max_new_tokens}")
        next_token = _pick(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished[:, None], eos_id)
            finished |= next_token[:, 0] == eos_id
        idx = torch.cat([idx, next_token], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx


@torch.no_grad()
def stream_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    context_size: int | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``idx`` ``(1, n_tokens)``, one at a time.

    The same tokens ``generate`` produces with the same arguments, for a caller that shows each one as
    it comes (a chat). ``eos_id`` ends the stream and is not yielded.
    """
    _check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (1, n_tokens) with at least one token, got shape {tuple(idx.shape)}")
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    context_size = _context_size(model, context_size)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = next_token_logits(model, idx, cache, context_size, isinstance(model, GPTModel))
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and int(next_token) == eos_id:
            return
        yield int(next_token)
        idx = torch.cat([idx, next_token], dim=1)


def next_token_logits(model: nn.Module, idx: torch.Tensor, cache: KVCache | None, context_size: int,
                      use_cache: bool = True) -> tuple[torch.Tensor, KVCache | None]:
    """The logits ``(batch, vocab_size)`` for the token after ``idx``, and the cache to pass next time.

    Without ``use_cache`` the model sees the last ``context_size`` tokens. With it (``GPTModel`` only),
    an empty or full cache is (re)filled from that window, since absolute positions shift with the
    window; otherwise only the newest token goes through the model, reusing the cached keys and values.
    """
    if not use_cache:
        return model(idx[:, -context_size:])[:, -1, :], None
    if cache is None or cache.length >= context_size:  # (re)fill the cache from the window
        cache = model.new_kv_cache()
        return model(idx[:, -context_size:], cache)[:, -1, :], cache
    return model(idx[:, -1:], cache)[:, -1, :], cache


def _context_size(model: nn.Module, context_size: int | None) -> int:
    """The window the model sees: ``context_size``, checked against the model's, or the model's own."""
    model_context = getattr(getattr(model, "cfg", None), "context_length", None)
    if context_size is None:
        if model_context is None:
            raise ValueError("pass context_size: the model has no cfg.context_length to take it from")
        return model_context
    if not _is_integer(context_size) or context_size < 1:
        raise ValueError(f"context_size must be a positive integer or None, got {context_size!r}")
    if model_context is not None and context_size > model_context:
        raise ValueError(f"context_size ({context_size}) exceeds the model's context_length ({model_context})")
    return context_size
