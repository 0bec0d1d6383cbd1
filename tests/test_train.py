"""The training loop of Part 07: batch and loader losses, evaluation, train_model, the lr schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from helpers.datasets import GPTDataset, create_dataloader
from helpers.model import GPTConfig, GPTModel
from helpers.train import (
    TrainingDiverged,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    learning_rate_at,
    train_model,
)

CONTEXT = 16


@pytest.fixture(scope="module")
def verdict() -> str:
    from helpers.data import read_text

    return read_text("the-verdict")


@pytest.fixture(scope="module")
def word_tokenizer(verdict):
    """The word-level tokenizer of Part 02 over The Verdict: a vocabulary of ~1,100 instead of 50,257,
    so that training runs in seconds on a shared CPU."""
    from helpers.tokenizers import SimpleTokenizerV2, build_vocab

    return SimpleTokenizerV2(build_vocab(verdict))


@pytest.fixture(scope="module")
def verdict_ids(verdict, word_tokenizer) -> list[int]:
    return word_tokenizer.encode(verdict)


@pytest.fixture(scope="module")
def vocab_size(word_tokenizer) -> int:
    return len(word_tokenizer.str_to_int)


def _gpt(vocab_size: int, drop_rate: float = 0.0, seed: int = 123, **sizes) -> GPTModel:
    values = {"context_length": CONTEXT, "emb_dim": 32, "n_heads": 4, "n_layers": 1, **sizes}
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=vocab_size, drop_rate=drop_rate, **values))


def _loader(token_ids, n_windows: int, batch_size: int, drop_last: bool = True) -> DataLoader:
    """``n_windows`` non-overlapping windows of real tokens, in order."""
    dataset = GPTDataset(token_ids[: n_windows * CONTEXT + 1], max_length=CONTEXT, stride=CONTEXT)
    assert len(dataset) == n_windows
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


class BigramModel(nn.Module):
    """Not a GPTModel: logits straight from a token embedding (no return_hidden argument)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(idx)


# ---------------------------------------------------------------------------------------------
# losses of batches and loaders


def test_calc_loss_batch_of_gpt_model_equals_cross_entropy_of_its_logits(verdict):
    # given a tiny GPT-2 with GPT-2's vocabulary and a batch of The Verdict in GPT-2 tokens
    from helpers.tokenizers import gpt2_tokenizer

    model = _gpt(50257, n_layers=2)
    inputs, targets = next(iter(_loader(gpt2_tokenizer().encode(verdict), 4, batch_size=4)))

    # when the batch loss is computed (chunked head) and by hand from the logits
    loss = calc_loss_batch(inputs, targets, model, "cpu")
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    # then they agree, and the loss can be backpropagated into the head
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.out_head.weight.grad is not None and model.out_head.weight.grad.abs().sum() > 0


def test_calc_loss_batch_ignores_targets_of_minus_100(verdict_ids, vocab_size):
    # given a batch whose second half of targets is masked with -100
    model = _gpt(vocab_size)
    inputs, targets = next(iter(_loader(verdict_ids, 2, batch_size=2)))
    masked = targets.clone()
    masked[:, CONTEXT // 2 :] = -100

    # when the loss is computed
    loss = calc_loss_batch(inputs, masked, model, "cpu")

    # then only the unmasked positions count, as in F.cross_entropy
    half = CONTEXT // 2
    expected = F.cross_entropy(model(inputs)[:, :half].flatten(0, 1), targets[:, :half].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_calc_loss_batch_of_a_wrapped_gpt_model_equals_the_bare_model(verdict_ids, vocab_size):
    # given a GPTModel inside nn.DataParallel (on the CPU it just calls the module)
    model = _gpt(vocab_size)
    inputs, targets = next(iter(_loader(verdict_ids, 2, batch_size=2)))

    # when the loss is computed through the wrapper
    wrapped = calc_loss_batch(inputs, targets, nn.DataParallel(model), "cpu")

    # then it equals the loss of the bare model
    torch.testing.assert_close(wrapped, calc_loss_batch(inputs, targets, model, "cpu"))


def test_calc_loss_batch_of_a_modern_model_uses_the_chunked_head_and_equals_cross_entropy_of_its_logits(
        verdict_ids, vocab_size, monkeypatch):
    # given a tiny ModernModel (Part 10: it has return_hidden and a bias-free out_head, like GPTModel)
    import helpers.train
    from helpers.modern import ModernConfig, ModernModel

    torch.manual_seed(0)
    model = ModernModel(ModernConfig(vocab_size=vocab_size, context_length=CONTEXT, emb_dim=32, n_heads=4,
                                     n_kv_heads=2, n_layers=1, hidden_dim=64, head_dim=8, tie_weights=False))
    inputs, targets = next(iter(_loader(verdict_ids, 2, batch_size=2)))
    chunked_calls = []
    chunked = helpers.train.chunked_cross_entropy
    monkeypatch.setattr(helpers.train, "chunked_cross_entropy",
                        lambda *args, **kwargs: chunked_calls.append(1) or chunked(*args, **kwargs))

    # when the batch loss is computed
    loss = calc_loss_batch(inputs, targets, model, "cpu")

    # then it went through the chunked head, and equals the cross-entropy of the model's logits
    assert chunked_calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()),
                               rtol=1e-5, atol=1e-6)


