"""Tests for helpers.judge: the LLM-judge client against fake chat servers on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.instruct import judge_responses, parse_score

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


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.daemon_threads = True
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
