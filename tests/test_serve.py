"""Tests for helpers.serve: the OpenAI-compatible endpoints, streaming, padded batches, errors, clients and the page.

The server runs in this process on a free port (port 0) with a tiny random GPTModel and GPT-2's tokenizer;
its answers are compared with ``helpers.generate.generate`` on the same prompt.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers.batching import BatchWorker, Job
from helpers.chat_models import ChatModel, ChatModelError, alpaca_prompt, load_chat_model
from helpers.generate import generate
from helpers.instruct import RESPONSE_HEADER, format_input
from helpers.model import GPTConfig, GPTModel
from helpers.serve import main, make_server
from helpers.tokenizers import encode_user_text, gpt2_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS_ID = 50256
CONTEXT = 96
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def chat_model() -> ChatModel:
    """A tiny random GPTModel with GPT-2's vocabulary and tokenizer, as load_chat_model would give it."""
    torch.manual_seed(123)
    cfg = GPTConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    return ChatModel("tiny", GPTModel(cfg).eval(), gpt2_tokenizer(), alpaca_prompt, frozenset({EOS_ID}))


@pytest.fixture(scope="module")
def server(chat_model):
    """The server on 127.0.0.1, a free port, answering with ``chat_model``."""
    server = make_server(chat_model, port=0, quiet=True, window_s=0.005).start()
    yield server
    server.close()


def request(server, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP exchange: the status, the headers, the body."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def chat(server, **fields) -> dict:
    """The JSON answer of POST /v1/chat/completions (asserting 200)."""
    status, _, body = request(server, "POST", "/v1/chat/completions", {"messages": HELLO, **fields})
    assert status == 200, body
    return json.loads(body)


def stream_events(server, **fields) -> list:
    """The data of each server-sent event of a streamed answer ("[DONE]" as the string)."""
    status, headers, body = request(server, "POST", "/v1/chat/completions",
                                    {"messages": HELLO, "stream": True, **fields})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream"), body
    events = body.decode().split("\n\n")
    assert events[-1] == "" and all(event.startswith("data: ") for event in events[:-1])
    return [event[6:] if event == "data: [DONE]" else json.loads(event[6:]) for event in events[:-1]]


def alone(chat_model: ChatModel, messages: list, max_tokens: int) -> tuple[list[int], list[int]]:
    """The prompt ids and the greedy answer's ids (eos left out) that ``generate`` gives the prompt alone."""
    prompt = chat_model.encode_prompt(messages)
    return prompt, greedy_alone(chat_model, prompt, max_tokens)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def slowed(model: nn.Module, seconds: float):
    """Make every forward pass of ``model`` take at least ``seconds`` (remove the returned hook to undo)."""
    return model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


# ---------------------------------------------------------------------------------------------
# endpoints and answers


def test_health_models_and_the_page_are_served(server):
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["model"] == "tiny"
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200 and [model["id"] for model in json.loads(body)["data"]] == ["tiny"]
    assert request(server, "GET", "/v1/models/tiny")[0] == 200
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"getReader()" in page and b"AbortController" in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere: works offline


def test_a_greedy_answer_is_what_generate_gives_the_chat_prompt_alone(server, chat_model):
    prompt, expected = alone(chat_model, HELLO, 12)
    assert chat_model.tokenizer.decode(prompt) == format_input({"instruction": "Hello"}) + RESPONSE_HEADER
    answer = chat(server, max_tokens=12, model="whatever")
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": chat_model.tokenizer.decode(expected)}
    assert choice["finish_reason"] == ("length" if len(expected) == 12 else "stop")
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                               "total_tokens": len(prompt) + len(expected)}


