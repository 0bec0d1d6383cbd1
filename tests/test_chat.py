"""Tests for helpers.chat: the streaming generator, incremental decoding, and the command through a pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers.chat import PROMPT_MARKER, TokenTextStream, main, stream_generate
from helpers.generate import generate
from helpers.instruct import format_input
from helpers.model import GPTConfig, GPTModel
from helpers.weights import load_gpt2, save_hf_gpt2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _new_tokens(out: torch.Tensor, n_prompt: int, eos_id: int | None) -> list[int]:
    ids = out[0, n_prompt:].tolist()
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@pytest.mark.parametrize("eos_id", [None, 7])
def test_stream_generate_yields_what_generate_returns_greedily(tiny_model, eos_id):
    torch.manual_seed(0)
    prompt = torch.randint(0, 101, (1, 5))
    streamed = list(stream_generate(tiny_model, prompt, 20, eos_id=eos_id))  # 25 > context 16: the cache refills
    expected = _new_tokens(generate(tiny_model, prompt, 20, eos_id=eos_id), 5, eos_id)
    assert streamed == expected
    assert eos_id not in streamed


def test_stream_generate_samples_as_generate_does_with_the_same_generator(tiny_model):
    prompt = torch.tensor([[1, 2, 3]])
    options = dict(temperature=0.9, top_k=20, top_p=0.95)
    streamed = list(stream_generate(tiny_model, prompt, 10, generator=torch.Generator().manual_seed(5), **options))
    reference = generate(tiny_model, prompt, 10, generator=torch.Generator().manual_seed(5), **options)
    assert streamed == reference[0, 3:].tolist()


def test_stream_generate_refuses_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="top_p"):
        next(stream_generate(tiny_model, torch.tensor([[1]]), 3, top_p=0.0))
    with pytest.raises(ValueError, match=r"\(1, n_tokens\)"):
        next(stream_generate(tiny_model, torch.tensor([[1], [2]]), 3))


def test_incremental_decoding_holds_back_split_characters(gpt2_tok):
    text = "Grüße, 日本語 and 🙂!"
    ids = gpt2_tok.encode(text)
    stream = TokenTextStream(gpt2_tok)
    pieces = [stream.push(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # some token ended inside a character and printed nothing yet
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(11)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                               drop_rate=0.0))
    return save_hf_gpt2(model, tmp_path_factory.mktemp("chat-model"))


def _run_chat(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "helpers.chat", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=120, cwd=REPO_ROOT, env=env)


@pytest.mark.slow  # a fresh Python importing torch: several seconds on a busy machine
def test_chat_through_a_pipe_streams_the_greedy_answer_and_exits_at_end_of_input(saved_model, gpt2_tok):
    # given a saved tiny model and the answer generate() gives greedily for the formatted message
    model = load_gpt2(saved_model)
    prompt = format_input({"instruction": "hello", "input": ""}) + "\n\n### Response:\n"
    idx = torch.tensor([gpt2_tok.encode(prompt)])
    expected = gpt2_tok.decode(_new_tokens(generate(model, idx, 5, eos_id=50256), idx.shape[1], 50256))
    # when the chat reads "hello" from a pipe
    result = _run_chat(["--model", str(saved_model), "--max-new-tokens", "5"], "hello\n")
    # then it shows the prompt marker, the answer, the marker again, and exits 0 at the end of input
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{PROMPT_MARKER}{expected}\n{PROMPT_MARKER}\n"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0 (0 means greedy), got -1.0"),
    ("--top-k", "0", "--top-k must be a positive integer, got 0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1, got 0"),
    ("--seed", "-2", "--seed must be a non-negative integer, got -2"),
])
def test_chat_refuses_bad_flags_with_one_message(flag, value, message, capsys):
    assert main(["--model", "unused", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"helpers.chat: {message}\n" and captured.out == ""


def test_chat_names_a_model_it_cannot_load(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("helpers.chat: cannot load the model") and "missing" in err
    assert err.count("\n") == 1
