"""helpers.generate: greedy and sampled decoding, the KV-cache path, stopping, and text conversion."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from helpers.generate import (
    filter_logits,
    generate,
    generate_batch,
    next_token_logits,
    sample_next_token,
    stream_generate,
    text_to_token_ids,
    token_ids_to_text,
)
from helpers.model import GPTModel
from helpers.tokenizers import SimpleTokenizerV2, build_vocab


def seeded_model(cfg, seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def prompts(cfg, batch: int, n_tokens: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


# -- the KV cache gives the same tokens ------------------------------------------------------------


@pytest.mark.parametrize(
    ("context_length", "context_size", "prompt_length"),
    [(64, None, 5), (16, None, 5), (64, 8, 5), (16, None, 20)],
    ids=["within-context", "past-context-length", "context-size-below-model", "prompt-longer-than-context"],
)
def test_cached_generation_equals_uncached(tiny_cfg, context_length, context_size, prompt_length):
    # given a model and a batch of several prompts; 5 + 50 tokens exceed 16 and 8 but not 64
    model = seeded_model(dataclasses.replace(tiny_cfg, context_length=context_length))
    idx = prompts(tiny_cfg, batch=3, n_tokens=prompt_length)
    # when
    cached = generate(model, idx, max_new_tokens=50, context_size=context_size, use_cache=True)
    uncached = generate(model, idx, max_new_tokens=50, context_size=context_size, use_cache=False)
    # then
    assert cached.shape == (3, prompt_length + 50)
    assert torch.equal(cached[:, :prompt_length], idx)
    assert torch.equal(cached, uncached)


def test_cached_generation_feeds_one_new_token_per_call_until_the_window_overflows(tiny_cfg, tiny_model):
    # given a hook recording how many tokens each model call receives
    seen: list[int] = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    prompt_length, context = 4, tiny_cfg.context_length
    try:
        # when generating beyond the context window
        generate(tiny_model, prompts(tiny_cfg, 2, prompt_length), max_new_tokens=20, use_cache=True)
    finally:
        handle.remove()
    # then the prompt is run once, each later call sees one token until the cache is full,
    # and then the cache is rebuilt from the cropped window
    n_single = context - prompt_length
    assert len(seen) == 20
    assert seen[0] == prompt_length
    assert seen[1 : 1 + n_single] == [1] * n_single
    assert seen[1 + n_single] == context
    assert max(seen) <= context


def test_uncached_generation_runs_the_whole_window_each_step(tiny_cfg, tiny_model):
    seen: list[int] = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        generate(tiny_model, prompts(tiny_cfg, 1, 4), max_new_tokens=16, use_cache=False)
    finally:
        handle.remove()
    assert seen == [min(4 + step, tiny_cfg.context_length) for step in range(16)]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generation_applies_the_output_head_to_the_last_position_only(tiny_cfg, tiny_model, use_cache):
    # given a hook recording what the output head receives
    shapes: list[tuple[int, ...]] = []
    handle = tiny_model.out_head.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        generate(tiny_model, prompts(tiny_cfg, 3, 6), max_new_tokens=4, use_cache=use_cache)
    finally:
        handle.remove()
    # then every step projects one position per row, the prompt's included
    assert shapes == [(3, tiny_cfg.emb_dim)] * 4


def test_next_token_logits_equal_the_full_forwards_last_position(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 2, 9)
    with torch.no_grad():
        logits, _ = next_token_logits(tiny_model, idx, None, tiny_cfg.context_length)
        torch.testing.assert_close(logits, tiny_model(idx)[:, -1, :], rtol=0, atol=1e-5)


def test_greedy_generation_picks_the_argmax_of_the_full_forward(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 2, 6)
    out = generate(tiny_model, idx, max_new_tokens=3)
    with torch.no_grad():
        for step in range(3):
            context = out[:, : 6 + step]
            assert torch.equal(out[:, 6 + step], tiny_model(context)[:, -1].argmax(dim=-1))


# -- sampling ----------------------------------------------------------------------------------------


def test_top_k_one_with_temperature_equals_greedy(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 3, 5)
    greedy = generate(tiny_model, idx, max_new_tokens=30)
    torch.manual_seed(0)
    sampled = generate(tiny_model, idx, max_new_tokens=30, temperature=1.5, top_k=1)
    assert torch.equal(sampled, greedy)


def test_tiny_top_p_equals_greedy(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 3, 5)
    greedy = generate(tiny_model, idx, max_new_tokens=30)
    torch.manual_seed(0)
    sampled = generate(tiny_model, idx, max_new_tokens=30, temperature=1.0, top_p=1e-6)
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_under_manual_seed(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 2, 5)

    def sample(seed):
        torch.manual_seed(seed)
        return generate(tiny_model, idx, max_new_tokens=25, temperature=1.0, top_k=50)

    assert torch.equal(sample(42), sample(42))
    assert not torch.equal(sample(42), sample(43))  # the sample really depends on the seed


def test_sampling_with_a_generator_is_reproducible_and_ignores_the_global_seed(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 2, 5)

    def sample(generator_seed, global_seed):
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(generator_seed)
        return generate(tiny_model, idx, max_new_tokens=25, temperature=1.0, top_p=0.95, generator=generator)

    assert torch.equal(sample(7, global_seed=1), sample(7, global_seed=2))
    assert not torch.equal(sample(7, global_seed=1), sample(8, global_seed=1))


def test_sampled_cached_generation_equals_uncached_for_the_same_generator(tiny_cfg, tiny_model):
    idx = prompts(tiny_cfg, 2, 5)
    kwargs = dict(max_new_tokens=30, temperature=0.8, top_k=20)
    cached = generate(tiny_model, idx, use_cache=True, generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = generate(tiny_model, idx, use_cache=False, generator=torch.Generator().manual_seed(3),
                        **kwargs)
    assert torch.equal(cached, uncached)


def test_top_k_samples_only_among_the_k_largest_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_k=3, generator=generator).item() for _ in range(500)}
    assert draws == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p=0.6 the first two are needed, and suffice
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    generator = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, 1.0, top_p=0.6, generator=generator).item() for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert draws.count(0) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.05)


# Probabilities that float32 softmax reproduces exactly (powers of two), in shuffled order, so that a
# cumulative sum lands exactly on top_p: 0.5 + 0.25 = 0.75 and 0.5 + 0.25 + 0.125 = 0.875.
SHUFFLED_PROBS = torch.tensor([[0.125, 0.0625, 0.5, 0.0625, 0.25]])
#                               id 0    id 1   id 2   id 3   id 4   -> by rank: 2, 4, 0, then 1 and 3


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.74, {2, 4}),  # just below 0.75: tokens 2 and 4 are needed and suffice
        (0.75, {2, 4}),  # exactly 0.75: 2 and 4 reach it, so token 0 is not needed
        (0.76, {2, 4, 0}),  # just above: token 0 is needed too
        (0.875, {2, 4, 0}),  # exactly 0.875: 2, 4 and 0 reach it
        (0.5, {2}),  # exactly the top token's probability: it alone reaches it
        (0.51, {2, 4}),
    ],
)
def test_top_p_keeps_exactly_the_hand_computed_set_on_unsorted_logits(top_p, kept):
    # given logits whose softmax is exactly SHUFFLED_PROBS (checked, so the boundary cases are real)
    logits = SHUFFLED_PROBS.log()
    assert torch.equal(torch.softmax(logits, dim=-1), SHUFFLED_PROBS)
    # when filtered by top-p
    filtered = filter_logits(logits, temperature=1.0, top_p=top_p)
    # then exactly the smallest set of most likely tokens whose probability reaches top_p survives
    assert set(torch.isfinite(filtered)[0].nonzero().flatten().tolist()) == kept
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_p=top_p, generator=generator).item() for _ in range(300)}
    assert draws == kept


def test_temperature_zero_is_argmax_per_row():
    logits = torch.tensor([[0.1, 0.7, 0.2], [5.0, -1.0, 4.9]])
    assert sample_next_token(logits).tolist() == [[1], [0]]


# -- stopping at eos ---------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """Emits, for each row, a fixed sequence of next tokens (then ``filler``)."""

    def __init__(self, script: list[list[int]], prompt_length: int, vocab_size: int = 10, filler: int = 7):
        super().__init__()
        self.cfg = SimpleNamespace(context_length=64)
        self.script, self.prompt_length = script, prompt_length
        self.vocab_size, self.filler = vocab_size, filler

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        batch, n_tokens = idx.shape
        step = n_tokens - self.prompt_length
        logits = torch.zeros(batch, n_tokens, self.vocab_size)
        for row in range(batch):
            planned = self.script[row]
            logits[row, -1, planned[step] if step < len(planned) else self.filler] = 10.0
        return logits


def test_eos_stops_when_every_sequence_has_produced_it_and_pads_finished_ones():
    # given three rows that emit eos (2) after 2, 5 and 2 new tokens, and other tokens afterwards
    eos = 2
    model = ScriptedModel([[5, eos, 8, 8, 8, 8], [6, 6, 6, 6, eos, 8], [3, eos, 4, 4, 4, 4]], prompt_length=3)
    idx = torch.tensor([[1, 1, 1], [0, 0, 0], [9, 9, 9]])
    # when
    out = generate(model, idx, max_new_tokens=20, eos_id=eos)
    # then generation stops once the last row has produced eos, and finished rows carry eos only
    assert out[:, 3:].tolist() == [
        [5, eos, eos, eos, eos],
        [6, 6, 6, 6, eos],
        [3, eos, eos, eos, eos],
    ]


def test_eos_never_produced_runs_max_new_tokens():
    model = ScriptedModel([[5, 5], [6, 6]], prompt_length=1)
    out = generate(model, torch.tensor([[1], [2]]), max_new_tokens=6, eos_id=2)
    assert out.shape == (2, 7)


def test_eos_stops_cached_gpt_generation_at_its_first_occurrence(tiny_cfg, tiny_model):
    # given the greedy continuation of one prompt, and a token that first appears at some step
    idx = prompts(tiny_cfg, 1, 4)
    greedy = generate(tiny_model, idx, max_new_tokens=30)[0, 4:].tolist()
    step = next(i for i in range(2, 30) if greedy[i] not in greedy[:i])
    # when that token is the eos id
    out = generate(tiny_model, idx, max_new_tokens=30, eos_id=greedy[step])
    # then generation ends right after it
    assert out[0, 4:].tolist() == greedy[: step + 1]


# -- NaN and infinite logits ------------------------------------------------------------------------


class BrokenModel(nn.Module):
    """Returns ordinary logits until step ``bad_step`` (1-based), then ``bad_value`` in row 0 of the last position."""

    def __init__(self, bad_step: int, bad_value: float, prompt_length: int, vocab_size: int = 10):
        super().__init__()
        self.cfg = SimpleNamespace(context_length=64)
        self.bad_step, self.bad_value = bad_step, bad_value
        self.prompt_length, self.vocab_size = prompt_length, vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.arange(float(self.vocab_size)).repeat(*idx.shape, 1)
        if idx.shape[1] - self.prompt_length + 1 >= self.bad_step:
            logits[0, -1, 3] = self.bad_value
        return logits


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_refuses_nan_or_inf_logits_naming_the_step(bad_value, temperature):
    # given a model whose weights "diverge" at the third step
    model = BrokenModel(bad_step=3, bad_value=bad_value, prompt_length=2)
    # when / then generation stops there with a clear error instead of returning a token
    with pytest.raises(ValueError, match=r"step 3 of 5.*NaN or infinite logits.*diverged"):
        generate(model, torch.zeros(2, 2, dtype=torch.long), max_new_tokens=5, temperature=temperature)


def test_generation_refuses_logits_that_are_minus_infinity_everywhere_but_allows_some():
    partly = torch.tensor([[float("-inf"), 0.0, float("-inf")]])
    assert sample_next_token(partly).tolist() == [[1]]
    assert sample_next_token(partly, temperature=1.0).tolist() == [[1]]
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        sample_next_token(torch.full((1, 3), float("-inf")), temperature=1.0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sample_next_token_refuses_nan_logits(temperature):
    logits = torch.tensor([[0.1, float("nan"), 0.3], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="sample_next_token.*NaN"):
        sample_next_token(logits, temperature=temperature)


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1.0, "top_k": 0}, "top_k"),
        ({"temperature": 1.0, "top_k": -3}, "top_k"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
        ({"temperature": 1.0, "top_p": -0.2}, "top_p"),
        ({"temperature": 1.0, "top_p": float("nan")}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k"),
    ],
)
def test_invalid_sampling_settings_are_refused(tiny_cfg, tiny_model, kwargs, named):
    idx = prompts(tiny_cfg, 1, 3)
    with pytest.raises(ValueError, match=named):
        generate(tiny_model, idx, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=named):
        sample_next_token(torch.zeros(1, tiny_cfg.vocab_size), **kwargs)


def test_context_size_larger_than_the_model_is_refused(tiny_cfg, tiny_model):
    expected = rf"context_size \(32\).*context_length \({tiny_cfg.context_length}\)"
    with pytest.raises(ValueError, match=expected):
        generate(tiny_model, prompts(tiny_cfg, 1, 3), max_new_tokens=2, context_size=32)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 2, "context_size": 0}, "context_size"),
        ({"max_new_tokens": 2, "context_size": -4}, "context_size"),
        ({"max_new_tokens": 2, "eos_id": -1}, "eos_id"),
    ],
)
def test_invalid_lengths_and_ids_are_refused_before_the_model_runs(tiny_cfg, tiny_model, kwargs, named):
    calls: list[int] = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=named):
            generate(tiny_model, prompts(tiny_cfg, 1, 3), **kwargs)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("shape", [(5,), (1, 0)])
def test_prompt_that_is_not_a_batch_of_tokens_is_refused(tiny_model, shape):
    with pytest.raises(ValueError, match="idx"):
        generate(tiny_model, torch.zeros(shape, dtype=torch.long), max_new_tokens=2)


# -- text conversion ---------------------------------------------------------------------------------


def test_text_to_token_ids_and_back_round_trips(gpt2_tok, tiktoken_gpt2):
    text = "Every effort moves you<|endoftext|> In the sunlit terraces"
    ids = text_to_token_ids(text, gpt2_tok)
    assert ids.shape == (1, len(ids[0])) and ids.dtype == torch.long
    assert ids[0].tolist() == tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ids[0].tolist()
    assert token_ids_to_text(ids, gpt2_tok) == text
    assert token_ids_to_text(ids[0], gpt2_tok) == text


def test_text_to_token_ids_lets_a_type_error_inside_encode_through():
    # given a tokenizer whose encode has a bug in its allowed_special handling (a TypeError of its own)
    class Faulty:
        def encode(self, text, allowed_special=frozenset()):
            return [len(text)] + sorted(allowed_special)[0]  # list + str: TypeError when anything is allowed

    # when / then the caller sees that error, not a silent retry without allowed_special
    with pytest.raises(TypeError, match="list"):
        text_to_token_ids("Every effort", Faulty())


def test_text_to_token_ids_uses_plain_encode_for_a_word_level_tokenizer(verdict_text):
    tokenizer = SimpleTokenizerV2(build_vocab(verdict_text))
    ids = text_to_token_ids("I had always thought Jack <|endoftext|> zebra", tokenizer)
    assert ids[0].tolist() == tokenizer.encode("I had always thought Jack <|endoftext|> zebra")


@given(st.text(max_size=200))
def test_text_round_trip_holds_for_any_text(gpt2_tok, text):
    assert token_ids_to_text(text_to_token_ids(text, gpt2_tok), gpt2_tok) == text


def test_token_ids_to_text_refuses_a_batch(gpt2_tok):
    ids = torch.tensor([[15496, 11], [15496, 11]])
    with pytest.raises(ValueError, match="batch of 2"):
        token_ids_to_text(ids, gpt2_tok)


def test_generation_decodes_to_text_that_starts_with_the_prompt(gpt2_tok):
    # a model with GPT-2's vocabulary, so its ids decode with the real tokenizer
    from helpers.model import GPTConfig

    model = seeded_model(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1))
    prompt = "Every effort moves you"
    out = generate(model, text_to_token_ids(prompt, gpt2_tok), max_new_tokens=6)
    assert out.shape == (1, len(gpt2_tok.encode(prompt)) + 6)
    assert token_ids_to_text(out, gpt2_tok).startswith(prompt)


def test_filter_logits_keeps_the_top_k_and_the_top_p_nucleus():
    # given logits whose probabilities are known: 0.5, 0.25, 0.125, 0.0625, 0.0625
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    logits = probs.log()
    # when filtered
    top_2 = filter_logits(logits, top_k=2)
    nucleus = filter_logits(logits, top_p=0.7)  # 0.5 < 0.7 <= 0.75: the first two tokens
    hotter = filter_logits(logits, temperature=2.0)
    # then exactly the expected tokens survive, and temperature divides the logits
    assert torch.isfinite(top_2).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False, False]]
    torch.testing.assert_close(hotter, logits / 2.0)
    with pytest.raises(ValueError, match="greedy"):
        filter_logits(logits, temperature=0.0)


# -- tiny temperatures and ids outside the vocabulary --------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-30, 1e-37, 1e-40, 1e-300])
def test_a_tiny_positive_temperature_is_greedy_instead_of_overflowing(tiny_cfg, tiny_model, temperature):
    # given a temperature so small that logits / temperature overflows float32 to +-inf (softmax: NaN)
    idx = prompts(tiny_cfg, 2, 5)
    greedy = generate(tiny_model, idx, max_new_tokens=10)
    # when sampling with it
    sampled = generate(tiny_model, idx, max_new_tokens=10, temperature=temperature, top_k=5, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    # then only the most likely token can be drawn: the greedy tokens
    assert torch.equal(sampled, greedy)
    logits = torch.tensor([[0.3, 2.0, -1.0], [400.0, 450.0, 100.0]])  # 450 / 1e-37 overflows float32
    assert sample_next_token(logits, temperature=temperature).tolist() == [[1], [1]]


@pytest.mark.parametrize("bad_id", [101, 5000, -1])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_id_and_the_vocab_size(tiny_cfg, tiny_model,
                                                                                         bad_id):
    # given a prompt with one id the model's embedding has no row for (tiny_cfg.vocab_size is 101)
    idx = prompts(tiny_cfg, 2, 5)
    idx[1, 3] = bad_id
    # when / then generation refuses it up front with the id and the vocabulary size, not an IndexError
    with pytest.raises(ValueError, match=rf"idx holds token id {bad_id} at \(1, 3\).*vocab_size \(101\)"):
        generate(tiny_model, idx, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"token id {bad_id}"):
        next(stream_generate(tiny_model, idx[1:], max_new_tokens=2))
    with pytest.raises(ValueError, match=rf"prompts\[1\] holds token id {bad_id}.*vocab_size is 101"):
        generate_batch(tiny_model, [[1, 2], idx[1].tolist()], 2, pad_id=0)


def test_float_token_ids_are_refused(tiny_model):
    with pytest.raises(ValueError, match="idx must hold integer token ids.*float32"):
        generate(tiny_model, torch.zeros(1, 3), max_new_tokens=2)


# -- batches of prompts of different lengths -----------------------------------------------------------


def varied_prompts(cfg, lengths: list[int], seed: int = 11) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def one_at_a_time(model, prompt_list, max_new_tokens, **kwargs) -> list[list[int]]:
    """What ``generate`` answers each prompt alone: its new tokens, up to the first eos."""
    answers = []
    for ids in prompt_list:
        new = generate(model, torch.tensor([ids]), max_new_tokens, **kwargs)[0, len(ids):].tolist()
        eos_id = kwargs.get("eos_id")
        answers.append(new[: new.index(eos_id) + 1] if eos_id in new else new)
    return answers


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("context_length", [64, 16], ids=["within-context", "past-context-length"])
def test_batched_greedy_answers_equal_answering_each_prompt_alone(tiny_cfg, use_cache, context_length):
    # given prompts of five different lengths; with context 16, 12 + 12 tokens outgrow the window
    model = seeded_model(dataclasses.replace(tiny_cfg, context_length=context_length))
    prompt_list = varied_prompts(tiny_cfg, [3, 12, 1, 7, 12])
    # when they are answered in one left-padded batch
    batched = generate_batch(model, prompt_list, 12, pad_id=0, use_cache=use_cache)
    # then every answer is the one the prompt gets alone
    assert batched == one_at_a_time(model, prompt_list, 12, use_cache=use_cache)
    assert [len(answer) for answer in batched] == [12] * 5


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_batched_rows_stop_at_eos_and_the_others_go_on(tiny_cfg, use_cache):
    # given prompts, their greedy answers alone, and as eos a token that ends some answers early
    model = seeded_model(dataclasses.replace(tiny_cfg, context_length=64))
    prompt_list = varied_prompts(tiny_cfg, [2, 9, 5, 4], seed=3)
    free = one_at_a_time(model, prompt_list, 20)
    eos_id = free[0][3]
    alone = one_at_a_time(model, prompt_list, 20, eos_id=eos_id)
    assert any(len(answer) < 20 for answer in alone) and any(len(answer) == 20 for answer in alone)
    # when answered in one batch with that eos
    batched = generate_batch(model, prompt_list, 20, pad_id=5, eos_id=eos_id, use_cache=use_cache)
    # then each row ends at its first eos (included) or at the limit, exactly as alone
    assert batched == alone
    assert all(eos_id not in answer[:-1] for answer in batched)


def test_batch_ends_when_every_row_has_produced_eos(tiny_cfg):
    # given a hook counting model calls, and an eos every prompt produces early
    model = seeded_model(dataclasses.replace(tiny_cfg, context_length=64))
    prompt_list = varied_prompts(tiny_cfg, [4, 6], seed=5)
    first_tokens = [answer[0] for answer in one_at_a_time(model, prompt_list, 1)]
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        answers = generate_batch(model, prompt_list, 30, pad_id=0, eos_id=first_tokens[0])
    finally:
        handle.remove()
    # then the loop stops as soon as both rows have finished, the first leaving the batch at once
    assert answers[0] == [first_tokens[0]]
    assert answers[1][-1] == first_tokens[0] or len(answers[1]) == 30
    assert len(calls) == len(answers[1]) and calls[0] == 2 and set(calls[1:]) <= {1}


class CountingModel(nn.Module):
    """Predicts the last token + 1 (mod 10); it takes no attention mask."""

    cfg = SimpleNamespace(context_length=64, vocab_size=10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((idx + 1) % 10, num_classes=10).float()


def test_batched_generation_with_a_model_without_attention_mask_goes_one_at_a_time():
    # given a model that cannot take an attention mask, so padding cannot be hidden from it
    # when / then each prompt is answered alone, with the same stopping rule
    answers = generate_batch(CountingModel(), [[1, 1], [0, 3, 4], [9]], 3, pad_id=0, eos_id=6)
    assert answers == [[2, 3, 4], [5, 6], [0, 1, 2]]


def test_batched_generation_of_no_prompts_or_no_tokens(tiny_model):
    assert generate_batch(tiny_model, [], 5, pad_id=0) == []
    assert generate_batch(tiny_model, [[1, 2], [3]], 0, pad_id=0) == [[], []]


def test_sampled_batched_generation_is_reproducible_with_a_generator(tiny_cfg, tiny_model):
    prompt_list = varied_prompts(tiny_cfg, [3, 8, 5])

    def sample(seed):
        return generate_batch(tiny_model, prompt_list, 10, pad_id=0, temperature=1.0, top_k=20,
                              generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize(
    ("prompt_list", "kwargs", "named"),
    [
        ([[1, 2]], {"pad_id": -1}, "pad_id"),
        ([[1, 2]], {"pad_id": 101}, r"pad_id.*\[0, 101\)"),
        ([[1, 2]], {"pad_id": 1.0}, "pad_id"),
        ([[1, 2], []], {"pad_id": 0}, r"prompts\[1\].*non-empty"),
        ([[1, 2], "hello"], {"pad_id": 0}, r"prompts\[1\]"),
        ([[1, 2.5]], {"pad_id": 0}, r"prompts\[0\] holds token id 2.5"),
        ("hello", {"pad_id": 0}, "prompts must be a list"),
        (torch.tensor([[1, 2]]), {"pad_id": 0}, "prompts must be a list"),
        ([[1, 2]], {"pad_id": 0, "max_new_tokens": -1}, "max_new_tokens"),
        ([[1, 2]], {"pad_id": 0, "eos_id": -3}, "eos_id"),
        ([[1, 2]], {"pad_id": 0, "temperature": -1.0}, "temperature"),
        ([[1, 2]], {"pad_id": 0, "context_size": 0}, "context_size"),
    ],
)
def test_batched_generation_refuses_bad_arguments_naming_them(tiny_model, prompt_list, kwargs, named):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=named):
        generate_batch(tiny_model, prompt_list, **kwargs)