def test_streamed_chunks_concatenate_to_the_answer(server):
    whole = chat(server, max_tokens=20)
    events = stream_events(server, max_tokens=20, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + \
        [whole["choices"][0]["finish_reason"]]
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert len(chunks) > 3  # the answer came in pieces
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_concurrent_requests_of_different_lengths_are_one_batch_with_the_answers_they_get_alone(server, chat_model):
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Name three colours of the rainbow, please, in order."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me a story about a cat and a long, winding river."}]]
    settings = [{"max_tokens": 25}, {"max_tokens": 9}, {"max_tokens": 30, "temperature": 1.0, "seed": 7, "top_p": 0.9},
                {"max_tokens": 17}]
    lengths = {len(chat_model.encode_prompt(messages)) for messages in conversations}
    assert len(lengths) == 4  # four different prompt lengths: the batch is padded
    single = [chat(server, messages=messages, **options) for messages, options in zip(conversations, settings)]
    before = server.worker.snapshot()["batches"]
    results: dict[int, dict] = {}
    barrier = threading.Barrier(len(conversations))

    def client(index: int) -> None:
        barrier.wait()
        results[index] = chat(server, messages=conversations[index], **settings[index])

    server.worker.window_s = 1.0  # long enough for all four to arrive on a busy machine
    try:
        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(conversations))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        server.worker.window_s = 0.005
    assert server.worker.snapshot()["batches"] == before + 1
    assert server.worker.snapshot()["largest_batch"] >= 4
    for index, answer in enumerate(single):
        assert results[index]["choices"] == answer["choices"] and results[index]["usage"] == answer["usage"]
    for messages, answer, options in zip(conversations, single, settings):
        if "temperature" not in options:
            expected = alone(chat_model, messages, options["max_tokens"])[1]
            assert answer["choices"][0]["message"]["content"] == chat_model.tokenizer.decode(expected)


def test_a_request_arriving_mid_batch_joins_it_and_gets_the_answer_it_gets_alone(chat_model):
    worker = BatchWorker(chat_model, window_s=0.0).start()
    hook = slowed(chat_model.model, 0.01)
    try:
        first = chat_model.encode_prompt([{"role": "user", "content": "Tell me about rivers and the sea."}])
        second = chat_model.encode_prompt(HELLO)  # shorter: the joined cache pads it in front
        third = chat_model.encode_prompt([{"role": "user", "content": "A much longer message than any other one, "
                                                                      "so that the running rows get padded."}])
        jobs = [worker.submit(Job(first, 40))]
        wait_until(lambda: jobs[0].completion_tokens >= 3)
        jobs.append(worker.submit(Job(second, 25)))
        wait_until(lambda: jobs[1].completion_tokens >= 2)
        jobs.append(worker.submit(Job(third, 12)))
        for job in jobs:
            assert job.done.wait(20)
    finally:
        hook.remove()
        worker.stop()
    stats = worker.snapshot()
    assert (stats["batches"], stats["joined"], stats["largest_batch"]) == (1, 2, 3)
    for prompt, job in zip((first, second, third), jobs):
        assert job.text == chat_model.tokenizer.decode(greedy_alone(chat_model, prompt, job.max_tokens))


def greedy_alone(chat_model: ChatModel, prompt: list[int], max_tokens: int) -> list[int]:
    out = generate(chat_model.model, torch.tensor([prompt]), max_tokens, eos_id=EOS_ID)[0, len(prompt):].tolist()
    return out[:out.index(EOS_ID)] if EOS_ID in out else out


def test_a_seeded_sampled_answer_repeats_and_other_seeds_differ(server):
    options = {"max_tokens": 20, "temperature": 1.5}
    first, again = chat(server, seed=3, **options), chat(server, seed=3, **options)
    assert first["choices"] == again["choices"]
    others = {chat(server, seed=seed, **options)["choices"][0]["message"]["content"] for seed in (4, 5, 6)}
    assert len(others | {first["choices"][0]["message"]["content"]}) > 1


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(server):
    full = chat(server, max_tokens=20)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 4]
    cut = full[:full.index(stop)]
    answer = chat(server, max_tokens=20, stop=[stop, "never appears"])
    assert answer["choices"][0]["message"]["content"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    events = stream_events(server, max_tokens=20, stop=stop)
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-1]) == cut


def test_a_stop_token_id_ends_a_row_and_the_others_go_on(chat_model):
    prompt, expected = alone(chat_model, HELLO, 10)
    stopping = dataclasses.replace(chat_model, stop_ids=frozenset({EOS_ID, expected[2]}))
    worker = BatchWorker(stopping, window_s=0.2).start()
    try:
        longer = chat_model.encode_prompt([{"role": "user", "content": "A longer message than the other one"}])
        jobs = [worker.submit(Job(prompt, 10)), worker.submit(Job(longer, 6))]
        for job in jobs:
            assert job.done.wait(10)
    finally:
        worker.stop()
    assert jobs[0].finish_reason == "stop" and jobs[0].completion_tokens == expected.index(expected[2])
    assert jobs[0].text == chat_model.tokenizer.decode(expected[:jobs[0].completion_tokens])
    assert worker.snapshot()["batches"] == 1 and jobs[1].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------
# bad requests


