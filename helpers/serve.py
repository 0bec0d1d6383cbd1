"""An OpenAI-compatible chat server and a chat page for one model: ``python -m helpers.serve --model DIR_OR_NAME``.

Endpoints: ``POST /v1/chat/completions`` (OpenAI's request and answer; ``"stream": true`` sends
server-sent events, ``data: {chunk}`` each, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, and ``GET /``, a chat page that streams the answer as it comes and can stop it.
The standard library's ``ThreadingHTTPServer`` runs one thread per connection; one generation
worker (``helpers.batching``) answers the requests that arrive together in one padded batch.

It listens on 127.0.0.1 only, unless ``--host`` names another address, which needs an API key
(``--api-key`` or ``LLM_SERVE_API_KEY``): with a key set, every ``/v1/`` request must send
``Authorization: Bearer KEY`` (401 otherwise). A request the server cannot answer gets OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (bad JSON or fields, a prompt
longer than the context, a body over ``--max-body-bytes`` (413), an unknown path (404) or method (405)),
or 500 if answering failed; the server goes on either way. A client that disconnects stops its answer.

Exit status: 0 stopped with Ctrl-C while serving; 1 the model could not be loaded or the address not bound;
2 a bad option or a device this machine lacks; 130 interrupted during start-up. Each failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from helpers.batching import BatchWorker, Job, WorkerUnavailable
from helpers.chat import _device, _OneLineParser  # the chat command's option checks, shared
from helpers.chat_api import APIError, ChatRequest, chunk, completion, parse_chat_request, usage
from helpers.chat_models import ChatModel

__all__ = ["API_KEY_VARIABLE", "MAX_BODY_BYTES", "PAGE", "ChatServer", "main", "make_server"]

API_KEY_VARIABLE = "LLM_SERVE_API_KEY"
MAX_BODY_BYTES = 2**20  # a request is a conversation: 1 MiB holds far more text than any context here
PAGE = Path(__file__).with_name("serve_page.html")
"""The chat page served at ``/``: one HTML file, its script and style inline, nothing fetched from elsewhere."""
_POLL_S = 0.25  # how often a waiting handler checks that its client is still connected
_EXIT_CODES = ("exit status: 0 stopped (Ctrl-C); 1 model not loadable or address not usable; 2 bad option; "
               "130 interrupted during start-up")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: one ``ChatModel``, its ``BatchWorker``, and the settings the handlers read."""

    daemon_threads = True  # an open keep-alive connection never holds up the end of the server
    block_on_close = False

    def __init__(self, address: tuple[str, int], chat_model: ChatModel, worker: BatchWorker, *,
                 api_key: str | None, default_max_tokens: int, max_body_bytes: int, quiet: bool):
        self.chat_model, self.worker, self.api_key = chat_model, worker, api_key
        self.default_max_tokens, self.max_body_bytes, self.quiet = default_max_tokens, max_body_bytes, quiet
        self.created = int(time.time())
        self.page = PAGE.read_bytes()
        self._thread: threading.Thread | None = None
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """The server's address, ``http://host:port`` (the port the system chose, for port 0)."""
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> ChatServer:
        """Serve in a background thread (for tests, notebooks and benchmarks); ``close`` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name="chat server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if ``start`` ran), the worker and the listening socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.worker.stop()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        """One line on stderr instead of socketserver's traceback (a client that went away, mostly)."""
        error = sys.exc_info()[1]
        if not self.quiet:
            print(f"helpers.serve: connection from {client_address[0]}: {type(error).__name__}: {error}",
                  file=sys.stderr)


def make_server(chat_model: ChatModel, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
                max_batch: int = 16, window_s: float = 0.01, default_max_tokens: int = 256,
                max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False) -> ChatServer:
    """A ``ChatServer`` bound to ``host:port`` with its worker running; call ``serve_forever`` or ``start``.

    An address other than the loopback needs ``api_key``: ``ValueError`` otherwise. With a key, every
    ``/v1/`` request must carry it. ``max_batch`` and ``window_s`` are the worker's (``BatchWorker``);
    ``default_max_tokens`` bounds an answer whose request sets no ``max_tokens``; ``quiet`` logs nothing.
    Binding errors (an address in use) are ``OSError``.
    """
    if not _is_loopback(host) and not api_key:
        raise ValueError(f"serving on {host} lets other machines in: set an API key (--api-key KEY or "
                         f"{API_KEY_VARIABLE}=KEY), or leave --host out to serve on 127.0.0.1 only")
    if api_key is not None and (not api_key or not api_key.isprintable() or " " in api_key):
        raise ValueError("the API key must be printable text without spaces")
    worker = BatchWorker(chat_model, max_batch=max_batch, window_s=window_s).start()
    try:
        return ChatServer((host, port), chat_model, worker, api_key=api_key, default_max_tokens=default_max_tokens,
                          max_body_bytes=max_body_bytes, quiet=quiet)
    except BaseException:
        worker.stop()
        raise


