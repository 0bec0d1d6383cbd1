"""Part 10's modern decoder (helpers.modern) and its Qwen3 / Llama loaders, against transformers' own classes.

Nothing is downloaded: every reference model is random, tiny, seeded and saved to a temporary folder.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers.attention import LayerKVCache, MultiHeadAttention
from helpers.generate import generate, next_token_logits
from helpers.model import GPT_CONFIGS, count_parameters
from helpers.modern import (
    MODERN_CONFIGS,
    GroupedQueryAttention,
    ModernConfig,
    ModernModel,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    init_modern_weights,
    kv_cache_bytes_per_token,
    rope_frequencies,
)
from helpers.modern_weights import load_llama, load_qwen3
from helpers.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

FAMILIES = {"qwen3": (load_qwen3, True), "llama": (load_llama, False)}  # loader, qk_norm
TOLERANCE = 1e-4


def _tiny(**changes) -> ModernConfig:
    values = dict(vocab_size=61, context_length=48, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, hidden_dim=40,
                  head_dim=12, rope_theta=10_000.0, qk_norm=True, tie_weights=False, norm_eps=1e-6)
    return ModernConfig(**{**values, **changes})


def _hf_config(cfg: ModernConfig):
    """The transformers config (Qwen3Config with QK-norm, LlamaConfig without) of a model of size ``cfg``."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                    high_freq_factor=scaling.high_freq_factor,
                    original_max_position_embeddings=scaling.original_context_length)
    config_class = transformers.Qwen3Config if cfg.qk_norm else transformers.LlamaConfig
    return config_class(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
                        hidden_size=cfg.emb_dim, num_attention_heads=cfg.n_heads,
                        num_key_value_heads=cfg.n_kv_heads, num_hidden_layers=cfg.n_layers,
                        intermediate_size=cfg.hidden_dim, head_dim=cfg.head_dim, rope_parameters=rope,
                        tie_word_embeddings=cfg.tie_weights, rms_norm_eps=cfg.norm_eps,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hf_model(cfg: ModernConfig, seed: int = 0):
    """A seeded Qwen3ForCausalLM / LlamaForCausalLM whose every weight, norms included, is random."""
    torch.manual_seed(seed)
    config = _hf_config(cfg)
    model_class = transformers.Qwen3ForCausalLM if cfg.qk_norm else transformers.LlamaForCausalLM
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def _ids(cfg: ModernConfig, n_tokens: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _saved(model, folder: Path, shard: bool = False) -> Path:
    model.save_pretrained(folder, max_shard_size="1KB" if shard else "10GB")
    return folder


def _load(cfg: ModernConfig, folder: Path) -> ModernModel:
    loader, _ = FAMILIES["qwen3" if cfg.qk_norm else "llama"]
    return loader(folder)


# ---------------------------------------------------------------------------------------------
# the building blocks, each equal to transformers' own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_transformers_rmsnorm(dtype):
    # given our RMSNorm and Llama's with the same random weight
    torch.manual_seed(0)
    ours, theirs = RMSNorm(24, eps=1e-5), modeling_llama.LlamaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(2, 5, 24) * 3).to(dtype)

    # when both normalise the same input, then they agree exactly (float32 inside, the input's dtype out)
    assert torch.equal(ours.to(dtype)(x), theirs.to(dtype)(x))


def test_rmsnorm_eps_counts_as_transformers_counts_it_for_small_inputs():
    # given vectors whose mean square (about 1e-6) is as small as the eps, where eps changes the result
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24) * 1e-3
    for eps in (1e-5, 1e-6):
        ours, theirs = RMSNorm(24, eps=eps), modeling_llama.LlamaRMSNorm(24, eps=eps)

        # when / then ours is transformers' and the hand computation x / sqrt(mean(x^2) + eps)
        by_hand = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        assert _max_diff(ours(x), theirs(x)) < 1e-6
        assert _max_diff(ours(x), by_hand) < 1e-5
    assert _max_diff(RMSNorm(24, eps=1e-5)(x), RMSNorm(24, eps=1e-6)(x)) > 0.1  # eps matters here


def test_swiglu_equals_transformers_mlp():
    # given our SwiGLU and LlamaMLP holding the same gate, up and down projections
    cfg = _tiny()
    torch.manual_seed(0)
    ours, theirs = SwiGLU(cfg), modeling_llama.LlamaMLP(_hf_config(_tiny(qk_norm=False)))
    theirs.load_state_dict(ours.state_dict())  # the same names: gate_proj, up_proj, down_proj
    x = torch.randn(2, 7, cfg.emb_dim)

    # when / then they compute the same
    assert _max_diff(ours(x), theirs(x)) < 1e-6


LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=32)


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3"])
def test_rope_equals_transformers_rotary_embedding_past_the_original_context(scaling):
    # given a config with head_dim 16 and a context twice the original one (for the llama3 scaling)
    cfg = _tiny(head_dim=16, context_length=64, rope_scaling=scaling, qk_norm=False)
    theirs = modeling_llama.LlamaRotaryEmbedding(_hf_config(cfg))
    positions = torch.arange(cfg.context_length)

    # when both compute the rotation tables for every position
    cos, sin = RotaryEmbedding(cfg)(positions)
    x = torch.randn(1, 1, cfg.context_length, cfg.head_dim)
    their_cos, their_sin = theirs(x, positions[None, :])

    # then the tables and the rotated queries and keys are transformers' (positions 32..63 included)
    assert _max_diff(cos, their_cos[0]) < 1e-6 and _max_diff(sin, their_sin[0]) < 1e-6
    rotated, _ = modeling_llama.apply_rotary_pos_emb(x, x, their_cos, their_sin)
    assert _max_diff(apply_rope(x, cos, sin), rotated) < 1e-6


@pytest.mark.parametrize("theta", [500_000.0, 1_000_000.0], ids=["llama3", "qwen3"])
def test_rope_at_the_published_thetas_equals_transformers_rotary_embedding(theta):
    # given a config with Llama 3's or Qwen3's rope_theta, not the 10,000 of the original RoPE
    cfg = _tiny(head_dim=16, context_length=64, rope_theta=theta, qk_norm=False)
    positions = torch.arange(cfg.context_length)

    # when both compute the rotation tables, then they agree, and differ from theta 10,000's
    cos, sin = RotaryEmbedding(cfg)(positions)
    their_cos, their_sin = modeling_llama.LlamaRotaryEmbedding(_hf_config(cfg))(torch.zeros(1), positions[None, :])
    assert _max_diff(cos, their_cos[0]) < 1e-6 and _max_diff(sin, their_sin[0]) < 1e-6
    plain_cos, _ = RotaryEmbedding(_tiny(head_dim=16, context_length=64, rope_theta=10_000.0))(positions)
    assert _max_diff(cos, plain_cos) > 0.1


def test_llama3_scaling_keeps_fast_frequencies_and_divides_slow_ones():
    # given plain and llama3-scaled frequencies (original context 32: keep wavelengths < 8, divide those > 32)
    plain = rope_frequencies(16, 10_000.0)
    scaled = rope_frequencies(16, 10_000.0, LLAMA3_SCALING)
    wavelengths = 2 * math.pi / plain

    # then fast pairs are untouched, slow ones are divided by the factor, and the ones between are in between
    fast, slow = wavelengths < 8, wavelengths > 32
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    assert torch.equal(scaled[fast], plain[fast])
    assert torch.allclose(scaled[slow], plain[slow] / 8.0)
    between = ~fast & ~slow
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8.0)).all()


@settings(max_examples=20)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_rotated_query_key_products_depend_only_on_the_distance(query_pos, key_pos, shift):
    # given one query and one key rotated at two positions, and again with both moved by `shift`
    rope = RotaryEmbedding(_tiny(head_dim=16, context_length=128))
    generator = torch.Generator().manual_seed(query_pos * 41 + key_pos)
    query, key = torch.randn(2, 1, 1, 1, 16, generator=generator, dtype=torch.float64)

    def product(q_at: int, k_at: int) -> float:
        cos, sin = rope(torch.tensor([q_at, k_at]))
        return float((apply_rope(query, cos[:1], sin[:1]) * apply_rope(key, cos[1:], sin[1:])).sum())

    # then the attention score is the same: it sees only query_pos - key_pos
    assert product(query_pos, key_pos) == pytest.approx(product(query_pos + shift, key_pos + shift), abs=1e-4)


def _identity_rotation(n_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n_tokens, head_dim), torch.zeros(n_tokens, head_dim)