def with_messages(**fields) -> dict:
    return {"messages": HELLO, **fields}


BAD_BODIES = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "invalid_json", None),
    (b"\xff\xfe", "invalid_json", None),
    ({}, "invalid_value", "messages"),
    ({"messages": "Hello"}, "invalid_value", "messages"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": ["Hello"]}, "invalid_value", "messages[0]"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "Hi"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_value", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "invalid_value", "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "invalid_value", "messages"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "context_length_exceeded", "messages"),
    (with_messages(temperature="warm"), "invalid_value", "temperature"),
    (with_messages(temperature=2.5), "invalid_value", "temperature"),
    (with_messages(temperature=True), "invalid_value", "temperature"),
    (with_messages(top_p=1.5), "invalid_value", "top_p"),
    (with_messages(max_tokens=0), "invalid_value", "max_tokens"),
    (with_messages(max_tokens=2.5), "invalid_value", "max_tokens"),
    (with_messages(max_tokens="10"), "invalid_value", "max_tokens"),
    (with_messages(max_tokens=10**6), "context_length_exceeded", "max_tokens"),
    (with_messages(max_completion_tokens=-1), "invalid_value", "max_completion_tokens"),
    (with_messages(stop=["a", "b", "c", "d", "e"]), "invalid_value", "stop"),
    (with_messages(stop=[""]), "invalid_value", "stop"),
    (with_messages(stop=3), "invalid_value", "stop"),
    (with_messages(seed="lucky"), "invalid_value", "seed"),
    (with_messages(seed=2**70), "invalid_value", "seed"),
    (with_messages(stream="yes"), "invalid_value", "stream"),
    (with_messages(stream=True, stream_options=[]), "invalid_value", "stream_options"),
    (with_messages(n=2), "invalid_value", "n"),
    (with_messages(model=7), "invalid_value", "model"),
    (with_messages(tools=[{"type": "function"}]), "unsupported_parameter", "tools"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD_BODIES)
def test_a_bad_request_is_a_400_error_object_naming_the_field(server, body, code, param):
    status, headers, reply = request(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    error = json.loads(reply)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert error["message"]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
    ("DELETE", "/health", 405, "method_not_allowed"),
    ("POST", "/", 405, "method_not_allowed"),
    ("GET", "/v1/completions", 404, "unknown_url"),
    ("POST", "/v2/chat/completions", 404, "unknown_url"),
    ("GET", "/v1/models/gpt-4", 404, "model_not_found"),
])
def test_unknown_paths_are_404_and_wrong_methods_405(server, method, path, status, code):
    got, headers, reply = request(server, method, path, b"{}" if method == "POST" else None)
    assert got == status and json.loads(reply)["error"]["code"] == code
    if status == 405:
        assert headers["Allow"]


def raw_exchange(server, data: bytes) -> bytes:
    """Send ``data`` as it is and return everything the server answers until it closes."""
    with socket.create_connection(server.server_address[:2], timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_a_body_over_the_limit_is_413_before_it_is_read_and_one_without_length_411(server):
    reply = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "request_too_large"
    reply = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411")


def test_the_server_stays_healthy_after_bad_requests_and_a_failing_model(server, chat_model):
    for body, _, _ in BAD_BODIES[:6]:
        request(server, "POST", "/v1/chat/completions", body)
    raw_exchange(server, b"garbage\r\n\r\n")

    def explode(module, args):
        raise RuntimeError("the model broke")

    hook = chat_model.model.register_forward_pre_hook(explode)
    try:
        status, _, reply = request(server, "POST", "/v1/chat/completions", with_messages(max_tokens=5))
        assert status == 500 and json.loads(reply)["error"]["type"] == "server_error"
        assert "the model broke" in json.loads(reply)["error"]["message"]
        events = stream_events(server, max_tokens=5)
        assert "the model broke" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    finally:
        hook.remove()
    assert server.worker.alive and json.loads(request(server, "GET", "/health")[2])["status"] == "ok"
    assert chat(server, max_tokens=3)["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------
# disconnects


def test_a_client_that_disconnects_mid_stream_stops_its_row(server, chat_model):
    hook = slowed(chat_model.model, 0.02)  # 60 tokens would take over a second
    try:
        body = json.dumps(with_messages(max_tokens=60, stream=True)).encode()
        connection = socket.create_connection(server.server_address[:2], timeout=10)
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b'"content"') < 3:  # the role chunk and two pieces of text
            received += connection.recv(4096)
        wait_until(lambda: server.worker.snapshot()["active"] == 1)
        connection.close()
        wait_until(lambda: server.worker.snapshot()["active"] == 0)
    finally:
        hook.remove()
    job = server.worker.history[-1]
    assert job.finish_reason == "cancelled" and job.completion_tokens < 40


def test_a_client_that_gives_up_waiting_for_a_whole_answer_stops_it_too(server, chat_model):
    hook = slowed(chat_model.model, 0.02)
    try:
        body = json.dumps(with_messages(max_tokens=60)).encode()
        cancelled = server.worker.snapshot()["cancelled"]
        with socket.create_connection(server.server_address[:2], timeout=10) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: server.worker.snapshot()["active"] == 1)
        wait_until(lambda: server.worker.snapshot()["cancelled"] == cancelled + 1)
    finally:
        hook.remove()
    assert server.worker.history[-1].completion_tokens < 40


