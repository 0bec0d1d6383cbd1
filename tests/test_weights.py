"""GPT-2 weights in our GPTModel and back (Part 08), with transformers' GPT2LMHeadModel as the reference.

Nothing is downloaded: the reference models are random, tiny, seeded and saved locally.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers.generate import generate
from helpers.model import GPTConfig, GPTModel
from helpers.weights import BLOCK_TABLE, TOP_TABLE, WeightsError, load_gpt2, save_hf_gpt2

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, EMB, LAYERS, HEADS = 1000, 64, 64, 2, 4
TOP_TABLE_NAMES = {row[0] for row in TOP_TABLE}


def _hf_model(tied: bool = True, seed: int = 0):
    """A seeded GPT2LMHeadModel whose every parameter (biases and LayerNorms too) is random."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=EMB, n_layer=LAYERS,
                                     n_head=HEADS, tie_word_embeddings=tied, bos_token_id=None,
                                     eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _our_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def _ids(n_tokens: int = 40, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def hf_tied():
    return _hf_model(tied=True)


@pytest.fixture(scope="module")
def pretrained_dir(hf_tied, tmp_path_factory) -> Path:
    """``save_pretrained``: the ``transformer.``-prefixed layout, tied head not stored."""
    folder = tmp_path_factory.mktemp("hf-pretrained")
    hf_tied.save_pretrained(folder)
    return folder


def _to_hub_layout(source: Path, target: Path, *, drop: str | None = None, add: dict | None = None,
                   replace: dict | None = None) -> Path:
    """Re-save ``source`` as the hub's GPT-2 files are: no ``transformer.`` prefix, causal-mask buffers included."""
    target.mkdir(parents=True, exist_ok=True)
    stored = load_file(source / "model.safetensors")
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in stored.items()}
    for layer in range(LAYERS):  # the hub's gpt2 file carries these buffers; they are not weights
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(CONTEXT, CONTEXT)).view(1, 1, CONTEXT, CONTEXT)
    if drop is not None:
        del tensors[drop]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(source / "config.json", target / "config.json")
    return target


@pytest.fixture(scope="module")
def hub_dir(pretrained_dir, tmp_path_factory) -> Path:
    return _to_hub_layout(pretrained_dir, tmp_path_factory.mktemp("hf-hub") / "gpt2")


# ---------------------------------------------------------------------------------------------
# loading GPT-2 files


def test_load_gpt2_from_save_pretrained_layout_gives_the_logits_of_transformers(hf_tied, pretrained_dir):
    # given a transformers model saved with save_pretrained (names start with "transformer.")
    assert all(name.startswith("transformer.") for name in load_file(pretrained_dir / "model.safetensors"))
    ids = _ids()

    # when it is loaded with load_gpt2
    model = load_gpt2(pretrained_dir)

    # then it is a GPTModel of the same sizes, in eval mode, with the same logits
    assert isinstance(model, GPTModel) and not model.training
    assert (model.cfg.vocab_size, model.cfg.context_length, model.cfg.emb_dim, model.cfg.n_heads,
            model.cfg.n_layers, model.cfg.qkv_bias, model.cfg.tie_weights) == (VOCAB, CONTEXT, EMB, HEADS, LAYERS,
                                                                                 True, True)
    assert _max_diff(_our_logits(model, ids), _hf_logits(hf_tied, ids)) <= 1e-4


def test_load_gpt2_from_the_hub_layout_gives_the_logits_of_transformers(hf_tied, hub_dir):
    # given the same weights in the hub's layout (no prefix, causal-mask buffers, config.json beside)
    names = set(load_file(hub_dir / "model.safetensors"))
    assert "wte.weight" in names and "h.0.attn.bias" in names
    ids = _ids(seed=2)

    # when the folder is loaded
    model = load_gpt2(hub_dir)

    # then the logits are those of transformers
    assert _max_diff(_our_logits(model, ids), _hf_logits(hf_tied, ids)) <= 1e-4


def test_load_gpt2_from_a_bare_safetensors_file_with_its_config_beside_it(hf_tied, hub_dir):
    # given the path of the .safetensors file itself
    ids = _ids(seed=3)

    # when it is loaded
    model = load_gpt2(hub_dir / "model.safetensors")

    # then the logits are those of transformers
    assert _max_diff(_our_logits(model, ids), _hf_logits(hf_tied, ids)) <= 1e-4


