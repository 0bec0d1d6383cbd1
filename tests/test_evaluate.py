"""Evaluating language models (Part 08): perplexity, next-token accuracy, side-by-side samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from helpers.datasets import GPTDataset
from helpers.evaluate import compare_samples, loader_loss, next_token_accuracy, perplexity
from helpers.generate import generate, text_to_token_ids, token_ids_to_text
from helpers.model import GPTConfig, GPTModel
from helpers.train import calc_loss_loader

CONTEXT = 16


@pytest.fixture(scope="module")
def verdict_ids() -> list[int]:
    """The Verdict in the word-level tokens of Part 02 (a vocabulary of ~1,100 keeps the models tiny)."""
    from helpers.data import read_text
    from helpers.tokenizers import SimpleTokenizerV2, build_vocab

    text = read_text("the-verdict")
    return SimpleTokenizerV2(build_vocab(text)).encode(text)


@pytest.fixture(scope="module")
def vocab_size(verdict_ids) -> int:
    return max(verdict_ids) + 1


def _gpt(vocab_size: int, seed: int = 0, drop_rate: float = 0.0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=vocab_size, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2,
                              drop_rate=drop_rate))


def _loader(token_ids, n_windows: int, batch_size: int, drop_last: bool = True) -> DataLoader:
    dataset = GPTDataset(token_ids[: n_windows * CONTEXT + 1], max_length=CONTEXT, stride=CONTEXT)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


def _summed_loss_and_count(model: nn.Module, loader) -> tuple[float, int]:
    """The reference: every scored token's cross-entropy, summed, from the full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            logits = model.eval()(inputs)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int((targets != -100).sum())
    return total, count