class _ClientGone(Exception):
    """The client closed the connection while its answer was being sent."""


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1, kept alive), routed by ``_ROUTES``."""

    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "helpers.serve"
    timeout = 120  # seconds a client may take to send a request or to read a piece of its answer

    def do_GET(self) -> None:  # noqa: N802 (the names http.server calls)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch("OPTIONS")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- routing ------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._body_read, self._answering = False, False
        path, methods = urlsplit(self.path).path, ()
        try:
            methods, action = _route(path)
            if method not in methods:
                raise APIError(405, f"{path} answers {' and '.join(methods)}, not {method}", code="method_not_allowed")
            if path.startswith("/v1/"):
                self._check_key()
            action(self, path)
        except APIError as error:
            self._send_json(error.status, error.body(), allow=methods if error.status == 405 else None)
        except _ClientGone:
            self.close_connection = True
        except Exception as error:  # a bug or a failing model: a 500 for this request, the server goes on
            self.log_error("answering %s %s failed: %s: %s", method, path, type(error).__name__, error)
            if self._answering:  # the status line went out already: all we can do is end the connection
                self.close_connection = True
            else:
                self._send_json(500, APIError(500, f"the server failed to answer ({type(error).__name__}: {error})",
                                              type="server_error").body())

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        match = re.fullmatch(r"Bearer\s+(\S+)\s*", self.headers.get("Authorization", ""))
        if match is None or not hmac.compare_digest(match.group(1).encode(), key.encode()):
            raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY' with the key "
                                "the server was started with", code="invalid_api_key")

    # -- endpoints ----------------------------------------------------------------------------

    def _page(self, path: str) -> None:
        self._send(200, self.server.page, "text/html; charset=utf-8",
                   {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                               "style-src 'unsafe-inline'", "Cache-Control": "no-store"})

    def _health(self, path: str) -> None:
        alive = self.server.worker.alive
        self._send_json(200 if alive else 503, {"status": "ok" if alive else "worker stopped",
                                                "model": self.server.chat_model.name, **self.server.worker.snapshot()})

    def _model(self) -> dict:
        return {"id": self.server.chat_model.name, "object": "model", "created": self.server.created,
                "owned_by": "helpers"}

    def _models(self, path: str) -> None:
        self._send_json(200, {"object": "list", "data": [self._model()]})

    def _one_model(self, path: str) -> None:
        name = path.removeprefix("/v1/models/")
        if name != self.server.chat_model.name:
            raise APIError(404, f"no model {name!r} here; this server has {self.server.chat_model.name!r}",
                           param="model", code="model_not_found")
        self._send_json(200, self._model())

    def _chat(self, path: str) -> None:
        request = parse_chat_request(self._read_body(), self.server.chat_model, self.server.default_max_tokens)
        try:
            job = self.server.worker.submit(request.job())
        except WorkerUnavailable as error:
            raise APIError(503, str(error), type="server_error", code="server_busy") from None
        try:
            if request.stream:
                self._stream(job, request)
            else:
                self._complete(job)
        finally:
            if not job.done.is_set():
                job.cancel()  # whatever ended this handler early, the worker need not go on for it

    def _complete(self, job: Job) -> None:
        while not job.done.wait(_POLL_S):
            if self._client_gone():
                raise _ClientGone
        if job.finish_reason == "error":
            raise APIError(500, job.error, type="server_error")
        self._send_json(200, completion(_request_id(), int(time.time()), self.server.chat_model.name, job))

    def _stream(self, job: Job, request: ChatRequest) -> None:
        request_id, created, name = _request_id(), int(time.time()), self.server.chat_model.name
        self._answering = True
        self.send_response(200)
        for header, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                              ("Transfer-Encoding", "chunked"), ("X-Accel-Buffering", "no")):
            self.send_header(header, value)
        self.end_headers()
        self._event(chunk(request_id, created, name, {"role": "assistant", "content": ""}))
        while True:
            event = job.next_event(_POLL_S)
            if event is None:
                if self._client_gone():
                    raise _ClientGone
                continue
            kind, value = event
            if kind == "text":
                self._event(chunk(request_id, created, name, {"content": value}))
            elif kind == "done":
                self._event(chunk(request_id, created, name, {}, value))
                if request.include_usage:
                    self._event(chunk(request_id, created, name, None, job_usage=usage(job)))
                break
            else:  # the worker failed: say so in the stream, as OpenAI does, and end it
                self._event(APIError(500, value, type="server_error").body())
                break
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    # -- reading and writing ------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            raise APIError(411, "send the request body with a Content-Length header (chunked bodies are not read)",
                           code="length_required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise APIError(400, f"Content-Length is {self.headers['Content-Length']!r}, not a number of bytes",
                           code="invalid_header")
        if length > self.server.max_body_bytes:
            raise APIError(413, f"the request body is {length:,} bytes; this server reads at most "
                                f"{self.server.max_body_bytes:,}: send a shorter conversation",
                           code="request_too_large")
        try:
            body = self.rfile.read(length)
        except OSError as error:  # the client stopped sending (the timeout) or went away
            raise _ClientGone from error
        self._body_read = True
        if len(body) < length:
            raise _ClientGone
        return body

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        if self.command == "POST" and not self._body_read:
            self.close_connection = True  # the unread body would be taken for the next request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for header, value in (headers or {}).items():
            self.send_header(header, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self._write(body)

    def _send_json(self, status: int, document: dict, allow: Sequence[str] | None = None) -> None:
        headers = {"Allow": ", ".join(allow)} if allow else {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send(status, json.dumps(document).encode("utf-8"), "application/json", headers)

    def _event(self, document: dict) -> None:
        self._write_chunk(f"data: {json.dumps(document)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        """One piece of a chunked body (``b""`` ends it)."""
        self._write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as error:  # a broken pipe, a reset, or a client too slow to read (the timeout)
            raise _ClientGone from error

    def _client_gone(self) -> bool:
        """Whether the client closed its side (the socket reads as ended) while we were waiting for its answer."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def _request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