def test_load_gpt2_of_an_untied_model_keeps_its_own_head(tmp_path):
    # given a transformers model with a separate lm_head, saved with save_pretrained
    reference = _hf_model(tied=False, seed=4)
    reference.save_pretrained(tmp_path)
    ids = _ids(seed=4)

    # when it is loaded
    model = load_gpt2(tmp_path)

    # then the head is its own tensor and the logits are those of transformers
    assert not model.cfg.tie_weights
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    torch.testing.assert_close(model.out_head.weight, reference.lm_head.weight, rtol=0, atol=0)
    assert _max_diff(_our_logits(model, ids), _hf_logits(reference, ids)) <= 1e-4


def test_greedy_generation_is_token_for_token_that_of_transformers(hf_tied, pretrained_dir):
    # given the loaded model and a prompt of 6 tokens
    model = load_gpt2(pretrained_dir)
    prompt = _ids(n_tokens=6, batch=1, seed=5)

    # when both generate 30 tokens greedily (ours with and without the KV cache)
    ours_cached = generate(model, prompt, max_new_tokens=30)
    ours_uncached = generate(model, prompt, max_new_tokens=30, use_cache=False)
    with torch.no_grad():
        theirs = hf_tied.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt))

    # then the sequences are identical (and not a degenerate repetition of one token)
    assert theirs.shape == (1, 36) and len(set(theirs[0, 6:].tolist())) > 3
    assert ours_cached.tolist() == theirs.tolist()
    assert ours_uncached.tolist() == theirs.tolist()


def test_load_gpt2_gives_contiguous_tensors_of_their_own(pretrained_dir):
    # GPT-2's Conv1D matrices are stored (in, out): each is transposed into a contiguous tensor, and the
    # fused query/key/value matrix is split into three tensors of their own
    model = load_gpt2(pretrained_dir)
    assert all(p.is_contiguous() for p in model.parameters())
    att = model.blocks[0].att
    pointers = {att.W_query.weight.data_ptr(), att.W_key.weight.data_ptr(), att.W_value.weight.data_ptr()}
    assert len(pointers) == 3
    assert att.W_query.weight.untyped_storage().nbytes() == att.W_query.weight.numel() * 4


def test_loaded_tied_head_shares_storage_with_the_token_embedding(pretrained_dir):
    # given a tied GPT-2 loaded from disk
    model = load_gpt2(pretrained_dir)

    # then the output head is the token embedding itself: one storage, one parameter
    assert model.cfg.tie_weights
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.untyped_storage().data_ptr() == model.tok_emb.weight.untyped_storage().data_ptr()
    assert len(list(model.parameters())) == len(list(model.named_parameters(remove_duplicate=False))) - 1


def test_load_gpt2_with_bfloat16_gives_bfloat16_parameters(hf_tied, pretrained_dir):
    # given a float32 file, loaded as bfloat16
    model = load_gpt2(pretrained_dir, dtype=torch.bfloat16)
    ids = _ids(seed=6)

    # then every parameter is bfloat16 and the logits are close to float32's (bf16 keeps ~3 digits)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = _our_logits(model, ids)
    assert logits.dtype == torch.bfloat16
    reference = _hf_logits(hf_tied, ids)
    assert _max_diff(logits, reference) <= 0.05 * reference.abs().max().item()


def test_load_gpt2_overrides_dropout_when_asked(pretrained_dir):
    # given the file's config (resid_pdrop 0.1)
    # then the loaded model keeps it, or takes drop_rate when one is passed
    assert load_gpt2(pretrained_dir).cfg.drop_rate == pytest.approx(0.1)
    assert load_gpt2(pretrained_dir, drop_rate=0.0).cfg.drop_rate == 0.0


# ---------------------------------------------------------------------------------------------
# our models in GPT-2's layout