def test_calc_loss_batch_of_any_module_goes_through_its_logits():
    # given a model that is not a GPTModel and has no return_hidden option
    torch.manual_seed(0)
    model = BigramModel(vocab_size=50)
    inputs = torch.randint(0, 50, (3, 7))
    targets = torch.randint(0, 50, (3, 7))

    # when the batch loss is computed
    loss = calc_loss_batch(inputs, targets, model, "cpu")

    # then it is the cross-entropy of its logits
    torch.testing.assert_close(loss, F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))


def test_calc_loss_loader_averages_the_first_num_batches(verdict_ids, vocab_size):
    # given a loader of 5 batches
    model = _gpt(vocab_size).eval()
    loader = _loader(verdict_ids, 10, batch_size=2)
    batch_losses = [calc_loss_batch(x, y, model, "cpu").item() for x, y in loader]
    assert len(batch_losses) == 5

    # when the loader loss is computed over 3 batches, all batches, and more batches than exist
    first_three = calc_loss_loader(loader, model, "cpu", num_batches=3)
    everything = calc_loss_loader(loader, model, "cpu")
    too_many = calc_loss_loader(loader, model, "cpu", num_batches=50)

    # then each is the mean of the batch losses it covers
    assert first_three == pytest.approx(sum(batch_losses[:3]) / 3, rel=1e-6)
    assert everything == pytest.approx(sum(batch_losses) / 5, rel=1e-6)
    assert too_many == pytest.approx(everything, rel=1e-6)


def test_calc_loss_loader_of_an_empty_loader_warns_and_returns_nan(verdict_ids, vocab_size):
    # given a loader that yields no batch (3 windows, batch size 4, drop_last)
    loader = _loader(verdict_ids, 3, batch_size=4)
    assert len(loader) == 0

    # when / then its loss is NaN, with a warning saying why
    with pytest.warns(UserWarning, match="empty loader"):
        assert math.isnan(calc_loss_loader(loader, _gpt(vocab_size), "cpu"))


@pytest.mark.parametrize("start_in_training_mode", [True, False])
def test_evaluate_model_runs_in_eval_mode_and_restores_the_mode(verdict_ids, vocab_size,
                                                                start_in_training_mode):
    # given a model with dropout, in training or eval mode
    model = _gpt(vocab_size, drop_rate=0.5)
    model.train(start_in_training_mode)
    train_loader = _loader(verdict_ids, 4, batch_size=2)
    val_loader = _loader(verdict_ids[200:], 4, batch_size=2)

    # when it is evaluated twice
    first = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=2)
    second = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=2)

    # then dropout was off (same numbers both times, equal to the eval-mode loader losses) ...
    assert first == second
    model.eval()
    assert first[0] == pytest.approx(calc_loss_loader(train_loader, model, "cpu", 2), rel=1e-6)
    assert first[1] == pytest.approx(calc_loss_loader(val_loader, model, "cpu", 2), rel=1e-6)
    # ... and the model's mode is what it was before, in every submodule
    model.train(start_in_training_mode)
    evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=1)
    assert all(module.training == start_in_training_mode for module in model.modules())


# ---------------------------------------------------------------------------------------------
# train_model