_ROUTES = {
    "/": (("GET", "HEAD"), _Handler._page),
    "/health": (("GET", "HEAD"), _Handler._health),
    "/v1/models": (("GET",), _Handler._models),
    "/v1/chat/completions": (("POST",), _Handler._chat),
}


def _route(path: str):
    """The (methods, action) for ``path``; ``APIError`` 404 for a path this server does not have."""
    if path in _ROUTES:
        return _ROUTES[path]
    if path.startswith("/v1/models/"):
        return ("GET",), _Handler._one_model
    raise APIError(404, f"no such path: {path}; this server answers POST /v1/chat/completions, GET /v1/models, "
                        "GET /health and GET / (the chat page)", code="unknown_url")


# ---------------------------------------------------------------------------------------------
# the command


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m helpers.serve", description=__doc__.splitlines()[0], epilog=_EXIT_CODES)
    parser.add_argument("--model", required=True, help="a GPT-2 name (gpt2, gpt2-medium, ...), a folder written by "
                                                       "save_hf_gpt2, or a save_checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                            "needs an API key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"the key /v1/ requests must send as 'Authorization: Bearer KEY' "
                             f"(default: ${API_KEY_VARIABLE}; none on 127.0.0.1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests answered together (default 16)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a request waits for others to share its batch (default 10 ms)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="longest answer when a request sets no max_tokens (default 256)")
    parser.add_argument("--quiet", action="store_true", help="log no requests")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first option whose value cannot work."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.batch_window_ms <= 10_000:
        raise ValueError(f"--batch-window-ms must be from 0 to 10000, got {args.batch_window_ms}")
    if not _is_loopback(args.host) and not args.api_key:
        raise ValueError(f"--host {args.host} lets other machines in: add --api-key KEY (or set {API_KEY_VARIABLE}), "
                         "or leave --host out to serve on 127.0.0.1 only")


def _run(args: argparse.Namespace) -> int:
    from helpers.chat_models import load_chat_model

    _validate(args)
    device = _device(args.device)
    try:
        chat_model = load_chat_model(args.model, device=device)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"helpers.serve: cannot load the model {args.model!r}: {error}", file=sys.stderr)
        return 1
    try:
        server = make_server(chat_model, args.host, args.port, api_key=args.api_key, max_batch=args.max_batch,
                             window_s=args.batch_window_ms / 1000, default_max_tokens=args.max_tokens,
                             quiet=args.quiet)
    except OSError as error:
        print(f"helpers.serve: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
              "pick another --port", file=sys.stderr)
        return 1
    print(f"helpers.serve: {chat_model.name} at {server.url}/ (the chat page; the API at {server.url}/v1); "
          "Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nhelpers.serve: stopped", file=sys.stderr)
    finally:
        server.worker.stop()
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C; return the exit status (the module docstring lists them)."""
    try:
        return _run(_parser().parse_args(argv))
    except ValueError as error:
        print(f"helpers.serve: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during start-up
        print("\nhelpers.serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
