"""Scoring answers by an LLM judge over HTTP (Part 09): Ollama's ``/api/chat`` or an OpenAI-compatible server.

The client trusts nothing the server sends. It never follows a redirect (so an ``api_key`` reaches
``url``'s own server and no other), ``timeout`` bounds each request as a whole (connecting, sending and
every byte of the reply), a reply is not read past ``MAX_REPLY_BYTES``, and a reply it cannot read is
"no score" (None) with the reason printed, never an exception. ``helpers.instruct`` re-exports the
public names, so ``from helpers.instruct import judge_responses`` works too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import numbers
import re
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from helpers.runtime import check_count

__all__ = ["MAX_REPLY_BYTES", "MAX_TIMEOUT", "JudgeUnavailable", "judge_prompt", "judge_responses", "parse_score"]

MAX_REPLY_BYTES = 4 * 2**20  # a score takes a few bytes; Ollama streaming a whole 2,048-token context, ~0.3 MB
MAX_TIMEOUT = 24 * 3600.0  # seconds; a longer timeout is a mistake (and overflows the platform's timers)
_ENTRY_KEYS = ("instruction", "output", "model_response")


class JudgeUnavailable(RuntimeError):
    """The judge server cannot be used (unreachable, refusing, redirecting, too slow); the message says what to do."""


class _TimedOut(JudgeUnavailable):
    """One request took longer than the timeout."""


class _Unreadable(Exception):
    """A reply that is not a chat answer; the message says what is wrong with it."""


def judge_prompt(entry: dict) -> str:
    """The question put to the judge for one answered entry: a 0-100 score, answered with the number only."""
    from helpers.instruct import format_input  # here, not at the top: helpers.instruct re-exports this module

    return (
        "You are grading the answer of a language model to a task.\n\n"
        f"Task:\n{format_input(entry)}\n\n"
        f"Correct answer:\n{entry['output']}\n\n"
        f"Model's answer:\n{entry['model_response']}\n\n"
        "Score the model's answer against the correct answer on a scale from 0 to 100, where 100 means "
        "fully correct and 0 means useless. Reply with the integer only."
    )


def parse_score(text: str) -> int | None:
    """The score in a judge's reply when the reply is exactly one integer from 0 to 100, else None."""
    if not isinstance(text, str):
        raise TypeError(f"parse_score's text must be the judge's reply as a string, got a {type(text).__name__}")
    match = re.fullmatch(r"\s*(\d{1,3})\s*\.?\s*", text)
    if match is None:
        return None
    score = int(match.group(1))
    return score if score <= 100 else None


# ---------------------------------------------------------------------------------------------
# arguments, checked where they enter


@dataclass(frozen=True)
class _Judge:
    """Where and how to ask: the checked arguments of ``judge_responses``."""

    url: str
    model: str
    timeout: float
    stream: bool
    api_key: str | None

    @property
    def openai(self) -> bool:
        return self.url.rstrip("/").endswith("/v1/chat/completions")


def _valid_url(url: object) -> bool:
    """Whether ``url`` is a printable http:// or https:// address with a host (and a port from 1 to 65535, if any)."""
    if not isinstance(url, str) or not url.isprintable():
        return False
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # a ValueError when it is not a number from 0 to 65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _check_arguments(entries: Sequence[dict], url: object, model: object, timeout: object, retries: object,
                     api_key: object) -> None:
    """Raise, naming the argument or the entry, unless everything ``judge_responses`` got is usable."""
    if not _valid_url(url):
        raise ValueError(f"url must be an http:// or https:// address such as 'http://localhost:11434/api/chat', "
                         f"got {url!r}")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be the judge model's name, such as 'llama3', got {model!r}")
    if not (isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) and 0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"timeout must be a number of seconds > 0 and at most {MAX_TIMEOUT:g}, got {timeout!r}")
    check_count("retries", retries, minimum=0)
    if api_key is not None and not isinstance(api_key, str):
        raise ValueError(f"api_key must be a string or None, got a {type(api_key).__name__}")
    if api_key is not None and not api_key.isprintable():  # the key itself is never shown
        raise ValueError("api_key holds a line break or another control character; pass the key alone")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TypeError(f"entry {index} is a {type(entry).__name__}, expected a dict with keys {_ENTRY_KEYS}")
        missing = next((key for key in _ENTRY_KEYS if key not in entry), None)
        if missing is not None:
            hint = "answer the entries with generate_responses first" if missing == "model_response" else \
                f"every entry needs {_ENTRY_KEYS}"
            raise KeyError(f"entry {index} has no '{missing}'; {hint}")


