"""Tests for helpers.chat: the streaming generator, incremental decoding, and the command through a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import helpers.weights
from helpers.chat import PROMPT_MARKER, ChatInputError, TokenTextStream, answer, chat, main, stream_generate
from helpers.generate import generate
from helpers.instruct import RESPONSE_HEADER, format_input
from helpers.model import GPTConfig, GPTModel
from helpers.tokenizers import encode_user_text
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
    ("--temperature", "-1", "--temperature must be a finite number >= 0 (0 means greedy), got -1.0"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0 (0 means greedy), got nan"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 means greedy), got inf"),
    ("--temperature", "warm", "argument --temperature: invalid float value: 'warm'"),
    ("--top-k", "0", "--top-k must be a positive integer, got 0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--top-p", "nan", "--top-p must be in (0, 1], got nan"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1, got 0"),
    ("--seed", "-2", "--seed must be an integer from 0 to 2**64 - 1, got -2"),
    ("--seed", str(2**70), f"--seed must be an integer from 0 to 2**64 - 1, got {2**70}"),
    ("--device", "cuda:99", "--device asks for cuda:99, but this machine has"),
    ("--device", "toaster", "--device is not a torch device (cpu, cuda, cuda:1, mps)"),
])
def test_chat_refuses_bad_flags_with_one_message(flag, value, message, capsys):
    assert main(["--model", "unused", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"helpers.chat: {message}") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_chat_names_a_model_it_cannot_load(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("helpers.chat: cannot load the model") and "missing" in err
    assert err.count("\n") == 1


def test_the_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "130 interrupted" in capsys.readouterr().out


@pytest.mark.parametrize("stdin", [None, "closed"])
def test_chat_without_a_readable_stdin_says_so_and_exits_2(stdin, saved_model, monkeypatch, capsys):
    # given no standard input (started with <&-) or one closed during the session
    if stdin == "closed":
        stdin = io.StringIO("hello\n")
        stdin.close()
    monkeypatch.setattr(sys, "stdin", stdin)
    # when the chat starts, then it ends with one line on stderr and status 2
    assert main(["--model", str(saved_model), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("helpers.chat: ") and "standard input" in err[-1]


def test_chat_raises_chat_input_error_when_stdin_is_closed_mid_session(tiny_model):
    stdin = io.StringIO("hello\n")
    stdin.close()
    with pytest.raises(ChatInputError, match="cannot read standard input"):
        chat(tiny_model, None, stdin, io.StringIO())


def test_ctrl_c_while_the_model_loads_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(helpers.weights, "load_gpt2", interrupted)
    assert main(["--model", "gpt2"]) == 130
    assert capsys.readouterr().err.strip() == "helpers.chat: interrupted"


def _gpt2_vocab_model(context_length: int = 64, vocab_size: int = 50257) -> GPTModel:
    torch.manual_seed(11)
    return GPTModel(GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=16, n_heads=2,
                              n_layers=1, drop_rate=0.0)).eval()


def test_a_message_with_the_end_of_text_string_is_ordinary_text(gpt2_tok):
    # given a message holding the literal special-token string
    model, message = _gpt2_vocab_model(), "say <|endoftext|> twice"
    prompt = encode_user_text(gpt2_tok, format_input({"instruction": message, "input": ""}) + RESPONSE_HEADER)
    assert 50256 not in prompt
    expected = gpt2_tok.decode(_new_tokens(generate(model, torch.tensor([prompt]), 4, eos_id=50256), len(prompt),
                                           50256))
    # when it is answered, then the answer is the one generated from the prompt read as ordinary text
    assert answer(model, gpt2_tok, message, io.StringIO(), max_new_tokens=4) == expected


def test_ids_past_the_tokenizers_vocabulary_are_left_out_with_one_notice(gpt2_tok):
    # given a model with a padded vocabulary (50304) that always emits 50300, which GPT-2's tokenizer lacks
    model = _gpt2_vocab_model(vocab_size=50304)
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[50300] = 1.0
    out, err = io.StringIO(), io.StringIO()
    # when it answers, then the answer is empty and one notice names the id
    assert answer(model, gpt2_tok, "hello", out, max_new_tokens=3, err=err) == ""
    assert out.getvalue() == "\n"
    assert err.getvalue().count("\n") == 1 and "cannot decode (50300, 50300, 50300)" in err.getvalue()


def test_a_prompt_longer_than_the_context_is_cropped_with_a_notice_saying_how_much(gpt2_tok):
    # given a model with a 32-token context and a message whose prompt alone is longer
    model = _gpt2_vocab_model(context_length=32)
    message = " ".join(["word"] * 40)
    n_prompt = len(gpt2_tok.encode(format_input({"instruction": message, "input": ""}) + RESPONSE_HEADER))
    err = io.StringIO()
    # when it answers 3 tokens (this model emits no end-of-text here), the last one predicted from n_prompt + 2
    answer(model, gpt2_tok, message, io.StringIO(), max_new_tokens=3, err=err)
    # then one notice says how many prompt tokens fell out of the window by the last prediction
    assert err.getvalue() == (f"helpers.chat: the prompt and answer outgrew the model's context of 32 tokens: the "
                              f"first {n_prompt + 2 - 32} tokens of the prompt were dropped (cropped from the left); "
                              "send a shorter message or ask for a shorter answer\n")
    quiet = io.StringIO()
    answer(_gpt2_vocab_model(context_length=64), gpt2_tok, "hi", io.StringIO(), max_new_tokens=3, err=quiet)
    assert quiet.getvalue() == ""


@pytest.mark.slow  # a fresh Python importing torch
def test_a_closed_stdout_ends_the_chat_with_one_line_and_status_1(saved_model):
    env = {**os.environ, "LLM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "helpers.chat", "--model", str(saved_model)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
                               env=env)
    process.stdout.close()  # the reader goes away before the chat writes anything (as `| head -c 0` would)
    _, err = process.communicate(b"hello\n", timeout=120)
    assert process.returncode == 1
    assert err.decode().splitlines()[-1] == "helpers.chat: standard output was closed (broken pipe); stopping"
