"""chunked_cross_entropy against the reference, F.cross_entropy on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.losses import chunked_cross_entropy

VOCAB, EMB = 97, 24


def _inputs(shape: tuple[int, ...], seed: int = 0, ignored: int = 0):
    """Random hidden states ``shape + (EMB,)``, a head ``(VOCAB, EMB)`` and targets, some set to -100."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, EMB, generator=generator)
    weight = torch.randn(VOCAB, EMB, generator=generator) * 0.5
    targets = torch.randint(0, VOCAB, shape, generator=generator)
    if ignored:
        flat = targets.view(-1)
        flat[torch.randperm(flat.numel(), generator=generator)[:ignored]] = -100
    return hidden, weight, targets


def _value_and_grads(loss_fn, hidden, weight, targets):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _reference(hidden, weight, targets):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize(
    ("shape", "chunk_rows", "ignored"),
    [
        ((40,), None, 0),  # one chunk (default size)
        ((40,), 7, 0),  # 7 does not divide 40: a short last chunk
        ((40,), 7, 9),  # ignored rows in several chunks
        ((3, 13), 5, 6),  # 3-D hidden (batch, n, d), chunks crossing sequence borders
        ((2, 11), 1, 3),  # one row per chunk
    ],
)
def test_chunked_cross_entropy_value_and_gradients_equal_full_logits(shape, chunk_rows, ignored):
    # given random hidden states, a head and targets (some ignored)
    hidden, weight, targets = _inputs(shape, seed=len(shape) * 100 + (chunk_rows or 0), ignored=ignored)

    # when the loss and both gradients come from the chunked function and from F.cross_entropy
    loss, grad_hidden, grad_weight = _value_and_grads(
        lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_rows=chunk_rows), hidden, weight, targets)
    ref_loss, ref_grad_hidden, ref_grad_weight = _value_and_grads(_reference, hidden, weight, targets)

    # then value and gradients agree in float32
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grad_hidden.shape == hidden.shape
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-5, atol=1e-6)
    if ignored:  # rows that do not count get no gradient
        assert torch.all(grad_hidden[targets == -100] == 0)


def test_chunked_cross_entropy_scales_gradients_by_upstream_gradient():
    # given a loss used inside a larger expression (3 * loss)
    hidden, weight, targets = _inputs((2, 9), seed=5, ignored=2)

    # when both versions are backpropagated through the multiplication
    _, grad_hidden, grad_weight = _value_and_grads(
        lambda h, w, t: 3.0 * chunked_cross_entropy(h, w, t, chunk_rows=4), hidden, weight, targets)
    _, ref_grad_hidden, ref_grad_weight = _value_and_grads(
        lambda h, w, t: 3.0 * _reference(h, w, t), hidden, weight, targets)

    # then the gradients carry the factor as autograd would
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_gradient_of_hidden_only_when_weight_is_frozen():
    # given a frozen head (requires_grad False) and trainable hidden states
    hidden, weight, targets = _inputs((4, 6), seed=6)
    hidden_a = hidden.clone().requires_grad_(True)
    hidden_b = hidden.clone().requires_grad_(True)

    # when the loss is backpropagated
    chunked_cross_entropy(hidden_a, weight, targets, chunk_rows=5).backward()
    _reference(hidden_b, weight, targets).backward()

    # then the hidden gradient matches the reference
    torch.testing.assert_close(hidden_a.grad, hidden_b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_chunked_cross_entropy_without_grad_equals_full_logits(chunk_rows):
    # given inputs with ignored rows
    hidden, weight, targets = _inputs((3, 10), seed=7, ignored=5)

    # when the loss is computed under no_grad (the evaluation path) and without requires_grad
    with torch.no_grad():
        no_grad_loss = chunked_cross_entropy(hidden.requires_grad_(True), weight, targets,
                                             chunk_rows=chunk_rows)
    plain_loss = chunked_cross_entropy(hidden.detach(), weight, targets, chunk_rows=chunk_rows)

    # then both equal F.cross_entropy and carry no graph
    expected = _reference(hidden.detach(), weight, targets)
    torch.testing.assert_close(no_grad_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain_loss, expected, rtol=1e-5, atol=1e-6)
    assert not no_grad_loss.requires_grad and not plain_loss.requires_grad


def test_chunked_cross_entropy_of_a_real_model_head_equals_model_logits_loss():
    # given a tiny GPTModel and a batch of token ids
    from helpers.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=12, emb_dim=32, n_heads=4, n_layers=1,
                               drop_rate=0.0))
    inputs = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))

    # when the chunked loss takes the hidden states and the head weight
    hidden = model(inputs, return_hidden=True)
    loss = chunked_cross_entropy(hidden, model.out_head.weight, targets, chunk_rows=5)

    # then it equals cross-entropy of the model's logits
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_with_every_target_ignored_is_nan_like_the_reference():
    # given targets that are all ignore_index
    hidden, weight, targets = _inputs((5,), seed=8)
    targets[:] = -100

    # when the loss is computed
    loss = chunked_cross_entropy(hidden, weight, targets)

    # then it is NaN, as F.cross_entropy's mean over no elements is
    assert torch.isnan(loss) and torch.isnan(_reference(hidden, weight, targets))


