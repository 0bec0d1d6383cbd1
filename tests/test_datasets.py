"""helpers.datasets: sliding-window input/target pairs and their loader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers.datasets import GPTDataset, create_dataloader
from helpers.tokenizers import BPETokenizer, SimpleTokenizerV2, build_vocab


def brute_force_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Every window the book's loop makes: starts 0, stride, 2*stride, ... while a target fits."""
    windows = []
    start = 0
    while start + max_length + 1 <= len(ids):
        windows.append((ids[start : start + max_length], ids[start + 1 : start + max_length + 1]))
        start += stride
    return windows


def test_first_batch_of_the_verdict_matches_the_book(verdict_text):
    loader = create_dataloader(verdict_text, batch_size=1, max_length=4, stride=1, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]
    assert inputs.dtype == targets.dtype == torch.long


def test_targets_are_inputs_shifted_by_one_in_every_window(verdict_text, gpt2_tok):
    # given the story's GPT-2 ids
    ids = gpt2_tok.encode(verdict_text)
    dataset = GPTDataset(ids, max_length=8, stride=3)
    # when / then every window is the slice at its start, and its target that slice moved by one
    for index in range(len(dataset)):
        inputs, targets = dataset[index]
        start = index * 3
        assert inputs.tolist() == ids[start : start + 8]
        assert targets.tolist() == ids[start + 1 : start + 9]
        assert inputs[1:].tolist() == targets[:-1].tolist()


def test_stride_equal_to_max_length_gives_disjoint_windows_covering_the_text(verdict_text, gpt2_tok):
    ids = gpt2_tok.encode(verdict_text)
    dataset = GPTDataset(ids, max_length=16, stride=16)
    joined = torch.cat([dataset[i][0] for i in range(len(dataset))]).tolist()
    assert joined == ids[: len(dataset) * 16]  # no overlap, no gap
    assert len(ids) - len(joined) <= 16  # and nothing usable left out


def test_stride_one_windows_overlap_by_all_but_one_token(verdict_text, gpt2_tok):
    ids = gpt2_tok.encode(verdict_text)[:200]
    dataset = GPTDataset(ids, max_length=6, stride=1)
    for index in range(len(dataset) - 1):
        assert dataset[index][0][1:].tolist() == dataset[index + 1][0][:-1].tolist()
    assert len(dataset) == len(ids) - 6


@pytest.mark.parametrize(
    ("n_tokens", "max_length", "stride"),
    [(5, 4, 1), (5, 4, 7), (9, 4, 4), (10, 4, 4), (11, 4, 4), (100, 7, 3), (100, 10, 10), (257, 256, 128)],
)
def test_window_count_matches_brute_force(n_tokens, max_length, stride):
    ids = list(range(1000, 1000 + n_tokens))
    dataset = GPTDataset(ids, max_length, stride)
    expected = brute_force_windows(ids, max_length, stride)
    assert len(dataset) == len(expected)
    assert [(x.tolist(), y.tolist()) for x, y in dataset] == expected


@given(
    n_tokens=st.integers(min_value=2, max_value=300),
    max_length=st.integers(min_value=1, max_value=64),
    stride=st.integers(min_value=1, max_value=80),
)
def test_windows_equal_brute_force_enumeration(n_tokens, max_length, stride):
    ids = list(range(n_tokens))
    expected = brute_force_windows(ids, max_length, stride)
    if not expected:
        with pytest.raises(ValueError):
            GPTDataset(ids, max_length, stride)
        return
    dataset = GPTDataset(ids, max_length, stride)
    assert len(dataset) == len(expected)
    assert [(dataset[i][0].tolist(), dataset[i][1].tolist()) for i in range(len(dataset))] == expected
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_text_too_short_for_one_window_names_token_count_and_max_length(gpt2_tok):
    text = "In the sunlit terraces of the palace"
    n_tokens = len(gpt2_tok.encode(text))
    with pytest.raises(ValueError) as caught:
        create_dataloader(text, batch_size=1, max_length=32, stride=1)
    message = str(caught.value)
    assert f"{n_tokens} tokens" in message
    assert "max_length=32" in message


def test_exactly_max_length_tokens_is_too_short_and_one_more_gives_one_window():
    with pytest.raises(ValueError, match="4 tokens"):
        GPTDataset([1, 2, 3, 4], max_length=4, stride=1)
    dataset = GPTDataset([1, 2, 3, 4, 5], max_length=4, stride=1)
    assert len(dataset) == 1
    assert [t.tolist() for t in dataset[0]] == [[1, 2, 3, 4], [2, 3, 4, 5]]


