"""Tests for scoring Part 09's answers: the LLM-judge client (fake chat servers on 127.0.0.1) and ROUGE-L."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.instruct import judge_responses, mean_rouge_l, parse_score, rouge_l

WITH_INPUT = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
              "output": "The car is as fast as lightning."}
WITHOUT_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


class _Judge(BaseHTTPRequestHandler):
    """A fake chat server: replies with the next of ``server.replies`` in the form the request asks for."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        reply = self.server.replies.pop(0) if len(self.server.replies) > 1 else self.server.replies[0]
        if self.server.delay:
            time.sleep(self.server.delay)
        if isinstance(reply, int):  # an HTTP error status
            return self._send(reply, json.dumps({"error": "model 'llama3' not found, try pulling it first"}))
        if self.path.endswith("/v1/chat/completions"):
            return self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}))
        if body.get("stream"):
            chunks = [reply[: len(reply) // 2], reply[len(reply) // 2:]]
            lines = [json.dumps({"message": {"role": "assistant", "content": c}, "done": False}) for c in chunks]
            lines.append(json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}))
            return self._send(200, "\n".join(lines) + "\n")
        return self._send(200, json.dumps({"message": {"role": "assistant", "content": reply}, "done": True}))

    def _send(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output quiet
        pass


class _Server(ThreadingHTTPServer):
    """A loopback test server that stays quiet when a client hangs up mid-answer (as a timed-out judge call does)."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def judge_server():
    server = _Server(("127.0.0.1", 0), _Judge)
    server.requests, server.replies, server.delay = [], ["50"], 0.0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


ANSWERED = [{**WITH_INPUT, "model_response": "The car is like a rocket."},
            {**WITHOUT_INPUT, "model_response": "Blue."}]


@pytest.mark.parametrize("stream", [False, True])
def test_judge_sends_ollamas_chat_request_and_parses_the_scores(judge_server, stream):
    judge_server.replies = ["85", " 7\n"]
    scores = judge_responses(ANSWERED, url=f"{judge_server.url}/api/chat", model="llama3", timeout=5,
                             stream=stream, progress=False)
    assert scores == [85, 7]
    path, body = judge_server.requests[0]
    assert path == "/api/chat" and body["model"] == "llama3" and body["stream"] is stream
    assert [message["role"] for message in body["messages"]] == ["user"]
    content = body["messages"][0]["content"]
    for text in (WITH_INPUT["instruction"], WITH_INPUT["output"], "The car is like a rocket.", "0 to 100"):
        assert text in content


def test_judge_speaks_the_openai_form_for_a_v1_url(judge_server):
    judge_server.replies = ["64"]
    scores = judge_responses(ANSWERED[:1], url=f"{judge_server.url}/v1/chat/completions", model="m", timeout=5,
                             progress=False)
    assert scores == [64]
    path, body = judge_server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "m" and "options" not in body
    assert body["messages"][0]["role"] == "user"


def test_judge_asks_again_once_after_a_malformed_answer(judge_server):
    judge_server.replies = ["I would say 80 out of 100", "80", "about ninety", "101"]
    assert judge_responses(ANSWERED, url=f"{judge_server.url}/api/chat", timeout=5, progress=False) == [80, None]
    assert len(judge_server.requests) == 4  # one retry per entry, no more


def test_parse_score_accepts_exactly_one_integer_from_0_to_100():
    assert [parse_score(text) for text in ["85", " 100\n", "0", "42."]] == [85, 100, 0, 42]
    assert [parse_score(text) for text in ["101", "85/100", "-3", "Score: 85", "8 5", ""]] == [None] * 6


def test_judge_gives_up_with_a_message_when_the_server_is_too_slow(judge_server, capsys):
    judge_server.delay = 0.5
    start = time.perf_counter()
    scores = judge_responses(ANSWERED, url=f"{judge_server.url}/api/chat", timeout=0.1, progress=False)
    assert scores == [None, None]
    assert time.perf_counter() - start < 3
    assert len(judge_server.requests) == 2  # the first entry and its retry, then it stops
    assert "did not answer within 0.1 s" in capsys.readouterr().out


def test_judge_reports_a_dead_server_and_returns_none(capsys):
    with socket.socket() as probe:  # a port that was free a moment ago and has nothing listening now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scores = judge_responses(ANSWERED, url=f"http://127.0.0.1:{port}/api/chat", timeout=2, progress=False)
    assert scores == [None, None]
    message = capsys.readouterr().out
    assert "ollama serve" in message and "ollama pull llama3" in message and "url=" in message
    assert message.count("\n") == 1


def test_judge_reports_a_missing_model(judge_server, capsys):
    judge_server.replies = [404]
    assert judge_responses(ANSWERED, url=f"{judge_server.url}/api/chat", timeout=5, progress=False) == [None, None]
    message = capsys.readouterr().out
    assert "HTTP 404" in message and "ollama pull llama3" in message


# --- replies the client must survive: each test's server writes its own bytes ---------------------------


class _Scripted(BaseHTTPRequestHandler):
    """A server whose every answer is ``server.answer(handler)``; it records (method, path, headers) of each request."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        self.server.answer(self)

    do_GET = do_POST  # noqa: N815 (http.server's name)

    def log_message(self, *args):
        pass


def _send(handler, status, data=b"", headers=()):
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(data)), **dict(headers)}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def serve():
    """Start a scripted server on 127.0.0.1 (a new port, so a new origin, each call); all stop at the end."""
    servers = []

    def start(answer):
        server = _Server(("127.0.0.1", 0), _Scripted)
        server.answer, server.seen, server.url = answer, [], f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_never_leaves_the_judges_origin(serve, status, capsys):
    elsewhere = serve(lambda handler: _send(handler, 200, json.dumps({"message": {"content": "100"}}).encode()))
    judge = serve(lambda handler: _send(handler, status, headers=[("Location", f"{elsewhere.url}/api/chat")]))

    scores = judge_responses(ANSWERED, url=f"{judge.url}/api/chat", api_key="secret-key", timeout=5, progress=False)

    assert scores == [None, None]
    assert elsewhere.seen == []  # not asked at all, so it never saw the Authorization header
    assert len(judge.seen) == 1 and judge.seen[0][2]["Authorization"] == "Bearer secret-key"
    message = capsys.readouterr().out
    assert f"HTTP {status}" in message and "redirect" in message and elsewhere.url in message and "url=" in message
    assert "secret-key" not in message