@pytest.mark.slow
def test_train_model_lowers_the_validation_loss_on_the_verdict(verdict, word_tokenizer, vocab_size):
    # given The Verdict split 90/10 (word tokens) and a tiny GPT-2
    split = int(0.9 * len(verdict))
    torch.manual_seed(123)
    train_loader = create_dataloader(verdict[:split], batch_size=8, max_length=CONTEXT, stride=CONTEXT,
                                     shuffle=True, drop_last=True, tokenizer=word_tokenizer, seed=123)
    val_loader = create_dataloader(verdict[split:], batch_size=8, max_length=CONTEXT, stride=CONTEXT,
                                   shuffle=False, drop_last=False, tokenizer=word_tokenizer)
    model = _gpt(vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    val_before = calc_loss_loader(val_loader, model.eval(), "cpu")

    # when it trains for two epochs, evaluating every 10 steps
    history = train_model(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=10,
                          eval_iter=5, verbose=False, progress=False)

    # then the history has one entry per evaluation in each list, tokens seen increase ...
    n_evals = len(history["train_losses"])
    assert n_evals >= 3
    assert len(history["val_losses"]) == n_evals and len(history["tokens_seen"]) == n_evals
    assert all(a < b for a, b in pairwise(history["tokens_seen"]))
    assert history["tokens_seen"][-1] == 2 * len(train_loader) * 8 * CONTEXT
    assert len(history["learning_rates"]) == 2 * len(train_loader)
    # ... and the validation loss fell well below where it started (about ln vocab_size)
    assert val_before == pytest.approx(math.log(vocab_size), abs=0.5)
    assert history["val_losses"][-1] < val_before - 1.0
    assert history["val_losses"][-1] < history["val_losses"][0]
    assert model.training


def _train_one_epoch(loader: DataLoader, vocab_size: int, grad_accum_steps: int) -> GPTModel:
    model = _gpt(vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_model(model, loader, loader, optimizer, "cpu", num_epochs=1, eval_freq=100, eval_iter=1,
                grad_accum_steps=grad_accum_steps, verbose=False, progress=False)
    return model


@pytest.mark.parametrize(("n_windows", "drop_last"), [(8, True), (6, False)])
def test_gradient_accumulation_equals_the_larger_batch(verdict_ids, vocab_size, n_windows, drop_last):
    # given the same windows in the same order, as batches of 4 and as batches of 2
    # (6 windows without drop_last: a last batch of 2, and a last accumulation group of one micro-batch)
    big = _loader(verdict_ids, n_windows, batch_size=4, drop_last=drop_last)
    small = _loader(verdict_ids, n_windows, batch_size=2, drop_last=drop_last)

    # when one epoch of SGD runs with batch 4 and with batch 2 x 2 accumulation steps
    reference = _train_one_epoch(big, vocab_size, grad_accum_steps=1)
    accumulated = _train_one_epoch(small, vocab_size, grad_accum_steps=2)

    # then the weights are the same (and did change)
    untrained = _gpt(vocab_size)
    moved = False
    for (name, a), b, c in zip(reference.state_dict().items(), accumulated.state_dict().values(),
                               untrained.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(a, c)
    assert moved


def test_train_model_follows_learning_rate_at_with_warmup_and_cosine_decay(verdict_ids, vocab_size):
    # given 12 batches, a warmup of 3 steps and cosine decay to a tenth
    loader = _loader(verdict_ids, 12, batch_size=1)
    model = _gpt(vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    # when it trains one epoch
    history = train_model(model, loader, loader, optimizer, "cpu", num_epochs=1, eval_freq=100, eval_iter=1,
                          warmup_steps=3, cosine_decay=True, min_lr_ratio=0.1, verbose=False, progress=False)

    # then every step used the scheduled rate, ending at the minimum
    expected = [learning_rate_at(step, 0.1, 3, 9, 0.01) for step in range(12)]
    assert history["learning_rates"] == pytest.approx(expected)
    assert history["learning_rates"][2] == pytest.approx(0.1)
    assert history["learning_rates"][-1] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 8 / 9)))


def test_a_nan_loss_stops_training_with_the_step(verdict_ids, vocab_size):
    # given an infinite learning rate: step 0 is finite, its update ruins the weights
    loader = _loader(verdict_ids, 4, batch_size=1)
    model = _gpt(vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=float("inf"))

    # when it trains
    with pytest.raises(TrainingDiverged, match=r"step 1\b") as caught:
        train_model(model, loader, loader, optimizer, "cpu", num_epochs=1, eval_freq=1, eval_iter=1,
                    verbose=False, progress=False)

    # then the error says the step and carries what was recorded before it
    assert caught.value.step == 1
    assert len(caught.value.history["learning_rates"]) == 1
    assert isinstance(caught.value, FloatingPointError)


def test_a_nan_weight_stops_training_at_step_0(verdict_ids, vocab_size):
    # given a model with one NaN weight
    loader = _loader(verdict_ids, 2, batch_size=1)
    model = _gpt(vocab_size)
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")

    # when / then training stops at once, naming step 0
    with pytest.raises(TrainingDiverged, match="step 0") as caught:
        train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", num_epochs=1,
                    eval_freq=1, eval_iter=1, verbose=False, progress=False)
    assert caught.value.step == 0