@pytest.mark.parametrize(("max_length", "stride"), [(0, 1), (4, 0), (-1, 1)])
def test_non_positive_max_length_or_stride_is_refused(max_length, stride):
    with pytest.raises(ValueError, match="must be positive"):
        GPTDataset(list(range(50)), max_length, stride)


@pytest.mark.parametrize(("max_length", "stride", "named"), [(2.5, 1, "max_length"), (4, 1.0, "stride"),
                                                             (True, 1, "max_length"), (4, -2, "stride")])
def test_max_length_or_stride_that_is_not_a_positive_integer_is_refused_by_name(max_length, stride, named):
    with pytest.raises(ValueError, match=named):
        GPTDataset(list(range(50)), max_length, stride)


class RecordingTokenizer:
    """A word-level tokenizer that records whether it was asked to encode."""

    def __init__(self, text: str):
        self.inner = SimpleTokenizerV2(build_vocab(text))
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
        ({"stride": -1}, "stride"),
        ({"stride": float("nan")}, "stride"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_create_dataloader_refuses_bad_numbers_by_name_before_tokenizing(verdict_text, kwargs, named):
    tokenizer = RecordingTokenizer(verdict_text)
    settings = {"batch_size": 2, "max_length": 4, "stride": 4, **kwargs}
    with pytest.raises(ValueError, match=named):
        create_dataloader(verdict_text, tokenizer=tokenizer, **settings)
    assert tokenizer.calls == 0


def test_create_dataloader_lets_a_type_error_inside_encode_through():
    class Faulty:  # a bug in its allowed_special handling; without the option it would encode
        def encode(self, text, allowed_special=frozenset()):
            if allowed_special:
                raise TypeError("a bug inside encode")
            return list(range(len(text)))

    with pytest.raises(TypeError, match="a bug inside encode"):
        create_dataloader("some text", batch_size=1, max_length=2, stride=1, tokenizer=Faulty())


def test_create_dataloader_with_a_bpe_tokenizer_lacking_endoftext_encodes_it_as_text(verdict_text):
    # given a trained tokenizer without special tokens, and text that contains "<|endoftext|>"
    tokenizer = BPETokenizer().train(verdict_text[:5000], vocab_size=300)
    text = verdict_text[:2000] + "<|endoftext|>" + verdict_text[2000:4000]
    # when batched
    loader = create_dataloader(text, batch_size=1, max_length=64, stride=64, shuffle=False, drop_last=False,
                               tokenizer=tokenizer)
    # then the windows hold the ids of the text with the separator spelled out as ordinary text
    ids = torch.cat([inputs[0] for inputs, _ in loader]).tolist()
    expected = tokenizer.encode(text, disallowed_special=())
    assert ids == expected[: len(ids)]
    assert tokenizer.decode(expected) == text


def test_loader_batches_have_requested_shape_and_drop_the_last_partial_batch(verdict_text, gpt2_tok):
    n_windows = len(GPTDataset(gpt2_tok.encode(verdict_text), 32, 32))
    loader = create_dataloader(verdict_text, batch_size=8, max_length=32, stride=32, shuffle=False)
    shapes = [tuple(inputs.shape) for inputs, _ in loader]
    assert len(shapes) == n_windows // 8
    assert set(shapes) == {(8, 32)}


def test_loader_seed_fixes_the_shuffled_order(verdict_text):
    def first_inputs(seed):
        loader = create_dataloader(verdict_text, batch_size=4, max_length=8, stride=8, shuffle=True,
                                   seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_inputs(7), first_inputs(7))
    assert not torch.equal(first_inputs(7), first_inputs(8))


def test_loader_accepts_a_word_level_tokenizer(verdict_text):
    tokenizer = SimpleTokenizerV2(build_vocab(verdict_text))
    loader = create_dataloader(verdict_text, batch_size=2, max_length=5, stride=5, shuffle=False,
                               tokenizer=tokenizer)
    inputs, targets = next(iter(loader))
    assert inputs[0].tolist() == tokenizer.encode(verdict_text)[:5]
    assert targets[0].tolist() == tokenizer.encode(verdict_text)[1:6]