@pytest.mark.parametrize("part", ["status line", "body"])
def test_timeout_bounds_the_whole_request_when_the_server_drips_its_answer(serve, part, capsys):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 48\r\n\r\n"

    def drip(handler):  # one byte every 0.25 s, 12 s at most
        handler.wfile.write(head if part == "body" else b"")
        for byte in (b" " * 48 if part == "body" else head):
            handler.wfile.write(bytes([byte]))
            time.sleep(0.25)

    server = serve(drip)
    start = time.monotonic()
    scores = judge_responses(ANSWERED[:1], url=f"{server.url}/api/chat", timeout=1, retries=0, progress=False)
    assert time.monotonic() - start < 2
    assert scores == [None]
    assert "did not answer within 1 s" in capsys.readouterr().out


def test_a_huge_reply_is_not_read_whole(serve, capsys):
    size, chunk, sent = 60 * 2**20, b" " * 2**16, []

    def flood(handler):
        _send(handler, 200, headers=[("Content-Length", str(size))])  # the header, then the promised bytes
        for _ in range(size // len(chunk)):
            handler.wfile.write(chunk)
            sent.append(len(chunk))

    server = serve(flood)
    scores = judge_responses(ANSWERED[:1], url=f"{server.url}/api/chat", timeout=30, progress=False)
    assert scores == [None]
    assert len(server.seen) == 1  # a server that floods is not asked again
    assert sum(sent) < size // 2
    message = capsys.readouterr().out
    assert "more than" in message and "bytes" in message


OLLAMA, OPENAI = "/api/chat", "/v1/chat/completions"


@pytest.mark.parametrize(("path", "reply", "reason"), [
    (OLLAMA, b'{"message": {"role": "assistant", "content": null}, "done": true}', "content is null"),
    (OLLAMA, b'{"message": {"role": "assistant", "content": 85}, "done": true}', "content is a number"),
    (OLLAMA, b"85", "reply is a number"),
    (OLLAMA, b'[{"message": {"content": "85"}}]', "reply is an array"),
    (OLLAMA, b'{"message": {"content": "8\xff5"}}', "UTF-8"),
    (OLLAMA, b'{"model": "llama3", "done": true}', "no 'message'"),
    (OLLAMA, b'{"message": {"content": "8', "not JSON"),
    (OLLAMA, b"[" * 100_000, "not JSON"),
    (OLLAMA, b'{"message": {"content": "8"}}\n{"message": {"content"', "not JSON"),
    (OLLAMA, b'{"error": "model runner ran out of memory"}', "ran out of memory"),
    (OPENAI, b'{"choices": [{"message": {"role": "assistant", "content": null}}]}', "content is null"),
    (OPENAI, b'{"choices": [{"message": {"role": "assistant", "content": 85}}]}', "content is a number"),
    (OPENAI, b'{"choices": []}', "choices[0].message"),
    (OPENAI, b'{"choices": "85"}', "choices[0].message"),
    (OPENAI, b"null", "reply is null"),
])
def test_a_malformed_reply_is_no_score_with_the_reason_never_an_exception(serve, path, reply, reason, capsys):
    server = serve(lambda handler: _send(handler, 200, reply))
    scores = judge_responses(ANSWERED[:1], url=server.url + path, timeout=5, progress=False)
    assert scores == [None]
    assert len(server.seen) == 2  # asked again once, as for a reply that is not a score
    message = capsys.readouterr().out
    assert "entry 0" in message and reason in message


def test_a_reply_cut_short_is_no_score_with_the_reason(serve, capsys):
    server = serve(lambda handler: handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"mess"))
    assert judge_responses(ANSWERED[:1], url=f"{server.url}/api/chat", timeout=5, progress=False) == [None]
    assert "cut short" in capsys.readouterr().out