# ---------------------------------------------------------------------------------------------
# learning_rate_at


def test_learning_rate_warmup_rises_linearly_to_the_peak():
    # given a warmup of 10 steps to 3e-4
    rates = [learning_rate_at(step, 3e-4, warmup_steps=10, decay_steps=100) for step in range(10)]

    # then it rises by equal increments from peak/10 and reaches the peak on the last warmup step
    assert rates[0] == pytest.approx(3e-5)
    assert rates[-1] == pytest.approx(3e-4)
    increments = [b - a for a, b in pairwise(rates)]
    assert increments == pytest.approx([3e-5] * 9)


def test_learning_rate_cosine_decays_to_min_lr_and_stays():
    # given warmup 10, a cosine over 100 steps, from 1.0 to 0.1
    def rate(step):
        return learning_rate_at(step, 1.0, warmup_steps=10, decay_steps=100, min_lr=0.1)

    # then it starts at the peak, is halfway at the midpoint, ends at min_lr and stays there
    assert rate(10) == pytest.approx(1.0)
    assert rate(60) == pytest.approx(0.55)
    assert rate(110) == pytest.approx(0.1)
    assert rate(500) == pytest.approx(0.1)
    decay = [rate(step) for step in range(10, 111)]
    assert all(a > b for a, b in pairwise(decay))


def test_learning_rate_without_decay_steps_is_constant_after_warmup():
    # given no decay_steps
    rates = [learning_rate_at(step, 0.02, warmup_steps=4) for step in range(4, 1000, 37)]

    # then the rate is the peak at every step after the warmup; without warmup, from step 0
    assert rates == [0.02] * len(rates)
    assert learning_rate_at(0, 0.02) == 0.02


# ---------------------------------------------------------------------------------------------
# train_model against the book's loop and independent references


