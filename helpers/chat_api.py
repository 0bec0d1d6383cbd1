"""OpenAI's chat-completions format, as ``helpers.serve`` speaks it: checking a request, building the answers.

``parse_chat_request`` turns a request body into a ``ChatRequest`` or raises ``APIError`` (an HTTP status
and OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``) naming the field that is
wrong. Supported: ``messages`` (roles ``system``, ``developer`` (read as ``system``), ``user``, ``assistant``;
content as text or a list of text parts), ``temperature`` (0 to 2; 0 is greedy, the default), ``top_p``
(0 to 1), ``max_tokens`` (or ``max_completion_tokens``), ``stop`` (a string or up to 4), ``seed``,
``stream`` and ``stream_options.include_usage``, ``n`` (1 only). ``model`` is accepted whatever it says
(the server has one) and the answer names the model that answered. Other fields are ignored, except
tools, which this server cannot call and refuses.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass

from helpers.batching import Job, Sampling
from helpers.chat_models import ROLES, ChatModel, ChatModelError, Message

__all__ = ["MAX_STOP_STRINGS", "APIError", "ChatRequest", "chunk", "completion", "parse_chat_request", "usage"]

MAX_STOP_STRINGS = 4
_SEEDS = (-(2**63), 2**64 - 1)  # what a client may send; torch.Generator takes the value modulo 2**64


class APIError(Exception):
    """A request the server refuses: ``status`` (HTTP) and OpenAI's error object (``body``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):  # noqa: A002 (the field's name in OpenAI's format)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request: the conversation, its prompt ids, and how to answer it."""

    messages: list[Message]
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    def job(self) -> Job:
        """The worker's ``Job`` for this request."""
        return Job(self.prompt_ids, self.max_tokens, self.sampling, self.stop)


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _kind(value: object) -> str:
    """What JSON calls ``value``: null, a boolean, a number, a string, an array, an object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return f"the number {value}"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _number(document: dict, name: str, low: float, high: float) -> float | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _invalid(name, f"must be a number from {low:g} to {high:g}, got {_kind(value)}")
    return float(value)


def _integer(document: dict, name: str, low: int, high: int) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, f"must be an integer from {low} to {high}, got {_kind(value)}")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _document(body: bytes) -> dict:
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not UTF-8 text ({error})", code="invalid_json") from None
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"the request body is not valid JSON ({str(error)[:120]}); send a JSON object such as "
                            '{"messages": [{"role": "user", "content": "Hello"}]}', code="invalid_json") from None
    if not isinstance(document, dict):
        raise APIError(400, f"the request body is {_kind(document)}; send a JSON object with 'messages'",
                       code="invalid_json")
    return document


def _content(value: object, param: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _invalid(f"{param}[{index}]", "only text parts {\"type\": \"text\", \"text\": \"...\"} are "
                                                    f"supported, got {json.dumps(part)[:80]}")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(param, f"must be text (a string or a list of text parts), got {_kind(value)}")


def _messages(document: dict) -> list[Message]:
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", f"must be a non-empty array of {{\"role\", \"content\"}} objects, "
                                   f"got {_kind(messages)}")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(param, f"must be an object with 'role' and 'content', got {_kind(message)}")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise _invalid(f"{param}.role", f"must be one of {', '.join(ROLES)} (or developer), got "
                                            f"{json.dumps(role)[:40]}")
        checked.append({"role": role, "content": _content(message.get("content"), f"{param}.content")})
    return checked


def _stop(document: dict) -> tuple[str, ...]:
    stop = document.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(text, str) and text for text in stops):
        raise _invalid("stop", f"must be a non-empty string or an array of up to {MAX_STOP_STRINGS} of them, "
                               f"got {json.dumps(stop)[:80]}")
    return tuple(stops)


def _refuse_unsupported(document: dict) -> None:
    if document.get("n") not in (None, 1):
        raise _invalid("n", f"only one answer per request (n = 1) is supported, got {_kind(document['n'])}")
    for name in ("tools", "functions"):
        if document.get(name):
            raise _invalid(name, "this server cannot call tools; leave it out", code="unsupported_parameter")
    if not isinstance(document.get("model", ""), str):
        raise _invalid("model", f"must be a string, got {_kind(document['model'])}")
    if document.get("stream_options") is not None and not isinstance(document["stream_options"], dict):
        raise _invalid("stream_options", f"must be an object, got {_kind(document['stream_options'])}")
    for name, value in (("stream", document.get("stream")),
                        ("stream_options.include_usage", (document.get("stream_options") or {}).get("include_usage"))):
        if value is not None and not isinstance(value, bool):
            raise _invalid(name, f"must be true or false, got {_kind(value)}")


def _prompt_ids(chat_model: ChatModel, messages: list[Message]) -> list[int]:
    try:
        prompt_ids = chat_model.encode_prompt(messages)
    except ChatModelError as error:
        raise _invalid("messages", str(error)) from None
    if len(prompt_ids) >= chat_model.context_length:
        raise APIError(400, f"the conversation is {len(prompt_ids)} tokens as the model's prompt, but its context "
                            f"holds {chat_model.context_length} with the answer: send fewer or shorter messages",
                       param="messages", code="context_length_exceeded")
    return prompt_ids


def parse_chat_request(body: bytes, chat_model: ChatModel, default_max_tokens: int = 256) -> ChatRequest:
    """The checked request in ``body``; ``APIError`` (400) naming the first field that is wrong.

    Without ``max_tokens`` an answer may take ``default_max_tokens`` tokens, or whatever room the
    prompt leaves in the model's context if that is less.
    """
    document = _document(body)
    _refuse_unsupported(document)
    messages = _messages(document)
    stop = _stop(document)
    temperature = _number(document, "temperature", 0, 2)
    top_p = _number(document, "top_p", 0, 1)
    seed = _integer(document, "seed", *_SEEDS)
    prompt_ids = _prompt_ids(chat_model, messages)
    room = chat_model.context_length - len(prompt_ids)
    name = "max_completion_tokens" if document.get("max_completion_tokens") is not None else "max_tokens"
    if isinstance(document.get(name), int) and not isinstance(document[name], bool) and document[name] > room:
        raise APIError(400, f"{name} is {document[name]}, but the model's context of {chat_model.context_length} "
                            f"tokens leaves room for {room} after the prompt's {len(prompt_ids)}: ask for at most "
                            f"{room}, or send a shorter conversation", param=name, code="context_length_exceeded")
    max_tokens = _integer(document, name, 1, room)
    return ChatRequest(
        messages=messages, prompt_ids=prompt_ids,
        max_tokens=max_tokens if max_tokens is not None else min(default_max_tokens, room),
        sampling=Sampling(temperature or 0.0, top_p, None if seed is None else seed % 2**64), stop=stop,
        stream=bool(document.get("stream")),
        include_usage=bool((document.get("stream_options") or {}).get("include_usage")))


def usage(job: Job) -> dict:
    """OpenAI's ``usage`` object for a finished job."""
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens}


def completion(request_id: str, created: int, model: str, job: Job) -> dict:
    """The ``chat.completion`` object answering a finished job."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                         "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": usage(job), "system_fingerprint": None}


def chunk(request_id: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          job_usage: dict | None = None) -> dict:
    """One ``chat.completion.chunk`` of a streamed answer; ``delta`` None gives the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    document = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, "system_fingerprint": None}
    if job_usage is not None or delta is None:
        document["usage"] = job_usage
    return document
