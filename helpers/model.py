"""The GPT-2 architecture of Part 06: configuration, transformer block, GPTModel, KV cache.

The decoder protocol. Everything after Part 06 (generation, classification, LoRA, instruction
finetuning, DPO, the chat command, checkpoints) uses a model only through what ``GPTModel`` and
Part 10's ``ModernModel`` both offer, so either architecture goes through it:

- ``forward(in_idx, kv_cache=None, *, return_hidden=False, attention_mask=None)``: logits
  ``(batch, n_tokens, vocab_size)`` for token ids ``(batch, n_tokens)``, or the final normalised
  hidden states with ``return_hidden=True``; ``attention_mask`` (1 real, 0 padding) lets
  left-padded rows share a batch, each row's positions counting from its first real token
  (``left_padding``), so a row's logits are those it gets alone; ``kv_cache`` holds the tokens
  seen so far, and ``in_idx`` then only the new ones;
- ``new_kv_cache()``: an empty ``KVCache`` for that model;
- ``tok_emb`` (the token embedding), ``final_norm`` (the last normalisation), ``out_head`` (an
  ``nn.Linear`` from ``cfg.emb_dim`` to the vocabulary or to the classes);
- ``cfg``: a frozen config dataclass with ``vocab_size``, ``context_length``, ``emb_dim``,
  ``n_layers`` and ``tie_weights``, and ``blocks``, the ``nn.ModuleList`` of its blocks.

``is_decoder(model)`` says whether a model offers it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from helpers.attention import LayerKVCache, MultiHeadAttention, padding_causal_mask
from helpers.runtime import unwrap_model

__all__ = ["GPT_CONFIGS", "FeedForward", "GPTConfig", "GPTModel", "KVCache", "TransformerBlock", "count_parameters",
           "init_gpt2_weights", "is_decoder", "left_padding"]


class ConfigDict:
    """``to_dict`` and ``from_dict`` for the frozen config dataclasses (``GPTConfig``, ``ModernConfig``)."""

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping):
        """Build a config from a dict, naming any key it does not know."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; the known keys are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class GPTConfig(ConfigDict):
    """The sizes of a GPT model. Invalid combinations are refused when the config is built."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False  # share the token-embedding matrix with the output head, as GPT-2 does

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}): "
                             "each head gets emb_dim / n_heads dimensions")
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be a number in [0, 1), got {rate!r}")
        for name in ("qkv_bias", "tie_weights"):  # a string such as "false" would be truthy
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        """Dimensions per attention head."""
        return self.emb_dim // self.n_heads



GPT_CONFIGS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}
"""OpenAI's four GPT-2 sizes (context 1024, vocabulary 50,257), untied and without qkv bias."""


