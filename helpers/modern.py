"""From GPT-2 to a modern LLM (Part 10): RMSNorm, SwiGLU, rotary positions, grouped-query attention, QK-norm.

``ModernModel`` is the decoder that Llama 3 and Qwen3 share: no position-embedding table (the
queries and keys are rotated by their position instead), RMSNorm in place of LayerNorm, a gated
SwiGLU feed-forward, and fewer key/value heads than query heads. It offers the decoder protocol of
``helpers.model`` (stated there once, for both models): ``forward`` with a KV cache and an attention
mask for left-padded batches, ``new_kv_cache``, ``tok_emb``, ``final_norm``, ``out_head``, ``cfg``,
so it trains with ``helpers.train`` and finetunes with everything of Part 09.
Loading Qwen3 and Llama checkpoints is ``helpers.modern_weights``' job (``load_qwen3``, ``load_llama``,
also importable from here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import LayerKVCache
from helpers.model import ConfigDict, KVCache, left_padding

__all__ = ["MODERN_CONFIGS", "ROPE_TYPES", "GroupedQueryAttention", "GrowingLayerKVCache", "ModernBlock",
           "ModernConfig", "ModernKVCache", "ModernModel", "RMSNorm", "RopeScaling", "RotaryEmbedding", "SwiGLU",
           "apply_rope", "init_modern_weights", "kv_cache_bytes_per_token", "rope_frequencies"]

ROPE_TYPES = ("llama3",)
"""The rotary-position scalings ``RopeScaling`` knows (None in a config means plain RoPE)."""


def _positive_number(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")


def _positive_integer(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's stretching of the rotary frequencies, for contexts longer than the one pretrained on.

    Frequencies whose wavelength exceeds ``original_context_length / low_freq_factor`` are divided by
    ``factor``; those shorter than ``original_context_length / high_freq_factor`` are kept; the ones in
    between are blended. (Hugging Face calls ``original_context_length`` ``original_max_position_embeddings``.)
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type {self.rope_type!r} is not one this model knows "
                             f"({', '.join(ROPE_TYPES)}); use rope_scaling=None for plain RoPE")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _positive_number("RopeScaling", name, getattr(self, name))
        _positive_integer("RopeScaling", "original_context_length", self.original_context_length)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                             f"({self.low_freq_factor}): the blend between them divides by their difference")


@dataclass(frozen=True)
class ModernConfig(ConfigDict):
    """The sizes of a modern decoder. Invalid combinations are refused when the config is built.

    ``n_kv_heads`` key/value heads serve ``n_heads`` query heads (``n_heads / n_kv_heads`` each);
    ``head_dim`` is stated, not derived, since Qwen3 uses 16 x 128 = 2048 for a width of 1024.
    ``hidden_dim`` is the feed-forward's inner width. ``rope_scaling`` is None (plain RoPE) or a
    ``RopeScaling`` (a dict of its fields is converted). ``qk_norm`` adds Qwen3's RMSNorm over every
    head's queries and keys. The defaults are Qwen3-0.6B's sizes.
    """

    vocab_size: int = 151936
    context_length: int = 40960
    emb_dim: int = 1024
    n_heads: int = 16
    n_kv_heads: int = 8
    n_layers: int = 28
    hidden_dim: int = 3072
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = True
    tie_weights: bool = True
    norm_eps: float = 1e-6
    drop_rate: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "n_layers", "hidden_dim",
                     "head_dim"):
            _positive_integer("ModernConfig", name, getattr(self, name))
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}): "
                             "each key/value head serves the same number of query heads")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModernConfig.head_dim must be even (RoPE rotates pairs of dimensions), "
                             f"got {self.head_dim}")
        _positive_number("ModernConfig", "rope_theta", self.rope_theta)
        _positive_number("ModernConfig", "norm_eps", self.norm_eps)
        if isinstance(self.rope_scaling, Mapping):  # from JSON or to_dict(): build the dataclass
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModernConfig.rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        for name in ("qk_norm", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModernConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.drop_rate, bool) or not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"ModernConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")



MODERN_CONFIGS: dict[str, ModernConfig] = {
    "qwen3-0.6b": ModernConfig(vocab_size=151936, context_length=40960, emb_dim=1024, n_heads=16, n_kv_heads=8,
                               n_layers=28, hidden_dim=3072, head_dim=128, rope_theta=1_000_000.0,
                               qk_norm=True, tie_weights=True, norm_eps=1e-6),  # 596,049,920 parameters
    "llama3.2-1b": ModernConfig(vocab_size=128256, context_length=131072, emb_dim=2048, n_heads=32, n_kv_heads=8,
                                n_layers=16, hidden_dim=8192, head_dim=64, rope_theta=500_000.0,
                                rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_context_length=8192),
                                qk_norm=False, tie_weights=True, norm_eps=1e-5),  # 1,235,814,400 parameters
}
"""The published sizes of Qwen3-0.6B and Llama 3.2 1B (their ``config.json``)."""


# ---------------------------------------------------------------------------------------------
# the building blocks


class RMSNorm(nn.Module):
    """Scale each vector to root-mean-square 1, then by a learned ``weight``; no mean, no shift.

    Computed in float32 and returned in the input's dtype, as Llama and Qwen3 do.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rms_inverse = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return self.weight * (x32 * rms_inverse).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward: ``down(silu(gate(x)) * up(x))``, emb_dim -> hidden_dim -> emb_dim, no biases."""

    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.gate_proj(x))  # (batch, n_tokens, hidden_dim)
        return self.down_proj(gate * self.up_proj(x))  # (batch, n_tokens, emb_dim)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The ``head_dim / 2`` rotation speeds (radians per position) of RoPE, in float32.

    Pair ``i`` turns by ``theta ** (-2i / head_dim)`` per position: fast for the first pairs, slow for
    the last. With ``scaling`` (Llama 3) the slow ones are slowed further; see ``RopeScaling``.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    frequencies = 1.0 / (theta ** exponents)  # (head_dim / 2,)
    if scaling is None:
        return frequencies
    wavelengths = 2 * math.pi / frequencies  # positions per full turn
    original = scaling.original_context_length
    long_wavelength = original / scaling.low_freq_factor  # slower than this: divide by factor
    short_wavelength = original / scaling.high_freq_factor  # faster than this: keep
    # in between, blend the two by how many turns the pair makes within the original context
    blend = (original / wavelengths - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * frequencies / scaling.factor + blend * frequencies
    scaled = torch.where(wavelengths > long_wavelength, frequencies / scaling.factor, frequencies)
    in_between = (wavelengths >= short_wavelength) & (wavelengths <= long_wavelength)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """The cosines and sines that rotate queries and keys at given positions (no weights).

    The frequencies (``head_dim / 2`` numbers) are kept in float32 outside the module's state, once
    per device, so they never lose precision when the model is cast to bfloat16.
    """

    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        self.scaling = cfg.rope_scaling
        self._frequencies: dict[torch.device, torch.Tensor] = {}  # per device; not a buffer, so never cast

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(n_tokens,)`` (or ``(batch, n_tokens)``, one row each) -> ``cos`` and ``sin``, each of
        shape ``positions.shape + (head_dim,)``, float32."""
        frequencies = self._frequencies.get(positions.device)
        if frequencies is None:  # computed once per device: decoding calls this for every token
            frequencies = rope_frequencies(self.head_dim, self.theta, self.scaling, positions.device)
            self._frequencies[positions.device] = frequencies
        angles = positions.float()[..., None] * frequencies  # (..., n_tokens, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (n_tokens, head_dim): both halves of a pair share one angle
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, n_tokens, head_dim)`` by the angles of ``cos``, ``sin`` ``(n_tokens, head_dim)``.

    Dimension ``i`` is paired with ``i + head_dim / 2`` (the "rotate half" layout of Hugging Face
    checkpoints): ``(a, b) -> (a cos - b sin, b cos + a sin)``. ``cos`` and ``sin`` may also be
    ``(batch, n_tokens, head_dim)``: each row at its own positions (a left-padded batch).
    """
    if cos.dim() == 3:  # one set of angles per row, shared by its heads
        cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)  # (batch, heads, n_tokens, head_dim / 2) each
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