def test_grouped_query_attention_with_one_head_per_kv_head_and_no_rotation_is_multi_head_attention():
    # given GroupedQueryAttention with n_kv_heads == n_heads, head_dim = emb_dim / n_heads, no QK-norm,
    # and MultiHeadAttention holding the same weights (its out_proj bias zero: ours has none)
    cfg = _tiny(emb_dim=32, n_heads=4, n_kv_heads=4, head_dim=8, qk_norm=False)
    torch.manual_seed(0)
    ours = GroupedQueryAttention(cfg).eval()
    theirs = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, 0.0, cfg.n_heads).eval()
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value", "out_proj"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
        theirs.out_proj.bias.zero_()
    x = torch.randn(2, 10, cfg.emb_dim)

    # when ours is given the identity rotation (cos = 1, sin = 0: RoPE turns every pair by angle 0),
    # which isolates what MultiHeadAttention has (projections, heads, causal mask), also through the cache
    cos, sin = _identity_rotation(10, cfg.head_dim)
    ours_cache, theirs_cache = LayerKVCache(cfg.context_length), LayerKVCache(cfg.context_length)
    ours_steps = torch.cat([ours(x[:, :6], cos[:6], sin[:6], ours_cache),
                            ours(x[:, 6:], cos[6:], sin[6:], ours_cache)], dim=1)
    theirs_steps = torch.cat([theirs(x[:, :6], theirs_cache), theirs(x[:, 6:], theirs_cache)], dim=1)

    # then both compute the same
    assert _max_diff(ours(x, cos, sin), theirs(x)) < 1e-6
    assert _max_diff(ours_steps, theirs_steps) < 1e-6


def test_each_kv_head_serves_its_group_of_query_heads():
    # given grouped attention (4 query heads, 2 kv heads) and an ungrouped copy whose kv heads repeat
    # the grouped ones (query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1)
    grouped_cfg = _tiny(n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    grouped = GroupedQueryAttention(grouped_cfg).eval()
    full = GroupedQueryAttention(_tiny(n_heads=4, n_kv_heads=4)).eval()
    state = grouped.state_dict()
    for name in ("W_key.weight", "W_value.weight"):  # (n_kv_heads * head_dim, emb_dim) -> repeat each head
        state[name] = state[name].view(2, 12, -1).repeat_interleave(2, dim=0).reshape(48, -1)
    full.load_state_dict(state)
    x = torch.randn(2, 9, grouped_cfg.emb_dim)
    cos, sin = RotaryEmbedding(grouped_cfg)(torch.arange(9))

    # when / then they compute the same
    assert _max_diff(grouped(x, cos, sin), full(x, cos, sin)) < 1e-6


def test_attention_dropout_is_unbiased_in_training_and_off_in_eval_mode():
    # given grouped attention with dropout 0.5 (on its attention weights: it has no other dropout), and one
    # input repeated 4,000 times along the batch, so that every copy draws its own dropout mask
    cfg = _tiny(drop_rate=0.5)
    torch.manual_seed(0)
    attention = GroupedQueryAttention(cfg)
    x = torch.randn(1, 9, cfg.emb_dim).expand(4000, 9, cfg.emb_dim)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(9))

    # when it runs in training mode, twice, and in eval mode
    with torch.no_grad():
        attention.train()
        first, second = attention(x, cos, sin), attention(x, cos, sin)
        attention.eval()
        plain = attention(x, cos, sin)

    # then training outputs vary from call to call and from copy to copy, eval's do not
    assert not torch.allclose(first, second)
    assert first[:, 1:].std(dim=0).min() > 1e-3  # the first token's one weight is dropped or doubled: that varies too
    assert torch.equal(plain, attention(x, cos, sin)) and torch.equal(plain[0], plain[-1])
    # and inverted dropout keeps the expectation: the mean of the training outputs is the eval output
    # (to within 5 standard errors of that mean)
    standard_error = first.std(dim=0) / math.sqrt(first.shape[0])
    assert ((first.mean(dim=0) - plain[0]).abs() < 5 * standard_error + 1e-6).all()


def test_in_a_model_with_only_attention_dropout_training_outputs_vary_and_eval_outputs_do_not():
    # given a model with drop_rate 0.5 whose embedding and shortcut dropouts are switched off
    cfg = _tiny(drop_rate=0.5)
    torch.manual_seed(0)
    model = ModernModel(cfg)
    model.drop_emb.p = 0.0
    for block in model.blocks:
        block.drop_shortcut.p = 0.0
    ids = _ids(cfg, n_tokens=12)

    # when / then training mode varies from call to call, and eval mode is the model without dropout
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(ids), model(ids))
        model.eval()
        plain = model(ids)
        assert torch.equal(plain, model(ids))
        undropped = ModernModel(_tiny(drop_rate=0.0)).train()  # training mode, nothing to drop
        undropped.load_state_dict(model.state_dict())
        assert _max_diff(undropped(ids), plain) < 1e-6