class FeedForward(nn.Module):
    """Position-wise MLP: expand to 4 x emb_dim, tanh-approximated GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention and feed-forward, each inside a shortcut connection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate,
                                      cfg.n_heads, qkv_bias=cfg.qkv_bias)
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        x = self.att(self.norm1(x), cache, attn_mask)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x


class KVCache:
    """Keys and values of every layer for the tokens a model has seen; see ``GPTModel.forward``."""

    def __init__(self, n_layers: int, max_length: int):
        self.layers = [LayerKVCache(max_length) for _ in range(n_layers)]
        self.max_length = max_length
        self.key_mask: torch.Tensor | None = None  # (batch, length): False at padding; None while there is none

    @property
    def length(self) -> int:
        """How many positions are cached (the position of the next token)."""
        return self.layers[0].length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (indices), e.g. to stop computing sequences that have finished."""
        for layer in self.layers:
            layer.keep_rows(rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, ``n_layers`` transformer blocks, final LayerNorm, output head.

    ``cfg`` is a ``GPTConfig`` (or a dict of its fields). Weights start as PyTorch initialises each
    layer, exactly like the model Part 06 builds inline (and the numbers the book reports);
    ``init_gpt2_weights(model)`` applies GPT-2's own scheme instead, as ``python -m helpers.pretrain`` does.
    """

    def __init__(self, cfg: GPTConfig | Mapping):
        super().__init__()
        if isinstance(cfg, Mapping):
            cfg = GPTConfig.from_dict(cfg)
        elif not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPTModel expects a GPTConfig or a dict of its fields, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:  # one matrix, two roles: the head reads the embedding table
            self.out_head.weight = self.tok_emb.weight

    def new_kv_cache(self) -> KVCache:
        """An empty cache for incremental decoding with this model."""
        return KVCache(self.cfg.n_layers, self.cfg.context_length)

    def forward(self, in_idx: torch.Tensor, kv_cache: KVCache | None = None, *,
                return_hidden: bool = False, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the logits ``(batch, n_tokens, vocab_size)`` for token ids ``(batch, n_tokens)``.

        With ``kv_cache``, ``in_idx`` holds only the new tokens: they take the positions after
        those already cached, attend to the cached keys and values, and are added to the cache.
        With ``return_hidden=True`` the final normalised hidden states ``(batch, n_tokens, emb_dim)``
        are returned instead of logits (for a loss that applies the output head itself).

        ``attention_mask`` ``(batch, n_tokens)``, 1 for real tokens and 0 for padding, lets prompts of
        different lengths share a batch, left-padded: no token attends to padding, and each row's
        positions count from its first real token, so a row's logits are those it gets alone (the
        logits at padded positions mean nothing). With a cache it covers the new tokens only; the
        cache remembers the earlier ones. Without it every new token is real (cached padding stays masked).
        """
        if in_idx.dim() != 2:
            raise ValueError(f"in_idx must be (batch, n_tokens) token ids, got shape {tuple(in_idx.shape)}")
        _, n_tokens = in_idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + n_tokens > self.cfg.context_length:
            raise ValueError(
                f"the input has {start + n_tokens} tokens ({start} cached + {n_tokens} new) but the model's "
                f"context_length is {self.cfg.context_length}; crop it to the last {self.cfg.context_length} tokens"
            )
        if attention_mask is None and (kv_cache is None or kv_cache.key_mask is None):  # no padding anywhere
            positions, attn_mask = torch.arange(start, start + n_tokens, device=in_idx.device), None
        else:
            positions, attn_mask = left_padding(in_idx, attention_mask, kv_cache, start)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (batch, n_tokens, emb_dim)
        x = self.drop_emb(x)
        for index, block in enumerate(self.blocks):
            x = block(x, kv_cache.layers[index] if kv_cache is not None else None, attn_mask)
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.out_head(x)  # (batch, n_tokens, vocab_size)


def left_padding(in_idx: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None,
                 start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row positions ``(batch, n_tokens)`` and the attention mask for a batch with padding.

    ``start`` is the number of cached positions. Records the new tokens' mask in ``kv_cache``, which
    carries it to the next call. Both models of the decoder protocol (above) call it.
    """
    batch, n_tokens = in_idx.shape
    if attention_mask is None:
        new_mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=in_idx.device)
    elif attention_mask.shape != in_idx.shape or attention_mask.is_floating_point():
        raise ValueError(f"attention_mask must be (batch, n_tokens) = {tuple(in_idx.shape)} of 1 (token) and "
                         f"0 (padding), like in_idx; got shape {tuple(attention_mask.shape)}, "
                         f"dtype {attention_mask.dtype}")
    else:
        new_mask = attention_mask.to(device=in_idx.device) != 0
    cached = kv_cache.key_mask if kv_cache is not None else None
    if cached is None:  # whatever is cached so far had no padding
        cached = torch.ones(batch, start, dtype=torch.bool, device=in_idx.device)
    key_mask = torch.cat([cached, new_mask], dim=1)  # (batch, start + n_tokens)
    if kv_cache is not None:
        kv_cache.key_mask = key_mask
    # position p for a row's p+1-th real token; padding (before the first) gets 0, never looked at
    positions = (key_mask.cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # (batch, n_tokens)
    return positions, padding_causal_mask(key_mask, n_tokens)


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped from DDP / ``torch.compile``) offers the decoder protocol of this module's doc."""
    core = unwrap_model(model)
    return (callable(getattr(core, "new_kv_cache", None)) and hasattr(core, "cfg")
            and all(isinstance(getattr(core, name, None), nn.Module) for name in ("tok_emb", "final_norm", "out_head")))


@torch.no_grad()
def init_gpt2_weights(model: GPTModel) -> GPTModel:
    """Re-initialise ``model`` as GPT-2 does, in place; return it.

    Every linear and embedding weight is drawn from N(0, 0.02^2); the two projections that write into
    the residual stream (attention's ``out_proj`` and the feed-forward's second layer) use
    0.02 / sqrt(2 * n_layers), so the stream's variance does not grow with depth; biases start at 0 and
    LayerNorms at scale 1, shift 0. A tied head shares the embedding's draw.
    """
    residual_std = 0.02 / math.sqrt(2 * model.cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("att.out_proj", "ff.layers.2")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(parameter.numel() for parameter in model.parameters())