def _causal_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                      dropout_p: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention where new token ``t`` (at position ``past + t``) sees keys up to its own.

    ``attn_mask`` (``helpers.attention.padding_causal_mask``: True where a query may look), when given,
    replaces the causal mask: it already holds it, and hides the padding of a left-padded batch.
    """
    # enable_gqa: each key/value head serves its group of query heads, as repeat_interleave(group_size, dim=1)
    # on keys and values would arrange, without copying them
    if attn_mask is not None:
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p,
                                              enable_gqa=True)
    if past == 0:
        return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=True)
    n_tokens = queries.shape[2]
    if n_tokens == 1:  # one new token may look at everything cached
        return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, enable_gqa=True)
    query_pos = torch.arange(past, past + n_tokens, device=queries.device)[:, None]
    key_pos = torch.arange(keys.shape[2], device=queries.device)[None, :]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=key_pos <= query_pos, dropout_p=dropout_p,
                                          enable_gqa=True)


class GroupedQueryAttention(nn.Module):
    """Causal attention where ``n_heads`` query heads share ``n_kv_heads`` key/value heads.

    Queries and keys are rotated by their positions (RoPE) before they meet; with ``cfg.qk_norm`` each
    head's queries and keys are RMS-normalised first (Qwen3). The cache keeps the ``n_kv_heads``
    rotated keys and values, which is where grouping saves memory.
    """

    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.group_size = cfg.n_heads // cfg.n_kv_heads  # query heads per key/value head
        self.context_length = cfg.context_length
        self.dropout = cfg.drop_rate
        self.W_query = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(batch, n_tokens, emb_dim)``; ``cos``/``sin`` ``(n_tokens, head_dim)`` for the tokens' positions
        (``(batch, n_tokens, head_dim)`` with ``attn_mask``, the mask of a left-padded batch)."""
        batch, n_tokens, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + n_tokens > self.context_length:
            raise ValueError(f"the input has {past + n_tokens} tokens ({past} cached) but context_length is "
                             f"{self.context_length}")
        # (batch, n_tokens, heads * head_dim) -> (batch, n_tokens, heads, head_dim)
        queries = self.W_query(x).view(batch, n_tokens, self.n_heads, self.head_dim)
        keys = self.W_key(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)
        values = self.W_value(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # over each head's head_dim
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        # (batch, n_tokens, heads, head_dim) -> (batch, heads, n_tokens, head_dim)
        queries, keys, values = queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        if cache is not None:  # stored already rotated, at their absolute positions
            keys, values = cache.append(keys, values)

        # every key/value head serves group_size query heads (the kernel's enable_gqa: no copies)
        context = _causal_attention(queries, keys, values, past, self.dropout if self.training else 0.0, attn_mask)
        # (batch, n_heads, n_tokens, head_dim) -> (batch, n_tokens, n_heads * head_dim)
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.n_heads * self.head_dim)
        return self.out_proj(context)  # (batch, n_tokens, emb_dim)