# ---------------------------------------------------------------------------------------------
# the whole model against Qwen3ForCausalLM and LlamaForCausalLM, through load_qwen3 / load_llama

CONFIGS = st.builds(
    lambda family, vocab, layers, kv_heads, group, head_dim, emb, hidden, theta, tied, scaled: _tiny(
        vocab_size=vocab, n_layers=layers, n_kv_heads=kv_heads, n_heads=kv_heads * group, head_dim=head_dim,
        emb_dim=emb, hidden_dim=hidden, rope_theta=theta, tie_weights=tied, qk_norm=family == "qwen3",
        rope_scaling=LLAMA3_SCALING if scaled and family == "llama" else None),
    family=st.sampled_from(["qwen3", "llama"]), vocab=st.integers(8, 80), layers=st.integers(1, 2),
    kv_heads=st.integers(1, 2), group=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 12, 16]),
    emb=st.sampled_from([8, 16, 24]), hidden=st.integers(4, 40), theta=st.sampled_from([100.0, 10_000.0, 1e6]),
    tied=st.booleans(), scaled=st.booleans(),
)


@settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=CONFIGS, shard=st.booleans())
@example(cfg=_tiny(tie_weights=True), shard=True)
@example(cfg=_tiny(qk_norm=False, n_heads=6, n_kv_heads=2, rope_scaling=LLAMA3_SCALING), shard=True)
def test_loaded_checkpoint_gives_the_logits_of_transformers(cfg, shard):
    # given a random Qwen3 or Llama model of a drawn size, saved by save_pretrained (maybe in shards)
    reference = _hf_model(cfg)
    ids = _ids(cfg, n_tokens=cfg.context_length - 4)  # past the llama3 scaling's original context (32)
    with tempfile.TemporaryDirectory() as folder:
        # when it is loaded by load_qwen3 / load_llama
        saved = _saved(reference, Path(folder), shard)
        assert (saved / "model.safetensors.index.json").is_file() == shard
        model = _load(cfg, saved)

    # then the config read from config.json is the drawn one, and the logits are transformers'
    assert model.cfg == cfg
    with torch.no_grad():
        assert _max_diff(model(ids), reference(ids).logits) < TOLERANCE