class BigramModel(nn.Module):
    """Not a GPTModel: logits straight from an embedding table."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


# ---------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_is_exp_of_the_mean_loss_of_equal_batches(verdict_ids, vocab_size):
    # given a model and a loader of equal-size batches
    model = _gpt(vocab_size)
    loader = _loader(verdict_ids, 12, batch_size=4)

    # when perplexity is measured
    result = perplexity(model, loader, "cpu")

    # then it is exp of the loader loss of calc_loss_loader (batch means of equal batches = token mean)
    assert result == pytest.approx(math.exp(calc_loss_loader(loader, model.eval(), "cpu")), rel=1e-5)
    # and an untrained model is about as unsure as a uniform choice over the vocabulary
    assert 0.5 * vocab_size < result < 2 * vocab_size


def test_perplexity_weights_every_token_equally_across_unequal_batches(verdict_ids, vocab_size):
    # given batches of 4, 4 and 1 windows (drop_last off)
    model = _gpt(vocab_size, seed=1)
    loader = _loader(verdict_ids, 9, batch_size=4, drop_last=False)
    assert [len(x) for x, _ in loader] == [4, 4, 1]

    # when perplexity and the loader loss are measured
    result = perplexity(model, loader, "cpu")
    loss, n_tokens = loader_loss(model, loader, "cpu")

    # then they are the per-token mean over all 9 x 16 tokens, not the mean of the three batch means
    total, count = _summed_loss_and_count(model, loader)
    assert n_tokens == count == 9 * CONTEXT
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert result == pytest.approx(math.exp(total / count), rel=1e-5)
    batch_mean = calc_loss_loader(loader, model, "cpu")
    assert abs(loss - batch_mean) > 1e-4  # the two averages really differ here


def test_perplexity_ignores_masked_targets_and_counts_only_scored_tokens(verdict_ids, vocab_size):
    # given batches where the first half of every target row is -100
    model = _gpt(vocab_size, seed=2)
    masked = []
    for inputs, targets in _loader(verdict_ids, 6, batch_size=3):
        targets = targets.clone()
        targets[:, : CONTEXT // 2] = -100
        masked.append((inputs, targets))

    # when the loss is measured
    loss, n_tokens = loader_loss(model, masked, "cpu")

    # then only the 6 x 8 unmasked tokens count
    total, count = _summed_loss_and_count(model, masked)
    assert n_tokens == count == 6 * CONTEXT // 2
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_a_batch_with_every_target_masked_adds_nothing_to_the_loss(verdict_ids, vocab_size):
    # given two scored batches and, between them, one whose targets are all -100
    # (as when instruction finetuning masks a prompt that fills the whole window)
    model = _gpt(vocab_size, seed=5)
    scored = list(_loader(verdict_ids, 4, batch_size=2))
    inputs, targets = scored[0]
    batches = [scored[0], (inputs, torch.full_like(targets, -100)), scored[1]]

    # when the loss and perplexity are measured
    loss, n_tokens = loader_loss(model, batches, "cpu")

    # then the masked batch has no weight: the result is that of the scored batches alone
    total, count = _summed_loss_and_count(model, scored)
    assert n_tokens == count == 4 * CONTEXT
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert perplexity(model, batches, "cpu") == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_any_module_and_num_batches(verdict_ids, vocab_size):
    # given a model that is not a GPTModel and a loader of 5 batches
    torch.manual_seed(3)
    model = BigramModel(vocab_size)
    loader = _loader(verdict_ids, 10, batch_size=2)

    # when perplexity is measured over the first 2 batches
    result = perplexity(model, loader, "cpu", num_batches=2)

    # then it covers exactly those batches
    first_two = [batch for index, batch in enumerate(loader) if index < 2]
    total, count = _summed_loss_and_count(model, first_two)
    assert result == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result != pytest.approx(perplexity(model, loader, "cpu"), rel=1e-4)


def test_perplexity_runs_in_eval_mode_and_restores_training_mode(verdict_ids, vocab_size):
    # given a model with dropout, in training mode
    model = _gpt(vocab_size, drop_rate=0.5).train()
    loader = _loader(verdict_ids, 4, batch_size=2)

    # when perplexity is measured twice
    first, second = perplexity(model, loader, "cpu"), perplexity(model, loader, "cpu")

    # then dropout was off (the same number) and the model is training again
    assert first == second
    assert model.training and all(module.training for module in model.modules())


def test_perplexity_of_an_empty_loader_is_refused(verdict_ids, vocab_size):
    # given a loader with no batches
    loader = _loader(verdict_ids, 3, batch_size=4)

    # when / then there is nothing to score, and the error says so
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(_gpt(vocab_size), loader, "cpu")


# ---------------------------------------------------------------------------------------------
# accuracy


def test_next_token_accuracy_equals_a_direct_count(verdict_ids, vocab_size):
    # given a model briefly fitted to a few windows (so that some predictions are right), and masked targets
    model = _gpt(vocab_size, seed=4)
    loader = _loader(verdict_ids, 6, batch_size=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        for inputs, targets in loader:
            F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    batches = []
    for inputs, targets in loader:
        targets = targets.clone()
        targets[:, :3] = -100
        batches.append((inputs, targets))

    # when the accuracy is measured
    accuracy = next_token_accuracy(model, batches, "cpu")

    # then it is the share of scored positions whose argmax is the target
    correct = scored = 0
    with torch.no_grad():
        for inputs, targets in batches:
            predictions = model.eval()(inputs).argmax(dim=-1)
            keep = targets != -100
            correct += int((predictions[keep] == targets[keep]).sum())
            scored += int(keep.sum())
    assert scored == 6 * (CONTEXT - 3)
    assert accuracy == pytest.approx(correct / scored)
    assert 0.1 < accuracy < 1.0  # learnt something, so the count is not trivially zero
    assert next_token_accuracy(model, batches, "cpu", num_batches=1) == pytest.approx(
        _accuracy_of(model, batches[:1]))


def _accuracy_of(model: nn.Module, batches) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(-1)[y != -100] for x, y in batches])
        targets = torch.cat([y[y != -100] for _, y in batches])
    return (predictions == targets).float().mean().item()


# ---------------------------------------------------------------------------------------------
# samples


@pytest.fixture(scope="module")
def two_models():
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)
    torch.manual_seed(10)
    first = GPTModel(cfg)
    torch.manual_seed(11)
    second = GPTModel(cfg)
    return {"first": first, "second": second}


@pytest.fixture(scope="module")
def tokenizer():
    from helpers.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


PROMPTS = ["Every effort moves you", "I had always thought", "The height of his glory"]


def test_compare_samples_gives_one_row_per_prompt_and_one_column_per_model(two_models, tokenizer):
    # given two models and three prompts
    # when greedy samples are compared
    table = compare_samples(two_models, PROMPTS, tokenizer, max_new_tokens=8)

    # then the table is prompts x models, holding each model's greedy continuation (without the prompt)
    assert list(table.columns) == ["first", "second"]
    assert list(table.index) == PROMPTS and table.index.name == "prompt"
    for name, model in two_models.items():
        for prompt in PROMPTS:
            idx = text_to_token_ids(prompt, tokenizer)
            continuation = generate(model.eval(), idx, 8)[:, idx.shape[1]:]
            assert table.loc[prompt, name] == token_ids_to_text(continuation, tokenizer)
    assert table.loc[PROMPTS[0], "first"] != table.loc[PROMPTS[0], "second"]


def test_compare_samples_is_reproducible_under_its_seed(two_models, tokenizer):
    # given sampling at temperature 1.5 with top-k
    def sample(seed):
        return compare_samples(two_models, PROMPTS, tokenizer, max_new_tokens=10, seed=seed, temperature=1.5,
                               top_k=200)

    # when the same seed is used twice (with other random draws in between), and another seed once
    first = sample(123)
    torch.rand(100)
    again = sample(123)
    other = sample(7)

    # then the same seed gives the same table, and each cell is what generate draws from that seed
    assert first.equals(again)
    assert not first.equals(other)
    idx = text_to_token_ids(PROMPTS[1], tokenizer)
    torch.manual_seed(123)
    expected = generate(two_models["second"], idx, 10, temperature=1.5, top_k=200)[:, idx.shape[1]:]
    assert first.loc[PROMPTS[1], "second"] == token_ids_to_text(expected, tokenizer)