# ---------------------------------------------------------------------------------------------
# API key and the command line


def test_an_api_key_is_required_once_set_and_another_address_needs_one(chat_model):
    with pytest.raises(ValueError, match="API key"):
        make_server(chat_model, host="0.0.0.0", port=0)
    keyed = make_server(chat_model, port=0, api_key="s3cret", quiet=True).start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, got, reply = request(keyed, "GET", "/v1/models", headers=headers)
            assert status == 401 and got["WWW-Authenticate"] == "Bearer"
            assert json.loads(reply)["error"]["code"] == "invalid_api_key"
        assert request(keyed, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(keyed, "GET", "/health")[0] == 200  # health and the page need no key
    finally:
        keyed.close()


def test_stopping_the_worker_ends_a_running_answer_and_fails_the_waiting(chat_model):
    worker = BatchWorker(chat_model, max_batch=1, window_s=0.0).start()
    hook = slowed(chat_model.model, 0.02)
    try:
        prompt = chat_model.encode_prompt(HELLO)
        running, waiting = worker.submit(Job(prompt, 60)), worker.submit(Job(prompt, 60))
        wait_until(lambda: running.completion_tokens >= 1)
        start = time.monotonic()
        worker.stop()
        assert time.monotonic() - start < 5 and not worker.alive
    finally:
        hook.remove()
    for job in (running, waiting):
        assert job.done.is_set() and job.finish_reason == "error" and "shutting down" in job.error
    assert running.completion_tokens < 60


def test_the_server_listens_on_ipv6_loopback_too(chat_model):
    try:
        served = make_server(chat_model, host="::1", port=0, quiet=True).start()
    except OSError as error:
        pytest.skip(f"this machine has no IPv6 loopback ({error})")
    try:
        assert served.url.startswith("http://[::1]:")
        assert request(served, "GET", "/health")[0] == 200
    finally:
        served.close()


@pytest.mark.parametrize(("argv", "words"), [
    (["--model", "gpt2", "--host", "0.0.0.0"], "--api-key"),
    (["--model", "gpt2", "--port", "70000"], "--port"),
    (["--model", "gpt2", "--max-batch", "0"], "--max-batch"),
    (["--model", "gpt2", "--device", "cuda:7"], "cuda"),
])
def test_bad_options_are_one_line_and_status_2_before_any_model_loads(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("LLM_SERVE_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_a_model_that_cannot_load_is_one_line_and_status_1(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load" in err


@pytest.mark.slow
def test_the_command_serves_a_saved_model_until_interrupted(tmp_path, chat_model):
    from helpers.weights import save_hf_gpt2

    save_hf_gpt2(chat_model.model, tmp_path / "tiny-folder")
    process = subprocess.Popen([sys.executable, "-m", "helpers.serve", "--model", str(tmp_path / "tiny-folder"),
                                "--port", "0", "--quiet"], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "tiny-folder at http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        served = SimpleNamespace(server_address=("127.0.0.1", port))
        expected = chat_model.tokenizer.decode(alone(chat_model, HELLO, 8)[1])
        assert chat(served, max_tokens=8)["choices"][0]["message"]["content"] == expected
    finally:
        process.send_signal(2)  # SIGINT: Ctrl-C
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "stopped" in err


def test_load_chat_model_reads_a_checkpoint_of_either_architecture_and_refuses_names_it_lacks(tmp_path):
    from helpers.checkpoint import save_checkpoint
    from helpers.modern import ModernConfig, ModernModel

    torch.manual_seed(0)
    modern = ModernModel(ModernConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_kv_heads=1,
                                      n_layers=1, hidden_dim=32, head_dim=8))
    save_checkpoint(tmp_path / "modern-run", modern)
    loaded = load_chat_model(tmp_path / "modern-run")
    assert isinstance(loaded.model, ModernModel) and loaded.name == "modern-run" and loaded.stop_ids == {EOS_ID}
    assert torch.equal(loaded.model.tok_emb.weight, modern.tok_emb.weight)
    with pytest.raises(ChatModelError, match="neither a model folder nor a model name"):
        load_chat_model("gpt-5")
    small = GPTModel(GPTConfig(vocab_size=300, context_length=16, emb_dim=8, n_heads=2, n_layers=1))
    save_checkpoint(tmp_path / "small-vocab", small)
    with pytest.raises(ChatModelError, match="300 token ids"):
        load_chat_model(tmp_path / "small-vocab")


def test_a_model_without_an_attention_mask_answers_its_rows_side_by_side(chat_model):
    torch.manual_seed(0)
    modern = tiny_modern_model()
    served = dataclasses.replace(chat_model, model=modern)
    worker = BatchWorker(served, window_s=0.2).start()
    try:
        prompts = [served.encode_prompt([{"role": "user", "content": text}]) for text in ("Hi", "A longer one")]
        jobs = [worker.submit(Job(prompt, 6)) for prompt in prompts]
        for job in jobs:
            assert job.done.wait(10)
    finally:
        worker.stop()
    for prompt, job in zip(prompts, jobs):
        out = generate(modern, torch.tensor([prompt]), 6, eos_id=EOS_ID)[0, len(prompt):].tolist()
        assert job.text == served.tokenizer.decode(out[:out.index(EOS_ID)] if EOS_ID in out else out)
    assert worker.snapshot()["batches"] == 1


def tiny_modern_model() -> nn.Module:
    from helpers.modern import ModernConfig, ModernModel

    return ModernModel(ModernConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=16, n_heads=2, n_kv_heads=1,
                                    n_layers=1, hidden_dim=32, head_dim=8)).eval()


# ---------------------------------------------------------------------------------------------
# clients: the openai package, Part 09's judge, a browser


def test_the_openai_client_talks_to_the_server(chat_model):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")
    keyed = make_server(chat_model, port=0, api_key="k3y", quiet=True).start()
    try:
        client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="k3y", max_retries=0)
        assert [model.id for model in client.models.list()] == ["tiny"]
        answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
        expected = chat_model.tokenizer.decode(alone(chat_model, HELLO, 10)[1])
        assert answer.choices[0].message.content == expected and answer.usage.completion_tokens <= 10
        stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, stream=True)
        assert "".join(part.choices[0].delta.content or "" for part in stream if part.choices) == expected
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        keyed.close()