def _random_gpt(tie_weights: bool, qkv_bias: bool, seed: int = 7) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, emb_dim=EMB, n_heads=HEADS,
                               n_layers=LAYERS, drop_rate=0.0, qkv_bias=qkv_bias, tie_weights=tie_weights))
    with torch.no_grad():  # biases and LayerNorms away from their zero/one initialisation
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no-qkv-bias", "qkv-bias"])
def test_save_hf_gpt2_loads_in_transformers_and_back_with_the_same_logits(tmp_path, tie_weights, qkv_bias):
    # given one of our models, every weight random
    ours = _random_gpt(tie_weights, qkv_bias)
    ids = _ids(seed=8)
    expected = _our_logits(ours, ids)

    # when it is saved in GPT-2's layout and loaded by transformers and by load_gpt2
    folder = save_hf_gpt2(ours, tmp_path / "export")
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    back = load_gpt2(folder)

    # then transformers finds every tensor it needs and nothing else, and both give our logits
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.config.tie_word_embeddings == tie_weights
    assert _max_diff(_hf_logits(theirs.eval(), ids), expected) <= 1e-4
    assert _max_diff(_our_logits(back, ids), expected) <= 1e-4
    assert back.cfg.tie_weights == tie_weights
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------
# refusals


def test_a_missing_tensor_is_refused_naming_it(pretrained_dir, tmp_path):
    # given a hub-layout file without one layer's MLP bias
    broken = _to_hub_layout(pretrained_dir, tmp_path, drop="h.1.mlp.c_fc.bias")

    # when / then loading names the missing tensor and the shape it should have
    with pytest.raises(WeightsError, match=r"no tensor h\.1\.mlp\.c_fc\.bias.*\[256\]"):
        load_gpt2(broken)


def test_an_unexpected_tensor_is_refused_naming_it(pretrained_dir, tmp_path):
    # given a hub-layout file with a third layer's LayerNorm, which a 2-layer config does not have
    broken = _to_hub_layout(pretrained_dir, tmp_path, add={"h.2.ln_1.weight": torch.ones(EMB)})

    # when / then loading names the unexpected tensor
    with pytest.raises(WeightsError, match=r"h\.2\.ln_1\.weight.*\[64\]"):
        load_gpt2(broken)


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it_and_both_shapes(pretrained_dir, tmp_path):
    # given a hub-layout file whose first MLP weight is stored transposed (nn.Linear's order, not Conv1D's)
    broken = _to_hub_layout(pretrained_dir, tmp_path, replace={"h.0.mlp.c_fc.weight": torch.zeros(4 * EMB, EMB)})

    # when / then loading names the tensor, the shape in the file and the shape needed
    with pytest.raises(WeightsError, match=r"h\.0\.mlp\.c_fc\.weight has shape \[256, 64\].*\[64, 256\]"):
        load_gpt2(broken)


def test_a_file_without_config_and_of_an_unknown_width_is_refused(pretrained_dir, tmp_path):
    # given a hub-layout file of width 64 with no config.json beside it
    folder = _to_hub_layout(pretrained_dir, tmp_path / "noconfig")
    (folder / "config.json").unlink()

    # when / then loading says the head count is unknown and what to do
    with pytest.raises(WeightsError, match="width 64 is not a GPT-2 size.*config.json"):
        load_gpt2(folder / "model.safetensors")


def test_an_unknown_name_is_refused_listing_the_valid_names(tmp_path, monkeypatch):
    # given a name that is neither a GPT-2 size nor a path
    monkeypatch.chdir(tmp_path)

    # when / then the error lists the four valid names
    with pytest.raises(WeightsError) as caught:
        load_gpt2("gpt2-small")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert name in str(caught.value)


