"""Text generation (Parts 06 and 07): greedy and sampled decoding, KV cache, left-padded batches of prompts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from helpers.model import KVCache, is_decoder
from helpers.runtime import check_count
from helpers.tokenizers import encode_with_endoftext

__all__ = ["filter_logits", "generate", "generate_batch", "has_kv_cache", "left_pad", "next_token_logits",
           "sample_next_token", "stream_generate", "text_to_token_ids", "token_ids_to_text"]


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
    likely token always stays). A tiny temperature (1e-37) can overflow the division to +-inf here;
    ``sample_next_token`` and ``generate`` shift each row's largest logit to 0 first, which changes
    no probability and cannot overflow.
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
    token is sampled from their softmax. Any temperature > 0 works, however small: each row's
    logits are shifted so that the largest is 0 before dividing (the same softmax, and no overflow),
    so a temperature like 1e-30 samples only among the tokens tied for the largest logit, and one
    below float32's smallest normal number (1.2e-38; 1e-40, say) is greedy outright: the limit
    that sampling approaches as the temperature goes to 0.
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


_SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny
"""float32's smallest normal number (1.2e-38): a positive temperature below it is rounded towards 0 in float32."""


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature < _SMALLEST_TEMPERATURE:  # 0, or so small that float32 cannot divide by it: greedy
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # the largest logit becomes 0 and the others negative, so that logits / temperature cannot overflow to
    # +inf (NaN after softmax) for a tiny temperature; softmax, top-k and top-p ignore the shift
    logits = logits - logits.amax(dim=-1, keepdim=True)
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

    With ``use_cache`` (a model with ``new_kv_cache``: ``GPTModel``, ``ModernModel``) the prompt is run
    once and every later step feeds only the new token, reusing cached keys and values; the tokens
    are the same as without the cache. When the context outgrows ``context_size`` the cache is
    rebuilt from the cropped window, since positions shift with the window. Any ``temperature`` > 0 is valid; a tiny
    one (1e-40) is greedy, never NaN (see ``sample_next_token``). Token ids outside the model's
    vocabulary are refused. For prompts of different lengths, see ``generate_batch``.
    """
    _check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (batch, n_tokens) with at least one token, got shape {tuple(idx.shape)}")
    _check_token_ids(model, idx, "idx")
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    _check_eos_id(eos_id)
    context_size = _context_size(model, context_size)
    use_cache = use_cache and has_kv_cache(model)

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
def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                   eos_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, context_size: int | None = None, use_cache: bool = True,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue prompts of different lengths together; return each one's new token ids.

    The prompts are left-padded with ``pad_id`` to one length and run as one batch, with an
    attention mask so that no token sees the padding and positions count from each prompt's first
    token: greedy answers are those ``generate`` gives each prompt alone. Each list holds up to
    ``max_new_tokens`` ids, ending at the first ``eos_id`` (included) where one was produced; a
    finished row leaves the batch, and the loop ends when every row has finished. The other
    arguments are ``generate``'s. A model without the decoder protocol of ``helpers.model`` (an
    attention mask to hide padding behind) answers the prompts one at a time, with the same results.
    """
    _check_sampling(temperature, top_k, top_p)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    _check_eos_id(eos_id)
    _check_prompts(model, prompts, pad_id)
    context_size = _context_size(model, context_size)
    if not prompts:
        return []
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, context_size=context_size,
                   eos_id=eos_id, use_cache=use_cache, generator=generator)
    if not is_decoder(model):  # no attention mask to hide padding behind: one prompt at a time
        device = _model_device(model)
        return [_until_eos(generate(model, torch.tensor([ids], device=device), max_new_tokens, **options)
                           [0, len(ids):].tolist(), eos_id) for ids in prompts]
    return _generate_padded(model, prompts, max_new_tokens, pad_id, **options)


