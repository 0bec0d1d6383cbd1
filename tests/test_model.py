"""helpers.model: GPTConfig, GPTModel, its parameter counts and its KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel, count_parameters

# The published sizes of OpenAI's GPT-2 models: untied (separate output head) and tied.
PUBLISHED_PARAMETER_COUNTS = {
    "gpt2": (163_009_536, 124_412_160),
    "gpt2-medium": (406_212_608, 354_749_440),
    "gpt2-large": (838_220_800, 773_891_840),
    "gpt2-xl": (1_637_792_000, 1_557_380_800),
}


def test_gpt_model_logits_shape(tiny_cfg, tiny_model):
    ids = torch.randint(0, tiny_cfg.vocab_size, (3, 11))
    logits = tiny_model(ids)
    assert logits.shape == (3, 11, tiny_cfg.vocab_size)
    assert tiny_model(ids, return_hidden=True).shape == (3, 11, tiny_cfg.emb_dim)


def test_gpt_model_is_causal(tiny_cfg, tiny_model):
    # given two sequences that agree on their first 9 tokens only
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    changed = ids.clone()
    changed[:, 9:] = (ids[:, 9:] + 1) % tiny_cfg.vocab_size
    # when
    with torch.no_grad():
        logits, logits_changed = tiny_model(ids), tiny_model(changed)
    # then the logits of the shared prefix are identical; the rest differ
    torch.testing.assert_close(logits[:, :9], logits_changed[:, :9], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 9:], logits_changed[:, 9:])


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETER_COUNTS))
def test_gpt2_parameter_counts_match_published_sizes(name):
    # given the preset, built without allocating memory
    untied_expected, tied_expected = PUBLISHED_PARAMETER_COUNTS[name]
    cfg = GPT_CONFIGS[name]
    with torch.device("meta"):
        untied = GPTModel(cfg)
        tied = GPTModel(dataclasses.replace(cfg, tie_weights=True))
    # then
    assert untied.tok_emb.weight.device.type == "meta"
    assert count_parameters(untied) == untied_expected
    assert count_parameters(untied) - untied.out_head.weight.numel() == tied_expected
    assert count_parameters(tied) == tied_expected
    assert tied.out_head.weight is tied.tok_emb.weight


def test_gpt2_presets_have_gpt2_sizes():
    assert {name: (c.emb_dim, c.n_layers, c.n_heads) for name, c in GPT_CONFIGS.items()} == {
        "gpt2": (768, 12, 12),
        "gpt2-medium": (1024, 24, 16),
        "gpt2-large": (1280, 36, 20),
        "gpt2-xl": (1600, 48, 25),
    }
    assert {(c.vocab_size, c.context_length) for c in GPT_CONFIGS.values()} == {(50257, 1024)}


def test_tied_weights_stay_tied_after_training_step(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(tiny_cfg, tie_weights=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    before = model.tok_emb.weight.detach().clone()
    model(ids).sum().backward()
    optimizer.step()
    assert model.out_head.weight is model.tok_emb.weight
    assert not torch.equal(model.tok_emb.weight, before)


def test_kv_cache_incremental_logits_equal_full_forward(tiny_cfg, tiny_model):
    # given a full-context sequence
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    with torch.no_grad():
        full = tiny_model(ids)
        # when it is fed as a prefix, then chunks, then single tokens through one cache
        cache = tiny_model.new_kv_cache()
        pieces, start = [], 0
        for size in [5, 3, 4, 1, 1, 1, 1]:
            pieces.append(tiny_model(ids[:, start : start + size], cache))
            start += size
    assert start == tiny_cfg.context_length
    assert cache.length == tiny_cfg.context_length
    # then the logits are those of the full pass
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_kv_cache_refuses_tokens_beyond_context_length(tiny_cfg, tiny_model):
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, tiny_cfg.context_length))
    cache = tiny_model.new_kv_cache()
    with torch.no_grad():
        tiny_model(ids, cache)
        with pytest.raises(ValueError) as caught:
            tiny_model(ids[:, :1], cache)
    assert str(tiny_cfg.context_length + 1) in str(caught.value)
    assert str(tiny_cfg.context_length) in str(caught.value)


def test_input_longer_than_context_length_names_both_numbers(tiny_cfg, tiny_model):
    ids = torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError) as caught:
        tiny_model(ids)
    message = str(caught.value)
    assert f"{tiny_cfg.context_length + 1} tokens" in message
    assert f"context_length is {tiny_cfg.context_length}" in message


def test_config_refuses_emb_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"emb_dim \(30\) must be divisible by n_heads \(4\)"):
        GPTConfig(emb_dim=30, n_heads=4)


@pytest.mark.parametrize("field", ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"])
@pytest.mark.parametrize("value", [0, -8])
def test_config_refuses_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer, got {value}"):
        GPTConfig(**{field: value})


@pytest.mark.parametrize("drop_rate", [-0.1, 1.0, 1.5])
def test_config_refuses_drop_rate_outside_unit_interval(drop_rate):
    with pytest.raises(ValueError, match="drop_rate"):
        GPTConfig(drop_rate=drop_rate)


@pytest.mark.parametrize("field, value, problem", [
    ("drop_rate", "0.1", r"drop_rate must be a number in \[0, 1\), got '0\.1'"),
    ("drop_rate", True, r"drop_rate must be a number in \[0, 1\), got True"),
    ("drop_rate", float("nan"), r"drop_rate must be a number in \[0, 1\), got nan"),
    ("qkv_bias", "false", r"qkv_bias must be True or False, got 'false'"),
    ("tie_weights", 1, r"tie_weights must be True or False, got 1"),
], ids=["string-rate", "bool-rate", "nan-rate", "string-bias", "int-tie"])
def test_config_refuses_values_of_the_wrong_type_naming_the_field(field, value, problem):
    # a config from a file or a dict: "0.1" used to pass here and fail later inside nn.Dropout
    with pytest.raises(ValueError, match=problem):
        GPTConfig(**{field: value})


def test_model_accepts_config_as_dict_and_names_unknown_keys(tiny_cfg):
    model = GPTModel(tiny_cfg.to_dict())
    assert model.cfg == tiny_cfg
    with pytest.raises(ValueError, match="emb_size"):
        GPTModel({**tiny_cfg.to_dict(), "emb_size": 32})


def test_default_initialisation_is_pytorchs_like_the_inline_part06_model(tiny_cfg):
    # given the same seed, a GPTModel and the layers PyTorch would build in the same order
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    torch.manual_seed(0)
    reference_embedding = torch.nn.Embedding(tiny_cfg.vocab_size, tiny_cfg.emb_dim)
    # then the token embedding is PyTorch's N(0, 1) draw, not GPT-2's N(0, 0.02^2)
    assert torch.equal(model.tok_emb.weight, reference_embedding.weight)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.1)
    # and a linear layer is PyTorch's U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / tiny_cfg.emb_dim**0.5
    assert model.blocks[0].ff.layers[0].weight.abs().max().item() <= bound


def test_init_gpt2_weights_follows_gpt2(tiny_cfg):
    from helpers.model import init_gpt2_weights

    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(tiny_cfg, n_layers=8, emb_dim=256, vocab_size=2000))
    assert init_gpt2_weights(model) is model
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].att.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[0].ff.layers[2].weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].ff.layers[0].bias) == 0


def test_init_gpt2_weights_keeps_a_tied_head_tied(tiny_cfg):
    from helpers.model import init_gpt2_weights

    model = init_gpt2_weights(GPTModel(dataclasses.replace(tiny_cfg, tie_weights=True)))
    assert model.out_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_parameters_are_contiguous_by_default_so_common_tools_work(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    assert all(p.is_contiguous() for p in tiny_model.parameters())
    vector = torch.nn.utils.parameters_to_vector(tiny_model.parameters())  # uses view(-1)
    assert vector.numel() == count_parameters(tiny_model)
    state = {k: v for k, v in tiny_model.state_dict().items() if k != "out_head.weight"}
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "plain.safetensors"))["blocks.0.ff.layers.0.weight"],
                       tiny_model.blocks[0].ff.layers[0].weight)


# -- batches of left-padded prompts ------------------------------------------------------------------


def left_padded(sequences: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences as one (batch, longest) batch padded on the left, and its mask (1 = token, 0 = padding)."""
    width = max(len(ids) for ids in sequences)
    idx = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        idx[row, width - len(ids):], mask[row, width - len(ids):] = ids, 1
    return idx, mask