def _hf_reference(folder: Path):
    """transformers' own reading of a saved folder (its config defaults included)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_config_without_tie_word_embeddings_is_untied_as_in_transformers(family, tmp_path):
    # given an untied checkpoint whose config.json leaves tie_word_embeddings out
    cfg = _tiny(qk_norm=family == "qwen3", tie_weights=False)
    folder = _saved(_hf_model(cfg, seed=5), tmp_path / family)
    config = json.loads((folder / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(config))
    # (transformers' default for both families is untied)
    config_class = transformers.Qwen3Config if cfg.qk_norm else transformers.LlamaConfig
    assert config_class().tie_word_embeddings is False

    # when ours and transformers read it
    theirs = _hf_reference(folder)
    model = _load(cfg, folder)

    # then both keep the file's own head, and the logits agree
    assert theirs.config.tie_word_embeddings is False
    assert model.cfg == cfg and model.out_head.weight is not model.tok_emb.weight
    ids = _ids(cfg, n_tokens=20)
    with torch.no_grad():
        assert _max_diff(model(ids), theirs(ids).logits) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_head_dim_other_than_hidden_size_over_heads_is_read_from_the_config(family, tmp_path):
    # given a random model of Qwen3-0.6B's proportions: head_dim twice hidden_size / heads
    # (there 128 against 1024 / 16 = 64; here 16 against 32 / 4 = 8)
    cfg = _tiny(qk_norm=family == "qwen3", emb_dim=32, n_heads=4, n_kv_heads=2, head_dim=16)
    reference = _hf_model(cfg, seed=6)
    assert reference.model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)

    # when it is saved by transformers and loaded by ours
    model = _load(cfg, _saved(reference, tmp_path / family))

    # then the head_dim is the config's, and the logits are transformers'
    assert model.cfg.head_dim == 16 and model.cfg == cfg
    ids = _ids(cfg, n_tokens=20)
    with torch.no_grad():
        assert _max_diff(model(ids), reference(ids).logits) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_tied_checkpoint_that_also_stores_its_head_loads_with_the_logits_of_transformers(family, tmp_path):
    # given a tied checkpoint (transformers writes the embedding only) rewritten to hold lm_head.weight too,
    # a copy of the embedding, as some conversions write it
    cfg = _tiny(qk_norm=family == "qwen3", tie_weights=True)
    reference = _hf_model(cfg, seed=7)
    saved = _saved(reference, tmp_path / "saved")
    assert "lm_head.weight" not in load_file(saved / "model.safetensors")
    both = _rewritten(saved, tmp_path / "both",
                      lambda tensors: tensors.update({"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}))

    # when it is loaded by ours and by transformers
    model = _load(cfg, both)
    theirs = _hf_reference(both)

    # then the head is the embedding, tied, and the logits are transformers'
    assert model.out_head.weight is model.tok_emb.weight
    ids = _ids(cfg, n_tokens=20)
    with torch.no_grad():
        assert _max_diff(model(ids), theirs(ids).logits) < TOLERANCE
        assert _max_diff(model(ids), reference(ids).logits) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_checkpoint_with_the_published_rope_theta_and_rms_eps_gives_the_logits_of_transformers(family, tmp_path):
    # given a random model with Qwen3's rope_theta and Llama 3's rms_norm_eps (not the defaults), saved by
    # transformers (which writes rope_theta inside rope_parameters), and a sequence long enough for theta to matter
    cfg = _tiny(qk_norm=family == "qwen3", rope_theta=1_000_000.0, norm_eps=1e-5)
    reference = _hf_model(cfg, seed=8)
    folder = _saved(reference, tmp_path / family)
    assert "rope_theta" in json.loads((folder / "config.json").read_text())["rope_parameters"]

    # when it is loaded, then its config and logits are transformers'
    model = _load(cfg, folder)
    assert model.cfg.rope_theta == 1_000_000.0 and model.cfg.norm_eps == 1e-5 and model.cfg == cfg
    ids = _ids(cfg, n_tokens=44)
    with torch.no_grad():
        assert _max_diff(model(ids), reference(ids).logits) < TOLERANCE


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def reference_and_folder(request, tmp_path_factory):
    """One random reference model of each family (llama with llama3 scaling), saved once for several tests."""
    cfg = _tiny(qk_norm=request.param == "qwen3", tie_weights=request.param == "llama",
                rope_scaling=LLAMA3_SCALING if request.param == "llama" else None)
    reference = _hf_model(cfg, seed=3)
    return cfg, reference, _saved(reference, tmp_path_factory.mktemp(request.param))


def test_greedy_generation_is_token_for_token_that_of_transformers(reference_and_folder):
    # given the loaded model and transformers' own, and a prompt
    cfg, reference, folder = reference_and_folder
    model = _load(cfg, folder)
    prompt = _ids(cfg, n_tokens=5, batch=1, seed=4)

    # when both decode greedily (ours with and without the KV cache)
    theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False)
    with_cache = generate(model, prompt, 20, use_cache=True)
    without_cache = generate(model, prompt, 20, use_cache=False)

    # then all three give the same tokens
    assert torch.equal(with_cache, theirs)
    assert torch.equal(without_cache, theirs)


def test_legacy_config_with_rope_theta_and_rope_scaling_loads_the_same(reference_and_folder, tmp_path):
    # given the same checkpoint with its config written as older transformers wrote it:
    # top-level rope_theta, and rope_scaling using "type" (or null for plain RoPE)
    cfg, reference, folder = reference_and_folder
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    config = json.loads((legacy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    (legacy / "config.json").write_text(json.dumps(config))

    # when / then it loads into the same config and logits
    model = _load(cfg, legacy)
    assert model.cfg == cfg
    ids = _ids(cfg, n_tokens=40)
    with torch.no_grad():
        assert _max_diff(model(ids), reference(ids).logits) < TOLERANCE


def test_loading_in_bfloat16_gives_bfloat16_weights_close_to_float32(reference_and_folder):
    # given the checkpoint loaded twice, in float32 and in bfloat16
    cfg, _, folder = reference_and_folder
    loader, _ = FAMILIES["qwen3" if cfg.qk_norm else "llama"]
    full, half = loader(folder), loader(folder, dtype=torch.bfloat16)

    # then every bfloat16 parameter is there and the logits stay close
    assert {parameter.dtype for parameter in half.parameters()} == {torch.bfloat16}
    ids = _ids(cfg, n_tokens=20)
    with torch.no_grad():
        assert _max_diff(full(ids), half(ids)) < 0.1 * full(ids).abs().max().item()


# ---------------------------------------------------------------------------------------------
# the KV cache


def test_cached_decoding_gives_the_logits_of_one_full_pass():
    # given a random model and a sequence
    cfg = _tiny(context_length=96, rope_scaling=LLAMA3_SCALING)
    torch.manual_seed(0)
    model = ModernModel(cfg).eval()
    ids = _ids(cfg, n_tokens=80)

    # when the sequence goes in one pass, and as a prompt of 7, chunks of 3 and single tokens through a cache
    # (which grows from 64 positions to 96 on the way, copying what it holds)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache()
        pieces = [model(ids[:, :7], cache)]
        pieces += [model(ids[:, start:start + 3], cache) for start in range(7, 19, 3)]
        pieces += [model(ids[:, position:position + 1], cache) for position in range(19, 80)]

    # then every position's logits agree (the cached keys were rotated at their absolute positions)
    assert cache.length == 80 and cache.layers[0].keys.shape[2] == 96
    assert _max_diff(torch.cat(pieces, dim=1), full) < 1e-5


def test_cache_grows_as_it_fills_instead_of_allocating_the_whole_context():
    # given a model with a long context
    cfg = _tiny(context_length=4096, n_layers=1)
    model = ModernModel(cfg).eval()
    cache = model.new_kv_cache()

    # when 5 and then 100 more tokens are cached
    with torch.no_grad():
        model(_ids(cfg, 5), cache)
        room_after_5 = cache.layers[0].keys.shape[2]
        model(_ids(cfg, 100, seed=2), cache)

    # then the buffers hold a little more than what is used, not 4096 positions
    assert room_after_5 == 64
    assert cache.length == 105 and 105 <= cache.layers[0].keys.shape[2] <= 210


def test_generation_past_the_context_with_the_cache_equals_without():
    # given a model with a context of 16 and a prompt of 10
    cfg = _tiny(context_length=16)
    torch.manual_seed(1)
    model = ModernModel(cfg).eval()
    prompt = _ids(cfg, n_tokens=10, batch=1)

    # when 20 tokens are generated greedily, the cache being rebuilt whenever the window is full
    without_cache = generate(model, prompt, 20, use_cache=False)
    idx, cache = prompt, None
    for _ in range(20):
        logits, cache = next_token_logits(model, idx, cache, cfg.context_length, use_cache=True)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)

    # then the tokens are the same
    assert torch.equal(idx, without_cache)
    assert torch.equal(generate(model, prompt, 20, use_cache=True), without_cache)


def test_kv_cache_bytes_per_token_matches_the_filled_cache():
    # given a GQA model whose cache holds 30 tokens
    cfg = _tiny(n_heads=6, n_kv_heads=2)
    model = ModernModel(cfg).eval()
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(_ids(cfg, 30, batch=1), cache)

    # then the bytes the cache uses for them are 30 x kv_cache_bytes_per_token
    used = sum(layer.keys[:, :, :30].nbytes + layer.values[:, :, :30].nbytes for layer in cache.layers)
    assert used == 30 * kv_cache_bytes_per_token(cfg)
    # and the published sizes: GPT-2 keeps 12 heads x 64 per layer, Qwen3-0.6B 8 kv heads x 128 over 28 layers
    assert kv_cache_bytes_per_token(GPT_CONFIGS["gpt2"], torch.bfloat16) == 2 * 12 * 12 * 64 * 2
    assert kv_cache_bytes_per_token(MODERN_CONFIGS["qwen3-0.6b"], torch.bfloat16) == 2 * 28 * 8 * 128 * 2


# ---------------------------------------------------------------------------------------------
# training, presets, configs


def test_train_model_trains_a_modern_model():
    # given a small ModernModel and a few batches of one repeated sequence
    from helpers.train import train_model

    cfg = _tiny(context_length=16)
    torch.manual_seed(0)
    model = ModernModel(cfg)
    tokens = _ids(cfg, n_tokens=17, batch=4)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # when train_model runs an epoch of 4 steps
    history = train_model(model, batches, batches[:1], optimizer, "cpu", num_epochs=1, eval_freq=2, eval_iter=1,
                          verbose=False, progress=False)

    # then it evaluated twice and the loss fell
    assert history["steps"] == [2, 4]
    assert history["train_losses"][1] < history["train_losses"][0]


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_init_draws_each_kind_of_weight_at_its_hand_computed_std(std):
    # given a model of 8 layers, wide enough that each matrix holds thousands of draws (the standard
    # deviation of n draws is estimated to within about 1 / sqrt(2 n) of itself: 1.6% for 64 x 32),
    # its norms first set away from 1
    cfg = _tiny(vocab_size=512, emb_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, n_layers=8)
    torch.manual_seed(0)
    model = ModernModel(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(3.0)

    # when it is initialised
    init_modern_weights(model, std=std)

    # then, by hand: every weight has mean 0 and std `std`, except the two projections that write into the
    # residual stream, whose std is std / sqrt(2 x 8 layers) = std / 4; every norm starts at 1
    residual = std / 4
    expected = {"att.W_query": std, "att.W_key": std, "att.W_value": std, "att.out_proj": residual,
                "ff.gate_proj": std, "ff.up_proj": std, "ff.down_proj": residual}
    for index, block in enumerate(model.blocks):
        for name, wanted in expected.items():
            weight = block.get_submodule(name).weight
            assert weight.std().item() == pytest.approx(wanted, rel=0.08), f"blocks.{index}.{name}"
            assert abs(weight.mean().item()) < 5 * wanted / math.sqrt(weight.numel()), f"blocks.{index}.{name}"
    for name in ("tok_emb", "out_head"):  # untied: each its own draw
        assert model.get_submodule(name).weight.std().item() == pytest.approx(std, rel=0.05), name
    norms = [module.weight for module in model.modules() if isinstance(module, RMSNorm)]
    assert len(norms) == 4 * cfg.n_layers + 1  # norm1, norm2, q_norm, k_norm per block; the final norm
    assert all(torch.equal(weight, torch.ones_like(weight)) for weight in norms)


def test_return_hidden_gives_what_the_output_head_reads():
    cfg = _tiny(tie_weights=True)
    model = ModernModel(cfg).eval()
    ids = _ids(cfg, 6)
    with torch.no_grad():
        assert _max_diff(model.out_head(model(ids, return_hidden=True)), model(ids)) == 0.0
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize(("name", "published"), [("qwen3-0.6b", 596_049_920), ("llama3.2-1b", 1_235_814_400)])
def test_presets_have_the_published_parameter_counts(name, published):
    # given a preset, built on the meta device by us and (from the same sizes) by transformers
    cfg = MODERN_CONFIGS[name]
    with torch.device("meta"):
        ours = ModernModel(cfg)
        theirs = (transformers.Qwen3ForCausalLM if cfg.qk_norm else transformers.LlamaForCausalLM)(_hf_config(cfg))

    # then the counts agree with each other and with the published count (tied: the embedding counts once)
    assert count_parameters(ours) == sum(parameter.numel() for parameter in theirs.parameters()) == published


PUBLISHED_CONFIGS = {  # the sizes of the hub's config.json files (written by transformers 4.x)
    "qwen3-0.6b": {"model_type": "qwen3", "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
                   "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
                   "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                   "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "llama3.2-1b": {"model_type": "llama", "attention_bias": False, "head_dim": 64, "hidden_act": "silu",
                    "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
                    "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
                    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
}


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_the_published_config_json_reads_into_the_preset(name, tmp_path):
    from helpers.modern_weights import LLAMA, QWEN3, _read_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_CONFIGS[name]))
    assert _read_config(path, QWEN3 if name.startswith("qwen") else LLAMA) == MODERN_CONFIGS[name]


def test_config_round_trips_through_a_dict():
    cfg = MODERN_CONFIGS["llama3.2-1b"]
    as_dict = json.loads(json.dumps(cfg.to_dict()))
    assert as_dict["rope_scaling"]["factor"] == 32.0
    assert ModernConfig.from_dict(as_dict) == cfg
    with pytest.raises(ValueError, match="unknown ModernConfig keys.*n_embd"):
        ModernConfig.from_dict({**as_dict, "n_embd": 5})


@pytest.mark.parametrize(("change", "message"), [
    ({"n_heads": 6, "n_kv_heads": 4}, r"n_heads \(6\) must be divisible by n_kv_heads \(4\)"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"vocab_size": True}, "vocab_size must be a positive integer"),
    ({"norm_eps": 0.0}, "norm_eps must be a positive finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_type 'yarn' is not one this model knows"),
    ({"rope_scaling": {"low_freq_factor": 4.0, "high_freq_factor": 4.0}}, "high_freq_factor .* must exceed"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be None or a RopeScaling"),
    ({"qk_norm": 1}, "qk_norm must be True or False"),
    ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
])
def test_invalid_configs_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**change)


# ---------------------------------------------------------------------------------------------
# what the loaders refuse


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> tuple[ModernConfig, Path]:
    cfg = _tiny(n_layers=1)
    return cfg, _saved(_hf_model(cfg), tmp_path_factory.mktemp("qwen-small"))


def _rewritten(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it_and_both_shapes(qwen_folder, tmp_path):
    _, folder = qwen_folder
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _rewritten(folder, tmp_path / "bad", lambda tensors: tensors.update({name: torch.zeros(12, 32)}))
    with pytest.raises(WeightsError, match=rf"{name} has shape \[12, 32\].*needs \[24, 32\]"):
        load_qwen3(bad)


def test_a_missing_tensor_is_refused_naming_it(qwen_folder, tmp_path):
    _, folder = qwen_folder
    name = "model.layers.0.self_attn.q_norm.weight"
    bad = _rewritten(folder, tmp_path / "bad", lambda tensors: tensors.pop(name))
    with pytest.raises(WeightsError, match=rf"no tensor {name} \(expected shape \[12\]\)"):
        load_qwen3(bad)


def test_an_unexpected_tensor_is_refused_naming_it(qwen_folder, tmp_path):
    _, folder = qwen_folder
    extra = "model.layers.1.mlp.up_proj.weight"
    bad = _rewritten(folder, tmp_path / "bad", lambda tensors: tensors.update({extra: torch.zeros(40, 32)}))
    with pytest.raises(WeightsError, match=rf"holds {extra} \(shape \[40, 32\]\).*1 layers"):
        load_qwen3(bad)


def test_a_qwen3_checkpoint_given_to_load_llama_says_which_loader_to_use(qwen_folder):
    _, folder = qwen_folder
    with pytest.raises(WeightsError, match="model_type 'qwen3' is not 'llama'.*load_qwen3"):
        load_llama(folder)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0), "rope_parameters.rope_type 'yarn'"),
    (lambda c: c.update(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type 'dynamic'"),
    (lambda c: c["rope_parameters"].update(rope_type="llama3", factor=8.0), "lacks low_freq_factor"),
    (lambda c: c.update(rope_parameters={"full_attention": c["rope_parameters"]}), "per kind of layer"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act is 'gelu'"),
    (lambda c: c.update(attention_bias=True), "attention_bias is True"),
    (lambda c: c.pop("intermediate_size"), "lacks intermediate_size"),
])
def test_a_config_the_model_cannot_compute_is_refused_naming_the_key(qwen_folder, tmp_path, edit, message):
    _, folder = qwen_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        load_qwen3(bad)


def test_a_tied_checkpoint_whose_head_differs_from_its_embedding_is_refused(qwen_folder, tmp_path):
    # given a checkpoint whose config says tied but which stores a different lm_head
    _, folder = qwen_folder
    bad = _rewritten(folder, tmp_path / "bad", lambda tensors: None)
    config = json.loads((bad / "config.json").read_text())
    assert not config["tie_word_embeddings"]
    (bad / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(WeightsError, match="lm_head.weight that differs from model.embed_tokens.weight"):
        load_qwen3(bad)


def test_a_hub_name_offline_with_an_empty_cache_says_so(tmp_path, monkeypatch):
    # given an empty Hugging Face cache and offline mode (constants are read at import, so patch them too)
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf"
    for variable, value in (("HF_HOME", cache), ("HF_HUB_CACHE", cache / "hub")):
        monkeypatch.setenv(variable, str(value))
        monkeypatch.setattr(hf_constants, variable, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    # when / then a preset name and an unknown word are refused, each saying why
    with pytest.raises(WeightsError, match=r"Qwen/Qwen3-0.6B is not in the Hugging Face cache.*offline"):
        load_qwen3("qwen3-0.6b")
    with pytest.raises(WeightsError, match="neither a Llama name .*llama3.2-1b"):
        load_llama("llama-tiny")