class ModernBlock(nn.Module):
    """Pre-RMSNorm block: grouped-query attention and SwiGLU, each inside a shortcut connection."""

    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.att = GroupedQueryAttention(cfg)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.ff = SwiGLU(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        x = self.att(self.norm1(x), cos, sin, cache, attn_mask)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x


# ---------------------------------------------------------------------------------------------
# the cache and the model


class GrowingLayerKVCache(LayerKVCache):
    """A ``LayerKVCache`` that makes room as it fills (doubling), up to ``max_length`` positions.

    Modern contexts are long (131,072 positions for Llama 3.2): allocating all of them up front,
    as GPT-2's 1,024 allow, would take gigabytes before the first token.
    """

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = min(self.length + keys.shape[2], self.max_length)  # more is refused by LayerKVCache.append
        if self.keys is None or self.keys.shape[0] != keys.shape[0] or self.keys.shape[2] < needed:
            room = min(self.max_length, max(needed, 2 * (0 if self.keys is None else self.keys.shape[2]), 64))
            shape = (keys.shape[0], keys.shape[1], room, keys.shape[3])
            new_keys, new_values = keys.new_empty(shape), values.new_empty(shape)
            if self.keys is not None and self.keys.shape[0] == keys.shape[0]:
                new_keys[:, :, :self.length] = self.keys[:, :, :self.length]
                new_values[:, :, :self.length] = self.values[:, :, :self.length]
            self.keys, self.values = new_keys, new_values
        return super().append(keys, values)


class ModernKVCache(KVCache):
    """``KVCache`` with ``GrowingLayerKVCache`` layers; what ``ModernModel.new_kv_cache`` returns."""

    def __init__(self, n_layers: int, max_length: int):
        super().__init__(n_layers, max_length)
        self.layers = [GrowingLayerKVCache(max_length) for _ in range(n_layers)]


class ModernModel(nn.Module):
    """A Llama 3 / Qwen3 decoder: token embeddings, ``n_layers`` ``ModernBlock``s, final RMSNorm, output head.

    ``cfg`` is a ``ModernConfig`` (or a dict of its fields). There is no position-embedding table:
    positions enter through the rotation of queries and keys. Weights start as
    ``init_modern_weights`` sets them (N(0, 0.02^2)), so the model trains from scratch as it is.
    """

    def __init__(self, cfg: ModernConfig | Mapping):
        super().__init__()
        if isinstance(cfg, Mapping):
            cfg = ModernConfig.from_dict(cfg)
        elif not isinstance(cfg, ModernConfig):
            raise TypeError(f"ModernModel expects a ModernConfig or a dict of its fields, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.rope = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(ModernBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:  # one matrix, two roles: the head reads the embedding table
            self.out_head.weight = self.tok_emb.weight
        init_modern_weights(self)

    def new_kv_cache(self) -> ModernKVCache:
        """An empty cache for incremental decoding with this model (it grows as it fills)."""
        return ModernKVCache(self.cfg.n_layers, self.cfg.context_length)

    def forward(self, in_idx: torch.Tensor, kv_cache: KVCache | None = None, *,
                return_hidden: bool = False, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the logits ``(batch, n_tokens, vocab_size)`` for token ids ``(batch, n_tokens)``.

        The decoder protocol of ``helpers.model``, as ``GPTModel.forward``: with ``kv_cache``, ``in_idx``
        holds only the new tokens, which take the positions after those already cached;
        ``return_hidden=True`` returns the final normalised hidden states ``(batch, n_tokens, emb_dim)``;
        ``attention_mask`` (1 real, 0 padding) hides the left padding of a batch and rotates each row's
        queries and keys by its own positions, counted from its first real token.
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
        else:  # (batch, n_tokens) positions, and the mask that hides the padding
            positions, attn_mask = left_padding(in_idx, attention_mask, kv_cache, start)
        cos, sin = self.rope(positions)  # (n_tokens, head_dim) each (one per row when padded), for every layer
        x = self.drop_emb(self.tok_emb(in_idx))  # (batch, n_tokens, emb_dim)
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache.layers[index] if kv_cache is not None else None, attn_mask)
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.out_head(x)  # (batch, n_tokens, vocab_size)


@torch.no_grad()
def init_modern_weights(model: ModernModel, std: float = 0.02) -> ModernModel:
    """Re-initialise ``model`` in place and return it: every linear and embedding weight from N(0, std^2).

    The two projections that write into the residual stream (``out_proj``, ``down_proj``) use
    ``std / sqrt(2 * n_layers)``, as GPT-2's scheme does, so the stream's variance does not grow with
    depth; every RMSNorm weight starts at 1. A tied head shares the embedding's draw.
    """
    residual_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if name.endswith(("out_proj", "down_proj"))
                            else std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    return model


def kv_cache_bytes_per_token(cfg, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache holds per token of context: keys and values of every layer and key/value head.

    ``cfg`` is a ``ModernConfig`` or a ``GPTConfig`` (whose every head has its own keys and values);
    ``dtype`` is the cache's (a bfloat16 checkpoint caches in bfloat16: pass ``torch.bfloat16``).
    """
    n_kv_heads = getattr(cfg, "n_kv_heads", cfg.n_heads)
    return 2 * cfg.n_layers * n_kv_heads * cfg.head_dim * dtype.itemsize


def __getattr__(name: str):
    """``load_qwen3`` and ``load_llama`` live in ``helpers.modern_weights`` (which imports this module)."""
    if name in ("load_qwen3", "load_llama"):
        from helpers import modern_weights

        return getattr(modern_weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
