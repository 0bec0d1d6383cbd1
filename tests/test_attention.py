"""helpers.attention: one causal head (explicit) and fused multi-head attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.attention import CausalAttention, MultiHeadAttention, padding_causal_mask


def explicit_multi_head(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out as Part 04 teaches it: masked softmax per head, no fused kernel."""
    batch, n_tokens, _ = x.shape
    heads, head_dim = mha.num_heads, mha.head_dim

    def split(t):  # (batch, n_tokens, d_out) -> (batch, heads, n_tokens, head_dim)
        return t.view(batch, n_tokens, heads, head_dim).transpose(1, 2)

    queries, keys, values = split(mha.W_query(x)), split(mha.W_key(x)), split(mha.W_value(x))
    scores = queries @ keys.transpose(2, 3) / head_dim**0.5  # (batch, heads, n_tokens, n_tokens)
    future = torch.triu(torch.ones(n_tokens, n_tokens, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    context = (weights @ values).transpose(1, 2).reshape(batch, n_tokens, heads * head_dim)
    return mha.out_proj(context)


def test_multi_head_attention_output_shape():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_in=12, d_out=8, context_length=10, dropout=0.0, num_heads=2)
    out = mha(torch.randn(3, 7, 12))
    assert out.shape == (3, 7, 8)


def test_causal_attention_output_shape():
    torch.manual_seed(0)
    head = CausalAttention(d_in=12, d_out=5, context_length=10, dropout=0.0)
    assert head(torch.randn(3, 7, 12)).shape == (3, 7, 5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_attention_equals_explicit_masked_softmax(qkv_bias):
    # given a multi-head layer with dropout configured, in eval mode (so dropout is off)
    torch.manual_seed(1)
    mha = MultiHeadAttention(d_in=16, d_out=24, context_length=12, dropout=0.5, num_heads=3, qkv_bias=qkv_bias)
    mha.eval()
    x = torch.randn(2, 9, 16)
    # when / then the fused kernel gives what the explicit computation gives
    torch.testing.assert_close(mha(x), explicit_multi_head(mha, x), rtol=1e-5, atol=1e-6)


def test_stacked_causal_heads_equal_multi_head_attention_with_their_weights():
    # given three independent CausalAttention heads
    torch.manual_seed(2)
    d_in, head_dim, n_heads, context = 10, 4, 3, 8
    heads = nn.ModuleList(CausalAttention(d_in, head_dim, context, dropout=0.0) for _ in range(n_heads))
    # and a MultiHeadAttention holding their weights, stacked, with an identity output projection
    mha = MultiHeadAttention(d_in, head_dim * n_heads, context, dropout=0.0, num_heads=n_heads)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(head_dim * n_heads))
        mha.out_proj.bias.zero_()
    x = torch.randn(2, 6, d_in)
    # when
    stacked = torch.cat([head(x) for head in heads], dim=-1)
    fused = mha(x)
    # then
    assert stacked.shape == fused.shape == (2, 6, head_dim * n_heads)
    torch.testing.assert_close(fused, stacked, rtol=1e-5, atol=1e-6)


def test_multi_head_attention_is_causal():
    # given an input and a copy whose last tokens differ
    torch.manual_seed(3)
    mha = MultiHeadAttention(d_in=8, d_out=8, context_length=10, dropout=0.0, num_heads=2).eval()
    x = torch.randn(2, 10, 8)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 8)
    # when
    out, out_changed = mha(x), mha(changed)
    # then the first six positions are untouched and the later ones do change
    torch.testing.assert_close(out[:, :6], out_changed[:, :6], rtol=0, atol=0)
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])


def test_causal_attention_is_causal():
    torch.manual_seed(4)
    head = CausalAttention(d_in=8, d_out=6, context_length=10, dropout=0.0)
    x = torch.randn(1, 10, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 6, 8)
    torch.testing.assert_close(head(x)[:, :4], head(changed)[:, :4])
    assert not torch.allclose(head(x)[:, 4:], head(changed)[:, 4:])


def test_first_token_attends_only_to_itself():
    # the first position's context is its own value vector, projected
    torch.manual_seed(5)
    mha = MultiHeadAttention(d_in=8, d_out=8, context_length=10, dropout=0.0, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(mha(x)[:, 0], mha.out_proj(mha.W_value(x[:, 0])))


def test_attention_dropout_is_active_only_in_training_mode():
    torch.manual_seed(6)
    mha = MultiHeadAttention(d_in=8, d_out=8, context_length=10, dropout=0.5, num_heads=2)
    x = torch.randn(2, 10, 8)
    mha.train()
    assert not torch.allclose(mha(x), mha(x))
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x), rtol=0, atol=0)


def test_multi_head_attention_refuses_d_out_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_out \(10\).*num_heads \(3\)"):
        MultiHeadAttention(d_in=8, d_out=10, context_length=4, dropout=0.0, num_heads=3)


def test_causal_attention_refuses_input_longer_than_context():
    head = CausalAttention(d_in=4, d_out=4, context_length=6, dropout=0.0)
    with pytest.raises(ValueError) as caught:
        head(torch.randn(1, 7, 4))
    assert "7" in str(caught.value)
    assert "6" in str(caught.value)


def test_padding_causal_mask_hides_padding_and_the_future():
    # given two rows of four tokens, the first with two tokens of left padding; one query, the last
    key_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    # when
    full, last = padding_causal_mask(key_mask, n_queries=4), padding_causal_mask(key_mask, n_queries=1)
    # then real queries see real keys up to themselves, and a padded query sees only itself
    assert full.shape == (2, 1, 4, 4) and last.shape == (2, 1, 1, 4)
    assert full[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert full[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert last[:, 0, 0].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_attention_with_a_padding_mask_equals_attention_without_the_padding():
    # given a sequence, and the same sequence behind three padding vectors
    torch.manual_seed(7)
    mha = MultiHeadAttention(d_in=8, d_out=8, context_length=10, dropout=0.0, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    padded = torch.cat([torch.randn(1, 3, 8), x], dim=1)
    key_mask = torch.tensor([[False] * 3 + [True] * 5])
    # when the padded one runs with the padding mask
    out = mha(padded, attn_mask=padding_causal_mask(key_mask, n_queries=8))
    # then the real positions are unchanged and the padded ones finite
    torch.testing.assert_close(out[:, 3:], mha(x), rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()


def test_a_query_with_no_real_key_attends_to_itself_so_left_padding_stays_finite():
    # given a batch whose first row is three padding vectors before two tokens, so its first three
    # queries have no real key at or before them
    torch.manual_seed(8)
    mha = MultiHeadAttention(d_in=8, d_out=8, context_length=10, dropout=0.0, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    key_mask = torch.tensor([[False, False, False, True, True], [True] * 5])
    # when it runs with the padding mask
    out = mha(x, attn_mask=padding_causal_mask(key_mask, n_queries=5))
    # then each padded query's output is its own value vector, projected (it attended to itself alone),
    # and the real rows are those computed without the padding
    torch.testing.assert_close(out[0, :3], mha.out_proj(mha.W_value(x[0, :3])), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 3:], mha(x[:1, 3:])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], mha(x[1:])[0], rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()