def _generate_padded(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, *,
                     temperature: float, top_k: int | None, top_p: float | None, context_size: int,
                     eos_id: int | None, use_cache: bool, generator: torch.Generator | None) -> list[list[int]]:
    """``generate_batch``'s loop for a decoder (``GPTModel``, ``ModernModel``): left-pad, then one batched step per
    new token."""
    idx, mask = left_pad(prompts, pad_id, _model_device(model))  # (batch, width) each
    width = idx.shape[1]
    rows = list(range(len(prompts)))  # the prompt each row of idx answers (rows leave as they finish)
    answers: list[list[int]] = [[] for _ in prompts]
    cache = None
    for step in range(max_new_tokens):
        logits, cache = next_token_logits(model, idx, cache, context_size, use_cache, attention_mask=mask)
        _check_logits(logits, f"generate_batch, step {step + 1} of {max_new_tokens}")
        next_token = _pick(logits, temperature, top_k, top_p, generator)  # (rows, 1)
        idx = torch.cat([idx, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token, dtype=torch.bool)], dim=1)
        if eos_id is None:
            continue
        done = next_token[:, 0] == eos_id
        if bool(done.any()):  # record the finished rows and go on with the others only
            for row in done.nonzero().flatten().tolist():
                answers[rows[row]] = idx[row, width:].tolist()
            keep = (~done).nonzero().flatten()
            rows = [rows[row] for row in keep.tolist()]
            if not rows:
                return answers
            idx, mask = idx[keep], mask[keep]
            if cache is not None:
                cache.keep_rows(keep)
    for row, new_ids in zip(rows, idx[:, width:].tolist()):
        answers[row] = new_ids
    return answers


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one ``(batch, longest)`` tensor, padded on the left, and its mask (True at real tokens)."""
    width = max(len(ids) for ids in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, ids in enumerate(prompts):
        idx[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = True
    return idx.to(device), mask.to(device)


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> None:
    """Refuse prompts that are not lists of token ids, an empty prompt, and ids outside the vocabulary."""
    vocab_size = _vocab_size(model)
    in_vocab = (f"an integer in [0, {vocab_size}) (the model's vocab_size is {vocab_size})"
                if vocab_size is not None else "an integer >= 0")

    def is_token(value) -> bool:
        return _is_integer(value) and value >= 0 and (vocab_size is None or value < vocab_size)

    if not is_token(pad_id):
        raise ValueError(f"pad_id must be a token id, {in_vocab} (any token will do: it is masked), got {pad_id!r}")
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for number, ids in enumerate(prompts):
        if isinstance(ids, (str, torch.Tensor)) or not isinstance(ids, Sequence) or len(ids) == 0:
            raise ValueError(f"prompts[{number}] must be a non-empty list of token ids, got {ids!r:.80}")
        bad = next((value for value in ids if not is_token(value)), None)
        if bad is not None:
            raise ValueError(f"prompts[{number}] holds token id {bad!r}, but each id must be {in_vocab}; "
                             "was it encoded with another tokenizer than the model's?")


def _until_eos(new_ids: list[int], eos_id: int | None) -> list[int]:
    """The new ids up to and including the first ``eos_id`` (``generate`` pads finished rows with more)."""
    return new_ids[: new_ids.index(eos_id) + 1] if eos_id in new_ids else new_ids


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


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
    _check_token_ids(model, idx, "idx")
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    context_size = _context_size(model, context_size)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = next_token_logits(model, idx, cache, context_size, has_kv_cache(model))
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and int(next_token) == eos_id:
            return
        yield int(next_token)
        idx = torch.cat([idx, next_token], dim=1)


def next_token_logits(model: nn.Module, idx: torch.Tensor, cache: KVCache | None, context_size: int,
                      use_cache: bool = True, *,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache | None]:
    """The logits ``(batch, vocab_size)`` for the token after ``idx``, and the cache to pass next time.

    Without ``use_cache`` the model sees the last ``context_size`` tokens. With it (see ``has_kv_cache``),
    an empty or full cache is (re)filled from that window, since absolute positions shift with the
    window; otherwise only the newest token goes through the model, reusing the cached keys and values.
    ``attention_mask`` (a decoder's: ``GPTModel``, ``ModernModel``) marks left padding in ``idx``, as their
    ``forward`` takes it; the cache carries it, so the single newest token needs none.
    """
    window_mask = None if attention_mask is None else attention_mask[:, -context_size:]
    if not use_cache:
        return _last_logits(model, idx[:, -context_size:], None, window_mask), None
    if cache is None or cache.length >= context_size:  # (re)fill the cache from the window
        cache = model.new_kv_cache()
        return _last_logits(model, idx[:, -context_size:], cache, window_mask), cache
    return _last_logits(model, idx[:, -1:], cache, None), cache


def _last_logits(model: nn.Module, idx: torch.Tensor, cache: KVCache | None,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The logits ``(batch, vocab_size)`` at the last position of ``idx``.

    A decoder (``helpers.model.is_decoder``) applies its output head to that position only: the head
    is the largest matrix of a small model (vocab_size outputs per position), and a prompt's other
    positions need none.
    """
    if not is_decoder(model):
        if cache is not None:  # another model with a KV cache
            return model(idx, cache)[:, -1, :]
        masks = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(idx, **masks)[:, -1, :]
    hidden = model(idx, cache, return_hidden=True, attention_mask=attention_mask)
    return model.out_head(hidden[:, -1, :])  # (batch, emb_dim) -> (batch, vocab_size)


def has_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` offers the KV cache ``generate(..., use_cache=True)`` uses (a ``new_kv_cache`` method)."""
    return callable(getattr(model, "new_kv_cache", None))


def _check_eos_id(eos_id: int | None) -> None:
    if eos_id is not None and (not _is_integer(eos_id) or eos_id < 0):
        raise ValueError(f"eos_id must be a token id (an integer >= 0) or None, got {eos_id!r}")


def _vocab_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "cfg", None), "vocab_size", None)


def _check_token_ids(model: nn.Module, idx: torch.Tensor, name: str) -> None:
    """Refuse ids the model's embedding has no row for, naming the first bad one and the vocabulary size."""
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    vocab_size = _vocab_size(model)
    upper = f" and < the model's vocab_size ({vocab_size})" if vocab_size is not None else ""
    bad = idx < 0 if vocab_size is None else (idx < 0) | (idx >= vocab_size)
    if bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} holds token id {int(idx[position])} at {position}, but token ids must be >= 0"
                         f"{upper}; was the text encoded with another tokenizer than the model's?")


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