class ScriptedModel(nn.Module):
    """A model whose next token depends only on the last one, by a script: it answers what a test needs."""

    def __init__(self, script: dict[int, int], vocab_size: int = 50257, context_length: int = 1024):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.cfg = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.anchor = nn.Parameter(torch.zeros(1))  # so that the server finds the device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for previous, following in self.script.items():
            logits[..., following] += (idx == previous).float()
        return logits


def test_part09s_judge_client_scores_through_the_server(capsys):
    from helpers.judge import judge_responses

    tokenizer = gpt2_tokenizer()
    end_of_prompt = encode_user_text(tokenizer, RESPONSE_HEADER)[-1]
    eighty_seven = tokenizer.encode("87")[0]
    judge = ChatModel("scripted-judge", ScriptedModel({end_of_prompt: eighty_seven, eighty_seven: EOS_ID}),
                      tokenizer, alpaca_prompt, frozenset({EOS_ID}))
    scripted = make_server(judge, port=0, quiet=True).start()
    try:
        entries = [{"instruction": "Add 2 and 2.", "input": "", "output": "4", "model_response": "4"}] * 2
        scores = judge_responses(entries, url=f"{scripted.url}/v1/chat/completions", model="scripted-judge",
                                 timeout=20, progress=False)
    finally:
        scripted.close()
    assert scores == [87, 87], capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser_page():
    """A headless Chromium page (the system's Chromium, driven by playwright)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (make setup tries it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # bypass_csp: the page forbids eval, which playwright uses to run the checks below
            yield browser.new_page(viewport={"width": 900, "height": 600}, bypass_csp=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_the_chat_page_streams_an_answer_and_stops_one(server, chat_model, browser_page, tmp_path):
    page = browser_page
    page.goto(server.url + "/")
    page.wait_for_function("document.title === 'tiny'")
    page.fill("#max-tokens", "12")
    page.fill("#message", "Hello")
    page.click("#send")
    page.wait_for_function("document.body.dataset.state === 'idle' && document.querySelector('.msg.assistant')",
                           timeout=20_000)
    expected = chat_model.tokenizer.decode(alone(chat_model, HELLO, 12)[1])
    assert page.text_content(".msg.user") == "Hello" and page.text_content(".msg.assistant") == expected
    screenshot = tmp_path / "chat.png"
    page.screenshot(path=str(screenshot))
    assert_non_blank_png(screenshot)

    hook = slowed(chat_model.model, 0.05)
    try:
        page.click("#clear")  # a new chat: the whole context is free for a long answer
        page.fill("#max-tokens", "50")
        page.fill("#message", "Tell me more")
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0", timeout=20_000)
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.stopped", timeout=10_000)
        wait_until(lambda: server.worker.snapshot()["active"] == 0)
    finally:
        hook.remove()
    assert server.worker.history[-1].finish_reason == "cancelled"
    assert page.evaluate("document.body.dataset.state") == "idle"


def assert_non_blank_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG file"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = {tuple(row) for row in pixels.reshape(-1, pixels.shape[-1])[::37].tolist()}
    assert len(colours) > 10, "the screenshot is blank"


# ---------------------------------------------------------------------------------------------
# Part 11's kind of model: a ModernModel with its own tokenizer and ChatML template


@pytest.fixture(scope="module")
def chatml_model():
    """A tiny random ModernModel with SmolLM2's tokenizer and template, as helpers.smollm2 builds the real one."""
    from helpers.chat_format import format_chat
    from helpers.gguf import gguf_tokenizer, smollm2_gguf_path
    from helpers.modern import ModernConfig, ModernModel
    from helpers.smollm2 import ChatMLChatModel

    torch.manual_seed(5)
    cfg = ModernConfig(vocab_size=49152, context_length=2 * CONTEXT, emb_dim=32, n_heads=4, n_kv_heads=2, head_dim=8,
                       hidden_dim=64, n_layers=2, tie_weights=True)
    tokenizer = gguf_tokenizer(smollm2_gguf_path())
    return ChatMLChatModel("tiny-chatml", ModernModel(cfg).eval(), tokenizer, format_chat,
                           frozenset({tokenizer.encode("<|im_end|>", allowed_special="all")[0]}))