@pytest.mark.parametrize("bad_target", [-1, VOCAB], ids=["negative", "past-vocab"])
def test_chunked_cross_entropy_refuses_targets_outside_the_vocabulary_like_the_reference(bad_target):
    # given one target that is neither a token id nor ignore_index (-100)
    hidden, weight, targets = _inputs((6,), seed=9)
    targets[2] = bad_target
    with pytest.raises((IndexError, RuntimeError)):
        _reference(hidden, weight, targets)

    # when / then the chunked loss refuses it too, instead of scoring it as some other token
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        chunked_cross_entropy(hidden, weight, targets)
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        chunked_cross_entropy(hidden.requires_grad_(True), weight, targets)


def test_chunked_cross_entropy_refuses_targets_of_another_shape():
    # given hidden states for 2 x 5 positions and targets for 2 x 4
    hidden, weight, _ = _inputs((2, 5))
    targets = torch.zeros(2, 4, dtype=torch.long)

    # when / then the shape mismatch is refused, naming both shapes
    with pytest.raises(ValueError, match=r"\(2, 5, 24\).*\(2, 4\)"):
        chunked_cross_entropy(hidden, weight, targets)


def test_chunked_cross_entropy_refuses_a_head_of_another_width():
    # given hidden states of width 24 and a head of width 16
    hidden, _, targets = _inputs((6,))
    weight = torch.randn(VOCAB, 16)

    # when / then the width mismatch is refused, naming both sizes
    with pytest.raises(ValueError, match=r"24.*\(97, 16\)"):
        chunked_cross_entropy(hidden, weight, targets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_chunked_cross_entropy_under_autocast_equals_cross_entropy_of_autocast_logits(dtype, chunk_rows):
    # given hidden states and a float32 head, as a model under autocast would produce them
    hidden, weight, targets = _inputs((40,), seed=5, ignored=4)

    # when both losses run under CPU autocast in the lower precision
    with torch.autocast("cpu", dtype=dtype):
        loss, grad_hidden, grad_weight = _value_and_grads(
            lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_rows=chunk_rows), hidden, weight, targets)
        ref_loss, ref_hidden, ref_weight = _value_and_grads(_reference, hidden, weight, targets)

    # then the loss and both gradients agree to the precision's few digits (a doubled or missing term would not)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_hidden.float(), ref_hidden.float(), rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(grad_weight.float(), ref_weight.float(), rtol=5e-2, atol=2e-3)
    assert grad_weight.dtype == weight.dtype  # the parameter's gradient keeps the parameter's dtype