# ---------------------------------------------------------------------------------------------
# one request: no redirects, one deadline, a bounded reply


def _exchange(connection: http.client.HTTPConnection, target: str, data: bytes, headers: dict[str, str],
              expired: threading.Event) -> tuple[int, str | None, bytes]:
    """POST ``data`` to ``target``: the status, the Location header, the body (up to ``MAX_REPLY_BYTES + 1`` bytes)."""
    connection.connect()
    if expired.is_set():  # time ran out while connecting, before there was a socket to cut
        raise TimeoutError
    connection.request("POST", target, body=data, headers=headers)
    response = connection.getresponse()
    body = response.read(MAX_REPLY_BYTES + 1)
    if response.length and len(body) <= MAX_REPLY_BYTES:  # fewer bytes came than Content-Length promised
        raise http.client.IncompleteRead(body, response.length)
    return response.status, response.getheader("Location"), body


def _post(judge: _Judge, data: bytes, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
    """``_exchange`` with the judge, over in ``timeout`` seconds whatever the server does; redirects are not followed.

    The exchange runs on a worker thread that this one waits for at most ``timeout`` seconds (name
    lookup, connecting, sending, every byte of the reply); then the socket is shut down, which ends
    the worker's blocked read, and ``_TimedOut`` is raised.
    """
    parts = urllib.parse.urlsplit(judge.url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=judge.timeout)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    expired, outcome = threading.Event(), []

    def work() -> None:
        try:
            outcome.append(_exchange(connection, target, data, headers, expired))
        except Exception as error:  # handed to the waiting thread, which says what it means
            outcome.append(error)
        finally:
            connection.close()

    worker = threading.Thread(target=work, name="judge request", daemon=True)
    worker.start()
    worker.join(judge.timeout)
    if worker.is_alive() or isinstance(outcome[0], TimeoutError):
        expired.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
        raise _TimedOut(f"the judge at {judge.url} did not answer within {judge.timeout:g} s; pass a larger timeout=")
    result = outcome[0]
    if isinstance(result, http.client.IncompleteRead):
        raise _Unreadable(f"the reply was cut short ({result})")
    if isinstance(result, (OSError, http.client.HTTPException)):
        raise JudgeUnavailable(f"no judge answered at {judge.url} ({result}). Start Ollama (`ollama serve`) and "
                               f"`ollama pull {judge.model}`, or pass url= for another chat server")
    if isinstance(result, Exception):  # a bug, not the server: let it show
        raise result
    return result


def _request_body(judge: _Judge, prompt: str) -> dict:
    messages = [{"role": "user", "content": prompt}]
    if judge.openai:
        return {"model": judge.model, "messages": messages, "temperature": 0, "seed": 123, "stream": False}
    return {"model": judge.model, "messages": messages, "stream": judge.stream,
            "options": {"temperature": 0, "seed": 123, "num_ctx": 2048}}


def _ask(judge: _Judge, prompt: str) -> str:
    """Send one chat request and return the reply's text.

    Raises ``JudgeUnavailable`` when the server cannot be used (unreachable, an HTTP error, a redirect,
    a reply over ``MAX_REPLY_BYTES``; ``_TimedOut`` after ``timeout``) and ``_Unreadable`` for a reply
    that is not a chat answer.
    """
    headers = {"Content-Type": "application/json"}
    if judge.api_key:
        headers["Authorization"] = f"Bearer {judge.api_key}"
    status, location, body = _post(judge, json.dumps(_request_body(judge, prompt)).encode("utf-8"), headers)
    if 300 <= status < 400:
        raise JudgeUnavailable(f"the judge at {judge.url} answered HTTP {status}, a redirect to {location!r:.200}; "
                               "redirects are not followed (they could carry api_key to another server): "
                               "pass the address it names as url= if you trust it")
    if not 200 <= status < 300:
        detail = body[:200].decode("utf-8", "replace").strip() or http.client.responses.get(status, "")
        raise JudgeUnavailable(f"the judge at {judge.url} answered HTTP {status}: {detail!r}. "
                               f"If the model is missing, run `ollama pull {judge.model}` or pass model=...")
    if len(body) > MAX_REPLY_BYTES:
        raise JudgeUnavailable(f"the judge at {judge.url} sent more than {MAX_REPLY_BYTES:,} bytes for one score "
                               "(it takes a few); check url= and the server")
    return _reply_text(judge.openai, body)


# ---------------------------------------------------------------------------------------------
# reading a reply


def _kind(value: object) -> str:
    """What JSON calls ``value``, with its article: 'null', 'a number', 'an array', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _content(message: object) -> str:
    """The text of one chat message ``{"role": ..., "content": "..."}``."""
    if not isinstance(message, dict):
        raise _Unreadable(f"the reply's message is {_kind(message)}, not an object")
    content = message.get("content")
    if not isinstance(content, str):
        raise _Unreadable(f"the reply's message content is {_kind(content)}, not text")
    return content


def _reply_text(openai: bool, body: bytes) -> str:
    """The assistant's text in a reply: OpenAI's ``choices``, Ollama's single JSON or streamed NDJSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Unreadable(f"the reply is not UTF-8 text ({error})") from None
    try:
        documents = [json.loads(line) for line in ([text] if openai else text.splitlines()) if line.strip()]
    except (ValueError, RecursionError) as error:
        raise _Unreadable(f"the reply is not JSON ({str(error)[:100]}): {text[:80]!r}") from None
    if not documents:
        raise _Unreadable("the reply is empty")
    for document in documents:
        if not isinstance(document, dict):
            raise _Unreadable(f"the reply is {_kind(document)}, expected a JSON object")
        if "error" in document:
            raise _Unreadable(f"the judge reported an error: {str(document['error'])[:200]!r}")
    if openai:
        try:
            return _content(documents[0]["choices"][0]["message"])
        except (KeyError, IndexError, TypeError):
            raise _Unreadable(f"the reply has no choices[0].message: {text[:80]!r}") from None
    messages = [document["message"] for document in documents if "message" in document]
    if not messages:
        raise _Unreadable(f"the reply has no 'message': {text[:80]!r}")
    return "".join(_content(message) for message in messages)


# ---------------------------------------------------------------------------------------------
# scoring


def _score_one(judge: _Judge, entry: dict, retries: int) -> tuple[int | None, str]:
    """The judge's score for one entry (and ""), or None and why; a reply that is no score is asked again."""
    prompt = judge_prompt(entry)
    reason = ""
    for attempt in range(retries + 1):
        try:
            reply = _ask(judge, prompt)
        except _TimedOut:
            if attempt == retries:
                raise
            continue
        except _Unreadable as error:
            reason = str(error)
            continue
        score = parse_score(reply)
        if score is not None:
            return score, ""
        reason = f"the reply is not one integer from 0 to 100: {reply[:80]!r}"
    return None, reason


def judge_responses(entries: Sequence[dict], url: str = "http://localhost:11434/api/chat", model: str = "llama3",
                    timeout: float = 60, *, stream: bool = False, retries: int = 1, api_key: str | None = None,
                    progress: bool = True, verbose: bool = True) -> list[int | None]:
    """Ask a chat server to score each entry's ``model_response`` against its ``output``; one int (0-100) or None each.

    ``url`` is Ollama's ``/api/chat`` (the reply streamed as NDJSON with ``stream=True``, one JSON
    otherwise) or, when it ends in ``/v1/chat/completions``, an OpenAI-compatible server; ``api_key``
    goes to it as a Bearer token. ``timeout`` bounds each request as a whole.

    Trouble with the server is never raised: it becomes None, and (``verbose``) a printed line saying
    why. A reply that is not exactly one integer from 0 to 100, or that cannot be read (not UTF-8, not
    JSON, no message, content that is not text, cut short), is asked again ``retries`` times, then that
    entry is None. When the server cannot be used (unreachable, an HTTP error, a redirect, which is
    never followed, a reply over ``MAX_REPLY_BYTES``, or a timeout on the last try) the remaining entries
    are None. Bad arguments raise before any request: ``ValueError`` naming the argument, ``KeyError``
    or ``TypeError`` naming the entry.
    """
    _check_arguments(entries, url, model, timeout, retries, api_key)
    judge = _Judge(url, model, float(timeout), bool(stream), api_key)
    scores: list[int | None] = [None] * len(entries)
    for index, entry in enumerate(tqdm(entries, desc="judging", unit="entry", disable=not progress)):
        try:
            scores[index], reason = _score_one(judge, entry, retries)
        except JudgeUnavailable as error:
            if verbose:
                print(f"judge_responses: {error}; the remaining {len(entries) - index} entries are not scored (None).")
            break
        if scores[index] is None and verbose:
            print(f"judge_responses: entry {index} is not scored (None): {reason}")
    return scores