def test_load_gpt2_by_name_offline_with_an_empty_cache_says_so(tmp_path, monkeypatch):
    # given an empty Hugging Face cache and offline mode (constants are read at import, so patch them too)
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    # when / then loading "gpt2" says the weights are not cached and the machine is offline
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache.*offline") as caught:
        load_gpt2("gpt2")
    assert "openai-community/gpt2" in str(caught.value)
    assert not any(cache.rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# our own checkpoints


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_load_gpt2_reads_a_checkpoint_written_by_pretrain(tmp_path, monkeypatch, tie):
    # given a one-step run of helpers.pretrain (our own tensor names, config in the metadata)
    from helpers.checkpoint import load_checkpoint
    from helpers.data import read_text
    from helpers.pretrain import main

    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "verdict.txt").write_text(read_text("the-verdict"), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "verdict.txt"), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
            "--n-layers", "1", "--n-heads", "2", "--emb-dim", "32", "--context-length", "16", "--eval-every", "0",
            "--device", "cpu", "--peak-flops", "1e12", "--quiet"] + (["--tie-weights"] if tie else [])
    assert main(argv) == 0

    # when the run's folder is loaded with load_gpt2, and with load_checkpoint for reference
    model = load_gpt2(out)
    saved_config = json.loads(safe_open(str(out / "model.safetensors"), framework="pt").metadata()["config"])
    reference = GPTModel(GPTConfig.from_dict(saved_config))
    load_checkpoint(out, reference)

    # then it has the run's config and exactly its weights (tied ones still tied)
    assert model.cfg == reference.cfg and model.cfg.tie_weights == tie
    reference_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(9))
    assert torch.equal(_our_logits(model, ids), _our_logits(reference, ids))
    if tie:
        assert model.out_head.weight is model.tok_emb.weight


def test_a_loaded_gpt2_saves_and_reloads_as_a_training_checkpoint(pretrained_dir, tmp_path):
    # given GPT-2 weights loaded into our model (q, k, v split out of one fused tensor)
    from helpers.checkpoint import load_checkpoint, save_checkpoint

    model = load_gpt2(pretrained_dir)
    # when it is saved as a training checkpoint (as finetuning does) and loaded into a fresh model
    save_checkpoint(tmp_path / "finetuned", model)
    fresh = GPTModel(model.cfg)
    load_checkpoint(tmp_path / "finetuned", fresh)
    # then every tensor comes back unchanged
    for (name, before), after in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(before, after), name


def test_a_truncated_weight_file_is_refused_naming_it(pretrained_dir, tmp_path):
    # given a copy of the weights cut short
    data = (pretrained_dir / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_bytes((pretrained_dir / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    # when loaded, then the error names the file and says it is truncated
    with pytest.raises(WeightsError, match="truncated"):
        load_gpt2(tmp_path)


# ---------------------------------------------------------------------------------------------
# the name table


@pytest.mark.parametrize("row", [*TOP_TABLE, *BLOCK_TABLE], ids=lambda row: row[0])
def test_every_row_of_the_name_table_converts_there_and_back_and_predicts_the_file_shape(row, hub_dir):
    # given a row of the table and the tensor of that name in a real GPT-2 file (from transformers)
    hf_name, ours, how = row
    name = hf_name if hf_name in TOP_TABLE_NAMES else f"h.0.{hf_name}"
    original = load_file(hub_dir / "model.safetensors")[name]

    # when it is turned into our tensor(s) and back
    converted = how.to_ours(original)
    back = how.to_hf(converted)

    # then there is one tensor per name of ours, the file's shape follows from ours, and nothing changed
    assert len(converted) == (len(ours) if isinstance(ours, tuple) else 1)
    assert how.hf_shape([list(t.shape) for t in converted]) == list(original.shape)
    assert torch.equal(back, original)


def test_the_name_table_splits_c_attn_as_transformers_computes_query_key_and_value(hf_tied, pretrained_dir):
    # given transformers' first block and the same block loaded through the table
    x = torch.randn(1, 5, EMB, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        q_ref, k_ref, v_ref = hf_tied.transformer.h[0].attn.c_attn(x).split(EMB, dim=2)
        att = load_gpt2(pretrained_dir).blocks[0].att

        # then our query, key and value projections compute transformers' three thirds
        for ours, reference in ((att.W_query, q_ref), (att.W_key, k_ref), (att.W_value, v_ref)):
            torch.testing.assert_close(ours(x), reference)


# ---------------------------------------------------------------------------------------------
# damaged safetensors files


def _rewrite_header(source: Path, target: Path, change) -> Path:
    """Copy ``source`` with ``change(header)`` applied to its JSON header; the data bytes stay as they were."""
    raw = source.read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_length])
    change(header)
    encoded = json.dumps(header).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_length:])
    shutil.copy(source.with_name("config.json"), target.with_name("config.json"))
    return target