def test_a_modern_model_with_a_chat_template_is_batched_and_joined_with_the_answers_it_gets_alone(chatml_model):
    from helpers.smollm2 import chatml_ids

    stop = min(chatml_model.stop_ids)
    conversations = [[{"role": "user", "content": "Tell me about rivers and the sea."}], HELLO,
                     [{"role": "user", "content": "A much longer message than any other one, so that the running "
                                                  "rows get padded. <|im_end|> stays text."}]]
    prompts = [chatml_model.encode_prompt(messages) for messages in conversations]
    assert prompts == [chatml_ids(messages, chatml_model.tokenizer) for messages in conversations]
    worker = BatchWorker(chatml_model, window_s=0.0).start()
    hook = slowed(chatml_model.model, 0.01)
    try:
        jobs = [worker.submit(Job(prompts[0], 30))]
        wait_until(lambda: jobs[0].completion_tokens >= 3)
        jobs.append(worker.submit(Job(prompts[1], 20)))
        wait_until(lambda: jobs[1].completion_tokens >= 2)
        jobs.append(worker.submit(Job(prompts[2], 12)))
        for job in jobs:
            assert job.done.wait(30)
    finally:
        hook.remove()
        worker.stop()
    stats = worker.snapshot()
    assert (stats["batches"], stats["joined"], stats["largest_batch"]) == (1, 2, 3)
    for prompt, job in zip(prompts, jobs):
        out = generate(chatml_model.model, torch.tensor([prompt]), job.max_tokens, eos_id=stop)[0, len(prompt):]
        out = out.tolist()
        assert job.text == chatml_model.tokenizer.decode(out[:out.index(stop)] if stop in out else out)


def test_the_chat_command_talks_to_smollm2_in_its_own_template():
    result = subprocess.run([sys.executable, "-m", "helpers.chat", "--model", "smollm2", "--max-new-tokens", "12"],
                            input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