def test_train_model_with_default_options_is_the_books_loop(verdict_ids, vocab_size):
    # given two identical models with dropout, and the book's loop written out by hand (SGD: AdamW would
    # magnify float32 rounding in near-zero gradients into lr-sized differences)
    loader = _loader(verdict_ids, 6, batch_size=2)

    def loader_loss(model, data_loader, num_batches):
        total = 0.0
        with torch.no_grad():
            for index, (input_batch, target_batch) in enumerate(data_loader):
                if index >= num_batches:
                    break
                total += F.cross_entropy(model(input_batch).flatten(0, 1), target_batch.flatten()).item()
        return total / num_batches

    def books_loop(model, optimizer, num_epochs, eval_freq, eval_iter):
        train_losses, val_losses, step = [], [], 0
        for _ in range(num_epochs):
            model.train()
            for input_batch, target_batch in loader:
                optimizer.zero_grad()
                logits = model(input_batch)
                loss = F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
                loss.backward()
                optimizer.step()
                step += 1
                if step % eval_freq == 0:
                    model.eval()
                    train_losses.append(loader_loss(model, loader, eval_iter))
                    val_losses.append(loader_loss(model, loader, eval_iter))
                    model.train()
        return train_losses, val_losses

    by_hand, helper = _gpt(vocab_size, drop_rate=0.2, seed=9), _gpt(vocab_size, drop_rate=0.2, seed=9)

    # when both train two epochs from the same seed
    torch.manual_seed(1)
    expected = books_loop(by_hand, torch.optim.SGD(by_hand.parameters(), lr=0.5), 2, 2, 2)
    torch.manual_seed(1)
    history = train_model(helper, loader, loader, torch.optim.SGD(helper.parameters(), lr=0.5), "cpu",
                          num_epochs=2, eval_freq=2, eval_iter=2, verbose=False, progress=False)

    # then the losses and the weights are the same, up to the float32 rounding of the chunked loss
    assert len(history["train_losses"]) == len(expected[0]) == 3  # 6 steps, every second one
    assert history["train_losses"] == pytest.approx(expected[0], rel=1e-4)
    assert history["val_losses"] == pytest.approx(expected[1], rel=1e-4)
    for (name, a), b in zip(by_hand.state_dict().items(), helper.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_train_model_clips_the_gradient_norm_like_clip_grad_norm(verdict_ids, vocab_size):
    # given one batch, SGD with lr 1 (so the update is the gradient), and a clip far below the gradient norm
    loader = _loader(verdict_ids, 1, batch_size=1)
    model, reference = _gpt(vocab_size, seed=2), _gpt(vocab_size, seed=2)
    inputs, targets = next(iter(loader))
    F.cross_entropy(reference(inputs).flatten(0, 1), targets.flatten()).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    clip = norm / 10

    # when train_model takes that one step with grad_clip
    before = [p.detach().clone() for p in model.parameters()]
    train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=1.0), "cpu", num_epochs=1,
                eval_freq=1, eval_iter=1, grad_clip=clip, verbose=False, progress=False)

    # then each parameter moved by the gradient scaled to the clip norm (computed by hand, not by torch)
    for b, after, g in zip(before, model.parameters(), grads, strict=True):
        torch.testing.assert_close(b - after.detach(), g * (clip / norm), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("option", "value"), [("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", float("nan")),
                                               ("grad_accum_steps", 0), ("warmup_steps", -1),
                                               ("min_lr_ratio", 2.0), ("precision", "bf16")])
def test_train_model_refuses_bad_options_before_training(verdict_ids, vocab_size, option, value):
    loader = _loader(verdict_ids, 2, batch_size=1)
    model = _gpt(vocab_size)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=option):
        train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", num_epochs=1,
                    eval_freq=1, eval_iter=1, verbose=False, progress=False, **{option: value})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(("name", "value"), [("num_epochs", -1), ("eval_freq", 0), ("eval_iter", 0)])
def test_train_model_refuses_bad_counts(verdict_ids, vocab_size, name, value):
    loader = _loader(verdict_ids, 2, batch_size=1)
    model = _gpt(vocab_size)
    arguments = {"num_epochs": 1, "eval_freq": 1, "eval_iter": 1, name: value}
    with pytest.raises(ValueError, match=name):
        train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu",
                    verbose=False, progress=False, **arguments)


@pytest.mark.parametrize(("keywords", "expected"), [({}, torch.float32), ({"precision": "bfloat16"}, torch.bfloat16),
                                                    ({"bf16": True}, torch.bfloat16)])
def test_train_model_computes_in_the_precision_asked_and_float32_by_default(verdict_ids, vocab_size, keywords,
                                                                           expected):
    # given a model whose first feed-forward layer records the dtype it computes in
    loader = _loader(verdict_ids, 2, batch_size=1)
    model = _gpt(vocab_size)
    seen = []
    model.blocks[0].ff.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    # when it trains
    train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", num_epochs=1,
                eval_freq=100, eval_iter=1, verbose=False, progress=False, **keywords)

    # then the training forward passes ran in that dtype, and the weights stay float32
    assert seen[:2] == [expected, expected]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_train_model_takes_options_as_one_object(verdict_ids, vocab_size):
    from helpers.train import TrainingOptions

    loader = _loader(verdict_ids, 4, batch_size=1)
    model = _gpt(vocab_size)
    history = train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", num_epochs=1,
                          eval_freq=100, eval_iter=1, options=TrainingOptions(warmup_steps=4), verbose=False,
                          progress=False)
    assert history["learning_rates"] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    with pytest.raises(TypeError, match="not both"):
        train_model(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", num_epochs=1,
                    eval_freq=1, eval_iter=1, options=TrainingOptions(), grad_clip=1.0, progress=False)