def varied_sequences(cfg, lengths: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=generator) for n in lengths]


def test_left_padded_logits_at_real_positions_equal_each_sequence_alone(tiny_cfg, tiny_model):
    # given three sequences of different lengths, left-padded into one batch
    sequences = varied_sequences(tiny_cfg, [7, 16, 2])
    idx, mask = left_padded(sequences, pad_id=3)
    # when the batch runs with its attention mask
    with torch.no_grad():
        batched = tiny_model(idx, attention_mask=mask)
        alone = [tiny_model(ids[None])[0] for ids in sequences]
    # then each row's logits at its real tokens are its logits alone, and padded positions hold no NaN
    for row, logits in enumerate(alone):
        torch.testing.assert_close(batched[row, idx.shape[1] - len(logits):], logits, rtol=0, atol=1e-5)
    assert torch.isfinite(batched).all()


def test_padding_tokens_do_not_change_the_real_tokens_logits(tiny_cfg, tiny_model):
    # given one padded batch, and the same with other ids at the padded places
    idx, mask = left_padded(varied_sequences(tiny_cfg, [4, 9]))
    other = idx.masked_fill(mask == 0, 42)
    with torch.no_grad():
        first, second = tiny_model(idx, attention_mask=mask), tiny_model(other, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(first[real], second[real], rtol=0, atol=1e-6)


def test_cache_carries_the_padding_mask_and_positions_to_later_tokens(tiny_cfg, tiny_model):
    # given a padded batch and its full forward
    idx, mask = left_padded(varied_sequences(tiny_cfg, [5, 12, 3]))  # (3, 12)
    with torch.no_grad():
        full = tiny_model(idx, attention_mask=mask)
        # when the first 9 columns (all the padding) go in with their mask, then a chunk of two and
        # a single token, without one
        cache = tiny_model.new_kv_cache()
        pieces = [tiny_model(idx[:, :9], cache, attention_mask=mask[:, :9]),
                  tiny_model(idx[:, 9:11], cache), tiny_model(idx[:, 11:], cache)]
    assert [piece.shape[1] for piece in pieces] == [9, 2, 1]
    # then the logits are those of the full pass, and the cache remembers the padding
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert torch.equal(cache.key_mask, mask.bool())


def test_a_mask_given_after_a_prefix_cached_without_one_counts_that_prefix_as_real(tiny_cfg, tiny_model):
    # given a batch without padding whose first 6 tokens went through the cache without a mask
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = tiny_model(idx)
        cache = tiny_model.new_kv_cache()
        prefix = tiny_model(idx[:, :6], cache)
        # when the rest comes with an all-ones mask, in a chunk of four and then token by token
        rest = [tiny_model(idx[:, 6:10], cache, attention_mask=torch.ones(2, 4, dtype=torch.long))]
        rest += [tiny_model(idx[:, i:i + 1], cache, attention_mask=torch.ones(2, 1, dtype=torch.long))
                 for i in (10, 11)]
    # then the logits are those of one uncached pass: the cached tokens are seen, at their positions
    torch.testing.assert_close(torch.cat([prefix, *rest], dim=1), full, rtol=0, atol=1e-5)
    assert cache.key_mask.shape == (2, 12) and bool(cache.key_mask.all())


def test_left_padded_batch_decoded_token_by_token_through_the_cache_equals_each_row_alone(tiny_cfg, tiny_model):
    # given three prompts of different lengths, left-padded into one batch, and the greedy continuation
    # each gets alone, without the cache (the reference)
    sequences = varied_sequences(tiny_cfg, [2, 7, 4])
    alone = []
    with torch.no_grad():
        for ids in sequences:
            row = ids[None]
            for _ in range(6):
                row = torch.cat([row, tiny_model(row)[:, -1:].argmax(dim=-1)], dim=1)
            alone.append(row[0, len(ids):])
        # when the batch is decoded greedily: the padded prompts once, then one token per step
        idx, mask = left_padded(sequences, pad_id=1)
        cache = tiny_model.new_kv_cache()
        logits = tiny_model(idx, cache, attention_mask=mask)[:, -1]
        steps = []
        for _ in range(6):
            next_token = logits.argmax(dim=-1, keepdim=True)
            steps.append(next_token)
            logits = tiny_model(next_token, cache)[:, -1]
    # then every row continues as it does alone, and nothing is NaN
    assert torch.equal(torch.cat(steps, dim=1), torch.stack(alone))
    assert torch.isfinite(logits).all()


def test_keep_rows_drops_finished_rows_from_the_cache(tiny_cfg, tiny_model):
    # given a padded batch whose first 10 columns are cached
    idx, mask = left_padded(varied_sequences(tiny_cfg, [6, 12, 9]))
    with torch.no_grad():
        full = tiny_model(idx, attention_mask=mask)
        cache = tiny_model.new_kv_cache()
        tiny_model(idx[:, :10], cache, attention_mask=mask[:, :10])
        # when the middle row leaves the batch
        cache.keep_rows(torch.tensor([0, 2]))
        rest = tiny_model(idx[[0, 2], 10:], cache)
    # then the remaining rows continue as before
    torch.testing.assert_close(rest, full[[0, 2], 10:], rtol=0, atol=1e-5)


def test_forward_without_a_mask_takes_the_unpadded_path_unchanged(tiny_cfg, tiny_model):
    # given a batch without padding, and a hook recording the mask each attention layer receives
    torch.manual_seed(2)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    masks: list[object] = []
    hooks = [block.att.register_forward_pre_hook(lambda module, args: masks.append(args[2]))
             for block in tiny_model.blocks]
    try:
        with torch.no_grad():
            plain = tiny_model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    # then no mask is built (the fused causal kernel runs), the logits are the plain composition of the
    # layers, and an all-ones mask gives the same logits
    assert masks == [None] * tiny_cfg.n_layers
    with torch.no_grad():
        x = tiny_model.tok_emb(idx) + tiny_model.pos_emb(torch.arange(9))
        for block in tiny_model.blocks:
            x = block(x)
        reference = tiny_model.out_head(tiny_model.final_norm(x))
        ones = tiny_model(idx, attention_mask=torch.ones_like(idx))
    assert torch.equal(plain, reference)
    torch.testing.assert_close(ones, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad_mask", [torch.ones(2, 5, dtype=torch.long), torch.ones(2, 6)],
                         ids=["wrong-shape", "float"])
def test_attention_mask_of_the_wrong_shape_or_dtype_is_refused(tiny_model, bad_mask):
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, n_tokens\) = \(2, 6\)"):
        tiny_model(torch.zeros(2, 6, dtype=torch.long), attention_mask=bad_mask)