def _shorter_range(header):  # c_fc.bias keeps its shape but claims 4 fewer bytes
    begin, end = header["h.0.mlp.c_fc.bias"]["data_offsets"]
    header["h.0.mlp.c_fc.bias"]["data_offsets"] = [begin, end - 4]


def _range_past_the_end(header):
    begin, end = header["h.0.mlp.c_fc.bias"]["data_offsets"]
    header["h.0.mlp.c_fc.bias"]["data_offsets"] = [begin + 10**9, end + 10**9]


def _overlapping_ranges(header):  # ln_1's bias points at ln_1's weight: same size, another tensor's bytes
    header["h.0.ln_1.bias"]["data_offsets"] = list(header["h.0.ln_1.weight"]["data_offsets"])


def _absurd_shape(header):  # 2**80 elements: allocating this would fail (or take the machine's memory)
    header["h.0.ln_1.bias"]["shape"] = [2**40, 2**40]


def _negative_shape(header):
    header["h.0.ln_1.bias"]["shape"] = [-EMB]


def _no_offsets(header):
    del header["h.0.ln_1.bias"]["data_offsets"]


@pytest.mark.parametrize("change, problem", [
    (_shorter_range, r"h\.0\.mlp\.c_fc\.bias of shape \[256\] and dtype F32 needs 1024 bytes"),
    (_range_past_the_end, r"h\.0\.mlp\.c_fc\.bias claims bytes .* outside the file"),
    (_overlapping_ranges, r"h\.0\.ln_1\.(bias|weight) and h\.0\.ln_1\.(bias|weight) share bytes"),
    (_absurd_shape, r"h\.0\.ln_1\.bias of shape \[1099511627776, 1099511627776\]"),
    (_negative_shape, r"h\.0\.ln_1\.bias has shape \[-64\]"),
    (_no_offsets, r"h\.0\.ln_1\.bias lacks"),
], ids=["short-range", "past-the-end", "overlap", "absurd-shape", "negative-shape", "no-offsets"])
def test_a_tensor_whose_bytes_do_not_match_its_header_is_refused_before_reading(hub_dir, tmp_path, change, problem):
    # given a hub-layout file whose header misstates one tensor (the safetensors library refuses it too)
    broken = _rewrite_header(hub_dir / "model.safetensors", tmp_path / "broken" / "model.safetensors", change)
    with pytest.raises(Exception):  # noqa: B017 (the library's error types are its own business)
        load_file(broken)

    # when / then load_gpt2 refuses it, naming the file and the tensor and saying what is wrong
    with pytest.raises(WeightsError, match=problem) as caught:
        load_gpt2(broken.parent)
    assert str(broken) in str(caught.value) and "again" in str(caught.value)


def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path):
    # given a .safetensors file that holds text
    fake = tmp_path / "model.safetensors"
    fake.write_text("not a safetensors file at all")

    # when / then loading names the file
    with pytest.raises(WeightsError, match=r"model\.safetensors is truncated or not a safetensors file"):
        load_gpt2(fake)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints


def test_a_sharded_checkpoint_from_transformers_gives_its_logits(hf_tied, tmp_path):
    # given the model saved by transformers in shards of at most 100 kB, with their index
    hf_tied.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = _ids(seed=11)

    # when the folder is loaded
    model = load_gpt2(tmp_path)

    # then every shard was read: the logits are those of transformers
    assert _max_diff(_our_logits(model, ids), _hf_logits(hf_tied, ids)) <= 1e-4


def test_a_sharded_checkpoint_with_a_shard_missing_is_refused_naming_it(hf_tied, tmp_path):
    # given a sharded save with one shard deleted
    hf_tied.save_pretrained(tmp_path, max_shard_size="100KB")
    missing = sorted(tmp_path.glob("*.safetensors"))[1]
    missing.unlink()

    # when / then loading names the missing shard and the index that lists it
    with pytest.raises(WeightsError, match=rf"index\.json names the shard {missing.name}, which is not in"):
        load_gpt2(tmp_path)


# ---------------------------------------------------------------------------------------------
# configs, folders and arguments


