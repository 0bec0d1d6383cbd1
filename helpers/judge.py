"""Scoring answers by an LLM judge over HTTP (Part 09): Ollama's ``/api/chat`` or an OpenAI-compatible server.

``helpers.instruct`` re-exports these names, so ``from helpers.instruct import judge_responses`` works too.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence

from tqdm.auto import tqdm

__all__ = ["JudgeUnavailable", "judge_prompt", "judge_responses", "parse_score"]


class JudgeUnavailable(RuntimeError):
    """The judge server cannot be used (unreachable, refusing, or too slow); the message says what to do."""


class _TimedOut(JudgeUnavailable):
    """One request took longer than the timeout."""


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
    match = re.fullmatch(r"\s*(\d{1,3})\s*\.?\s*", text)
    if match is None:
        return None
    score = int(match.group(1))
    return score if score <= 100 else None


def _is_openai(url: str) -> bool:
    return url.rstrip("/").endswith("/v1/chat/completions")


def _request_body(url: str, model: str, prompt: str, stream: bool) -> dict:
    messages = [{"role": "user", "content": prompt}]
    if _is_openai(url):
        return {"model": model, "messages": messages, "temperature": 0, "seed": 123, "stream": False}
    return {"model": model, "messages": messages, "stream": stream,
            "options": {"temperature": 0, "seed": 123, "num_ctx": 2048}}


def _reply_text(url: str, body: str) -> str:
    """The assistant's text in a response: OpenAI's ``choices``, Ollama's single JSON or streamed NDJSON."""
    if _is_openai(url):
        return json.loads(body)["choices"][0]["message"]["content"]
    parts = []
    for line in body.splitlines():
        if line.strip():
            parts.append(json.loads(line).get("message", {}).get("content", ""))
    return "".join(parts)


def _ask(url: str, model: str, prompt: str, timeout: float, stream: bool, api_key: str | None) -> str:
    """Send one chat request and return the reply's text; connection trouble raises ``JudgeUnavailable``."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(_request_body(url, model, prompt, stream)).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace").strip()[:200]
        raise JudgeUnavailable(f"the judge at {url} answered HTTP {error.code}: {detail or error.reason}. "
                               f"If the model is missing, run `ollama pull {model}` or pass model=...") from error
    except TimeoutError as error:
        raise _TimedOut(f"the judge at {url} did not answer within {timeout} s; pass a larger timeout=") from error
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            raise _TimedOut(f"the judge at {url} did not answer within {timeout} s; pass a larger timeout=") from error
        raise JudgeUnavailable(f"no judge answered at {url} ({reason}). Start Ollama (`ollama serve`) and "
                               f"`ollama pull {model}`, or pass url= for another chat server") from error
    try:
        return _reply_text(url, body)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""  # an answer we cannot read counts as a malformed score


def _score_one(entry: dict, url: str, model: str, timeout: float, stream: bool, api_key: str | None,
               retries: int) -> int | None:
    """The judge's score for one entry, asking again up to ``retries`` times when the reply is not a score."""
    prompt = judge_prompt(entry)
    for attempt in range(retries + 1):
        try:
            score = parse_score(_ask(url, model, prompt, timeout, stream, api_key))
        except _TimedOut:
            if attempt == retries:
                raise
            continue
        if score is not None:
            return score
    return None


def judge_responses(entries: Sequence[dict], url: str = "http://localhost:11434/api/chat", model: str = "llama3",
                    timeout: float = 60, *, stream: bool = False, retries: int = 1, api_key: str | None = None,
                    progress: bool = True, verbose: bool = True) -> list[int | None]:
    """Ask a chat server to score each entry's ``model_response`` against its ``output``; one int (0-100) or None each.

    ``url`` is Ollama's ``/api/chat`` (the reply streamed as NDJSON with ``stream=True``, one JSON
    otherwise) or, when it ends in ``/v1/chat/completions``, an OpenAI-compatible server. A reply that
    is not exactly one integer from 0 to 100 is asked again ``retries`` times, then scored None. When
    the server cannot be reached, refuses, or times out on every try, a message saying what to do is
    printed (``verbose``) and the remaining entries are None; nothing is raised.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    missing = next((i for i, e in enumerate(entries) if "model_response" not in e), None)
    if missing is not None:
        raise KeyError(f"entry {missing} has no 'model_response'; answer the entries with generate_responses first")
    scores: list[int | None] = [None] * len(entries)
    for index, entry in enumerate(tqdm(entries, desc="judging", unit="entry", disable=not progress)):
        try:
            scores[index] = _score_one(entry, url, model, timeout, stream, api_key, retries)
        except JudgeUnavailable as error:
            if verbose:
                print(f"judge_responses: {error}; the remaining {len(entries) - index} entries are not scored (None).")
            break
    return scores