def test_a_reply_that_is_not_a_score_says_so(judge_server, capsys):
    judge_server.replies = ["about ninety"]
    assert judge_responses(ANSWERED[:1], url=f"{judge_server.url}/api/chat", timeout=5, progress=False) == [None]
    assert "entry 0" in capsys.readouterr().out


# --- arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arguments", "name"), [
    ({"retries": -1}, "retries"), ({"retries": 1.5}, "retries"), ({"retries": True}, "retries"),
    ({"retries": None}, "retries"),
    ({"timeout": 0}, "timeout"), ({"timeout": -1}, "timeout"), ({"timeout": float("nan")}, "timeout"),
    ({"timeout": float("inf")}, "timeout"), ({"timeout": 1e12}, "timeout"), ({"timeout": "5"}, "timeout"),
    ({"timeout": True}, "timeout"), ({"timeout": None}, "timeout"),
    ({"url": "ftp://127.0.0.1/api/chat"}, "url"), ({"url": "localhost:11434/api/chat"}, "url"),
    ({"url": "http://127.0.0.1:port/api/chat"}, "url"), ({"url": None}, "url"),
    ({"model": ""}, "model"), ({"model": None}, "model"),
    ({"api_key": "key\r\nX-Injected: 1"}, "api_key"), ({"api_key": 123}, "api_key"),
])
def test_bad_arguments_are_refused_before_any_request_naming_them(judge_server, arguments, name):
    arguments = {"url": f"{judge_server.url}/api/chat", **arguments}
    with pytest.raises((TypeError, ValueError), match=name):
        judge_responses(ANSWERED, **arguments, progress=False)
    assert judge_server.requests == []


@pytest.mark.parametrize(("entry", "error", "words"), [
    ({"instruction": "Name a color.", "input": "", "model_response": "Red."}, KeyError, "entry 1 has no 'output'"),
    ({"input": "", "output": "Red.", "model_response": "Red."}, KeyError, "entry 1 has no 'instruction'"),
    ("Red.", TypeError, "entry 1 is a str"),
])
def test_entries_missing_what_the_prompt_needs_are_refused_before_any_request(judge_server, entry, error, words):
    with pytest.raises(error, match=words):
        judge_responses([ANSWERED[0], entry], url=f"{judge_server.url}/api/chat", progress=False)
    assert judge_server.requests == []


def test_parse_score_refuses_what_is_not_text():
    with pytest.raises(TypeError, match="text"):
        parse_score(None)


# --- ROUGE-L --------------------------------------------------------------------------------------------


def _textbook_rouge_l(candidate, reference):
    """ROUGE-L F1 by the longest-common-subsequence table, row by row: what rouge_l computed before."""
    cand, ref = (re.findall(r"\w+", text.lower()) for text in (candidate, reference))
    previous = [0] * (len(ref) + 1)
    for word in cand:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.slow  # the textbook table of 3,000 x 3,000 words: a few seconds on a busy machine
def test_rouge_l_of_two_3000_word_texts_is_exactly_the_textbook_value():
    rng = random.Random(0)
    vocabulary = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "was"] + [f"word{i}" for i in range(30)]
    candidate, reference = (" ".join(rng.choices(vocabulary, k=3000)) for _ in range(2))
    assert rouge_l(candidate, reference) == _textbook_rouge_l(candidate, reference)


@given(st.lists(st.sampled_from(["a", "b", "c", "B", "ab", "x_1", "é"]), max_size=150),
       st.lists(st.sampled_from(["a", "b", "c", "A", "ab", "x_1", "é", "!"]), max_size=150))
def test_rouge_l_equals_the_textbook_value_on_any_word_lists(candidate, reference):
    candidate, reference = " ".join(candidate), ", ".join(reference)
    assert rouge_l(candidate, reference) == _textbook_rouge_l(candidate, reference)


@pytest.mark.parametrize(("candidate", "reference", "name"), [
    (None, "Red.", "candidate"), ("Red.", None, "reference"), (b"Red.", "Red.", "candidate"), ("Red.", 3, "reference"),
])
def test_rouge_l_refuses_what_is_not_text_naming_the_argument(candidate, reference, name):
    with pytest.raises(TypeError, match=name):
        rouge_l(candidate, reference)


def test_mean_rouge_l_names_the_entry_whose_answer_is_not_text():
    entries = [{"model_response": "Red.", "output": "Red."}, {"model_response": None, "output": "Red."}]
    with pytest.raises(TypeError, match="entry 1.*model_response"):
        mean_rouge_l(entries)
