"""Causal self-attention (Part 04) and multi-head attention (Part 05)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalAttention", "LayerKVCache", "MultiHeadAttention", "padding_causal_mask"]


class CausalAttention(nn.Module):
    """One causal self-attention head, computed step by step as Part 04 teaches it.

    Input ``(batch, n_tokens, d_in)``, output ``(batch, n_tokens, d_out)``.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: the future positions a token may not look at
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, n_tokens, _ = x.shape
        if n_tokens > self.mask.shape[0]:
            raise ValueError(f"input has {n_tokens} tokens but context_length is {self.mask.shape[0]}")
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)  # (batch, n_tokens, n_tokens)
        attn_scores = attn_scores.masked_fill(self.mask[:n_tokens, :n_tokens], float("-inf"))
        attn_weights = torch.softmax(attn_scores / self.d_out**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values  # (batch, n_tokens, d_out)


class LayerKVCache:
    """The keys and values one attention layer has computed so far, for incremental decoding.

    Buffers are allocated once, for ``max_length`` positions, and filled in place.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys: torch.Tensor | None = None  # (batch, n_heads, max_length, head_dim)
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``(batch, n_heads, n_new, head_dim)`` keys and values; return all so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions; {start} are used and {keys.shape[2]} "
                             "more do not fit (crop the context and start a new cache)")
        if self.keys is None or self.keys.shape[0] != keys.shape[0]:
            shape = (keys.shape[0], keys.shape[1], self.max_length, keys.shape[3])
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (indices into the batch), dropping the others' keys and values."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


def padding_causal_mask(key_mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Which keys each query may attend to, for a batch with padding: ``(batch, 1, n_queries, n_keys)`` bool.

    ``key_mask`` ``(batch, n_keys)`` is True for real tokens and False for padding; the queries are the
    last ``n_queries`` of the keys' positions (earlier ones are cached). A query sees the real keys at
    or before its own position. A padded query sees only itself, so its softmax still has one key to
    normalise over (no NaN); what it computes is never read by a real token.
    """
    n_keys = key_mask.shape[1]
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=key_mask.device)[:, None]  # (n_queries, 1)
    key_pos = torch.arange(n_keys, device=key_mask.device)[None, :]  # (1, n_keys)
    allowed = (key_pos <= query_pos) & key_mask[:, None, :]  # (batch, n_queries, n_keys)
    allowed = allowed | (key_pos == query_pos)
    return allowed[:, None]  # (batch, 1, n_queries, n_keys): the same for every head


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: project once, split into heads, attend, merge, project.

    Uses PyTorch's fused ``scaled_dot_product_attention``; dropout on the attention weights applies
    only in training mode. Input and output are ``(batch, n_tokens, d_in)`` / ``(batch, n_tokens, d_out)``.
    ``attn_mask`` (``padding_causal_mask``), when given, replaces the causal mask: True where a query
    may attend to a key, for batches of left-padded prompts.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.dropout = dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        # (batch, n_tokens, d_out) -> (batch, num_heads, n_tokens, head_dim)
        return x.view(batch, n_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + n_tokens > self.context_length:
            raise ValueError(f"the input has {past + n_tokens} tokens ({past} cached) but context_length is "
                             f"{self.context_length}")
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        if cache is not None:
            keys, values = cache.append(keys, values)

        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None:  # padding: the caller's mask already holds the causal one
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p)
        elif past == 0:
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        elif n_tokens == 1:  # one new token may look at everything cached
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        else:  # new tokens at positions past.. see the prefix and the new tokens up to themselves
            query_pos = torch.arange(past, past + n_tokens, device=x.device)[:, None]
            key_pos = torch.arange(past + n_tokens, device=x.device)[None, :]
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=key_pos <= query_pos,
                                                     dropout_p=dropout_p)
        # (batch, num_heads, n_tokens, head_dim) -> (batch, n_tokens, d_out)
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.d_out)
        return self.out_proj(context)