def _with_config(pretrained_dir: Path, target: Path, **changes) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(pretrained_dir / "model.safetensors", target / "model.safetensors")
    config = json.loads((pretrained_dir / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return target


@pytest.mark.parametrize("changes, problem", [
    ({"n_head": None}, r"config\.json lacks n_head"),
    ({"n_head": 5}, r"config\.json states sizes GPTModel cannot take: emb_dim \(64\) must be divisible by n_heads"),
    ({"n_layer": -2}, r"config\.json states sizes GPTModel cannot take: GPTConfig\.n_layers must be a positive"),
    ({"vocab_size": "1000"}, r"config\.json: vocab_size is '1000' \(str\), not an integer"),
    ({"resid_pdrop": 1.5}, r"config\.json states sizes GPTModel cannot take: GPTConfig\.drop_rate"),
], ids=["missing-key", "indivisible-heads", "negative-layers", "string-size", "dropout-out-of-range"])
def test_a_config_with_missing_keys_or_wrong_values_is_refused_naming_the_file(pretrained_dir, tmp_path, changes,
                                                                               problem):
    # given the weights beside a config.json that lacks a size or states an impossible one
    folder = _with_config(pretrained_dir, tmp_path / "model", **changes)

    # when / then loading names the config file and the problem, and says to restore the config
    with pytest.raises(WeightsError, match=problem) as caught:
        load_gpt2(folder)
    assert str(folder / "config.json") in str(caught.value) and "config.json" in str(caught.value)


def test_a_config_that_is_not_json_is_refused_naming_it(pretrained_dir, tmp_path):
    folder = _with_config(pretrained_dir, tmp_path / "model")
    (folder / "config.json").write_text("{vocab_size: 1000")
    with pytest.raises(WeightsError, match=r"config\.json cannot be read as JSON"):
        load_gpt2(folder)


def test_a_config_of_another_model_is_refused_naming_the_tensor_and_what_to_check(pretrained_dir, tmp_path):
    # given the 64-wide weights beside a config that says 128 wide (8 heads keeps it a valid config)
    folder = _with_config(pretrained_dir, tmp_path / "model", n_embd=128, n_head=8)

    # when / then the first tensor that does not fit is named, with both shapes and the advice
    with pytest.raises(WeightsError, match=r"wte\.weight has shape \[1000, 64\].*\[1000, 128\].*config belongs"):
        load_gpt2(folder)


def test_a_folder_without_weights_is_refused_listing_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(WeightsError, match=r"holds no model\.safetensors \(it holds: notes\.txt\)"):
        load_gpt2(tmp_path)


def test_a_path_that_does_not_exist_is_refused_naming_it(tmp_path):
    with pytest.raises(WeightsError, match=r"no-such-folder'.*neither a GPT-2 name .* nor an existing file"):
        load_gpt2(tmp_path / "no-such-folder")


@pytest.mark.parametrize("arguments, problem", [
    ({"dtype": torch.int64}, "dtype must be a floating-point torch.dtype"),
    ({"dtype": "float16"}, "dtype must be a floating-point torch.dtype"),
    ({"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\)"),
    ({"drop_rate": -0.1}, r"drop_rate must be a number in \[0, 1\)"),
    ({"drop_rate": float("nan")}, r"drop_rate must be a number in \[0, 1\)"),
    ({"device": "cdua"}, "device 'cdua' is not a torch device"),
], ids=["int-dtype", "string-dtype", "drop-one", "drop-negative", "drop-nan", "bad-device"])
def test_load_gpt2_refuses_bad_arguments_naming_them_before_reading_anything(tmp_path, arguments, problem):
    # given a path that does not exist: an argument error must come first, before any file is looked at
    with pytest.raises(ValueError, match=problem):
        load_gpt2(tmp_path / "no-such-folder", **arguments)


def test_load_gpt2_overrides_the_dropout_of_our_own_checkpoints_too(pretrained_dir, tmp_path):
    # given a GPT-2 saved as a training checkpoint (our names, config with drop_rate 0.1 in its metadata)
    from helpers.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "finetuned", load_gpt2(pretrained_dir))

    # when / then drop_rate replaces the recorded one, and without it the recorded one stays
    assert load_gpt2(tmp_path / "finetuned", drop_rate=0.0).cfg.drop_rate == 0.0
    assert load_gpt2(tmp_path / "finetuned").cfg.drop_rate == pytest.approx(0.1)


def test_save_hf_gpt2_into_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(WeightsError, match="exists and is not a folder"):
        save_hf_gpt2(_random_gpt(tie_weights=True, qkv_bias=False), tmp_path / "taken")


def _head_untied_behind_the_config() -> GPTModel:
    """A tied model whose head was replaced by a matrix of its own while its config still says tied
    (what merge_lora left before it learnt to update the config)."""
    model = _random_gpt(tie_weights=True, qkv_bias=False)
    with torch.no_grad():
        model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight + 0.1 * torch.randn_like(model.tok_emb.weight))
    assert model.cfg.tie_weights
    return model


def test_a_checkpoint_that_says_tied_but_holds_its_own_head_loads_that_head(tmp_path):
    # given such a model saved as a training checkpoint (its config says tied, the file holds two matrices)
    from helpers.checkpoint import save_checkpoint

    model = _head_untied_behind_the_config()
    save_checkpoint(tmp_path / "ckpt", model)

    # when load_gpt2 reads it, then the file's own head is used, not the embedding
    back = load_gpt2(tmp_path / "ckpt")
    ids = _ids(seed=12)
    assert _max_diff(_our_logits(back, ids), _our_logits(model, ids)) <= 1e-5
    assert not back.cfg.tie_weights


def test_save_hf_gpt2_refuses_a_config_that_says_tied_when_the_head_is_not(tmp_path):
    with pytest.raises(WeightsError, match=r"config says tie_weights=True but its out_head is not its token embedding"):
        save_hf_gpt2(_head_untied_behind_the_config(), tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("changes, problem", [
    ({"resid_pdrop": "0.1"}, r"resid_pdrop is '0\.1' \(str\), not a number"),
    ({"resid_pdrop": True}, r"resid_pdrop is True \(bool\), not a number"),
    ({"n_layer": 2.0}, r"n_layer is 2\.0 \(float\), not an integer"),
    ({"n_inner": "256"}, r"n_inner is '256' \(str\), not an integer or null"),
    ({"activation_function": ["gelu_new"]}, r"activation_function is \['gelu_new'\] \(list\), not a string"),
], ids=["string-dropout", "bool-dropout", "float-layers", "string-n-inner", "list-activation"])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_file_and_the_key(pretrained_dir, tmp_path, changes,
                                                                                problem):
    # given the weights beside a config.json with a value of the wrong JSON type (a string where a number belongs)
    folder = _with_config(pretrained_dir, tmp_path / "model", **changes)

    # when / then loading refuses it before building anything, naming the config file and the key
    with pytest.raises(WeightsError, match=problem) as caught:
        load_gpt2(folder)
    assert str(folder / "config.json") in str(caught.value) and "restore" in str(caught.value)


DEEP = 100_000  # far past Python's recursion limit


def test_a_safetensors_header_nested_too_deeply_is_refused_naming_the_file(tmp_path):
    # given a file whose JSON header nests lists a hundred thousand levels deep
    header = b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header)

    # when / then loading refuses it as a damaged file, naming it (not a RecursionError)
    with pytest.raises(WeightsError, match=r"model\.safetensors is truncated or not a safetensors file \(its JSON is "
                                           r"nested too deeply"):
        load_gpt2(file)


def test_a_safetensors_header_longer_than_the_format_allows_is_refused_before_it_is_read(tmp_path):
    # given a (sparse) file of 200 MB whose header claims 150 MB, over safetensors' 100 MB limit
    file = tmp_path / "model.safetensors"
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", 150_000_000))
        handle.truncate(200_000_000)
    with pytest.raises(WeightsError, match=r"claims 150000000 bytes, more than safetensors allows"):
        load_gpt2(file)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_json_file_nested_too_deeply_is_refused_naming_it(pretrained_dir, tmp_path, name):
    folder = _with_config(pretrained_dir, tmp_path / "model")
    if name != "config.json":  # a sharded layout: the index instead of the single file
        (folder / "model.safetensors").unlink()
    (folder / name).write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(WeightsError, match=r"nested too deeply") as caught:
        load_gpt2(folder)
    assert str(folder / name) in str(caught.value)
