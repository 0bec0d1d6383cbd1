"""The chat server's generation worker: one thread that answers the requests waiting together, in padded batches.

Requests (``Job``) wait in a queue. The worker takes the first, waits a short window (``window_s``)
for others, and decodes them as one batch: the prompts left-padded to one length with an attention
mask (``helpers.generate.left_pad``, ``GPTModel.forward(..., attention_mask=...)``) and one KV cache,
one new token per row per step. Each row samples with its own settings (temperature, top-p, and a
``torch.Generator`` seeded from its own seed) and stops on its own: a stop token id, a stop string,
its ``max_tokens``, or a cancel by its client; a finished row leaves the batch
(``KVCache.keep_rows``) and the others go on. Greedy rows get the tokens they would get alone.

Requests that arrive while a batch is decoding wait for the next one (no joining a running batch). A
model other than ``GPTModel``, which takes no attention mask to hide padding behind, decodes its rows
side by side, one forward pass per row and step (as ``generate_batch`` answers them one at a time).
A step that raises fails the requests of its batch with the error's message; the worker goes on.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from helpers.chat import TokenTextStream
from helpers.chat_models import ChatModel
from helpers.generate import has_kv_cache, left_pad, next_token_logits, sample_next_token
from helpers.model import GPTModel

__all__ = ["BatchWorker", "Job", "Sampling", "WorkerUnavailable"]

_STOP = object()  # put in the queue to end the worker


class WorkerUnavailable(RuntimeError):
    """The worker cannot take a request now: its queue is full, or it has stopped; the message says which."""


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: greedy (temperature 0, the default) or sampled, with a seed if given.

    ``top_p`` keeps the smallest set of most likely tokens reaching that probability (None or 1: all;
    0: only the most likely, which is greedy). ``seed`` makes a sampled answer repeatable.
    """

    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether every token is the most likely one."""
        return self.temperature == 0 or self.top_p == 0


class Job:
    """One request to the worker: a prompt, how to sample and when to stop; then its answer, as it grows.

    The handler that submitted it reads ``next_event`` (text pieces, then the end) or waits for ``done``;
    ``cancel`` makes the worker drop its row at the next step. Once ``done`` is set, ``text`` is the whole
    answer, ``completion_tokens`` the tokens generated for it (a stop token id not counted) and
    ``finish_reason`` one of ``"stop"`` (a stop id or string), ``"length"`` (``max_tokens``), ``"cancelled"``
    or ``"error"`` (then ``error`` says what went wrong).
    """

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
                 stop: Sequence[str] = ()):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = tuple(stop)
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.monotonic()
        self.done = threading.Event()
        self._cancelled = threading.Event()
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()

    def cancel(self) -> None:
        """Ask the worker to stop generating for this request (its client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` was called."""
        return self._cancelled.is_set()

    def next_event(self, timeout: float) -> tuple[str, str] | None:
        """The next ``("text", piece)``, ``("done", finish_reason)`` or ``("error", why)``; None after ``timeout``."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _send(self, piece: str) -> None:
        if piece:
            self._events.put(("text", piece))

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._events.put(("error", error) if error is not None else ("done", reason))
        self.done.set()


class _Row:
    """One request's place in a batch: its tokens so far, its text decoder, its stop rules."""

    def __init__(self, job: Job, chat_model: ChatModel, device: torch.device):
        self.job = job
        self.tokens = list(job.prompt_ids)
        self.stream = TokenTextStream(chat_model.tokenizer)
        self.stop_ids = chat_model.stop_ids
        self.text = ""
        self.sent = 0  # how many characters of text went to the client (the rest may start a stop string)
        self.generator = None
        if not job.sampling.greedy:
            self.generator = torch.Generator(device=device)
            if job.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(job.sampling.seed)

    def push(self, token: int) -> bool:
        """Take the row's next token; return whether the row has finished."""
        job = self.job
        if token in self.stop_ids:
            return self._finish("stop", self.stream.flush())
        self.tokens.append(token)
        job.completion_tokens += 1
        self.text += self.stream.push(token)
        cut = self._stop_string_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self._finish("stop", "")
        if job.completion_tokens >= job.max_tokens:
            return self._finish("length", self.stream.flush())
        self._send_until(len(self.text) - self._held_back())
        return False

    def _stop_string_at(self) -> int | None:
        """Where the first stop string in the unsent text begins, if one is there."""
        found = [at for at in (self.text.find(stop, self.sent) for stop in self.job.stop) if at >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """How many characters at the end of the text might begin a stop string (not sent until that is known)."""
        longest = max((len(stop) for stop in self.job.stop), default=0)
        for size in range(min(longest - 1, len(self.text) - self.sent), 0, -1):
            if any(stop.startswith(self.text[-size:]) for stop in self.job.stop):
                return size
        return 0

    def _send_until(self, end: int) -> None:
        if end > self.sent:
            self.job._send(self.text[self.sent:end])
            self.sent = end

    def _finish(self, reason: str, tail: str) -> bool:
        self.text += tail
        self._send_until(len(self.text))
        self.job.text = self.text
        self.job._finish(reason)
        return True


def _pick_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """One token per row of ``logits`` ``(rows, vocab)``: the most likely, or sampled with the row's own settings."""
    tokens = sample_next_token(logits)[:, 0]  # greedy for all (refusing NaN logits), then the sampled rows
    for index, row in enumerate(rows):
        if row.generator is not None:
            sampling = row.job.sampling
            top_p = None if sampling.top_p in (None, 1) else sampling.top_p
            tokens[index] = sample_next_token(logits[index:index + 1], sampling.temperature, None, top_p,
                                              row.generator)[0, 0]
    return tokens.tolist()


class _Group:
    """Rows decoded together: their ids ``(rows, width)`` left-padded, the mask, and one KV cache."""

    def __init__(self, rows: list[_Row], pad_id: int, device: torch.device):
        self.rows, self.pad_id, self.device = rows, pad_id, device
        self._pad()

    def _pad(self) -> None:
        """Left-pad every row's tokens so far into a new batch (the cache starts again)."""
        self.idx, self.mask = left_pad([row.tokens for row in self.rows], self.pad_id, self.device)
        self.padded = not bool(self.mask.all())
        self.cache = None

    def step(self, model: torch.nn.Module, context: int) -> int:
        """Drop cancelled rows, give every other row its next token, drop the finished; return how many finished."""
        cancelled = [index for index, row in enumerate(self.rows) if row.job.cancelled]
        for index in cancelled:
            self.rows[index].job._finish("cancelled")
        self._drop(cancelled)
        if not self.rows:
            return len(cancelled)
        if self.cache is not None and self.cache.length >= context:
            # the padding pushed the batch past the context (each row alone fits): pad again to today's longest
            self._pad()
        mask = self.mask if self.padded else None
        logits, self.cache = next_token_logits(model, self.idx, self.cache, context, has_kv_cache(model),
                                               attention_mask=mask)
        tokens = _pick_tokens(logits, self.rows)
        new = torch.tensor(tokens, device=self.device)[:, None]  # (rows, 1)
        self.idx = torch.cat([self.idx, new], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(new, dtype=torch.bool)], dim=1)
        finished = [index for index, (row, token) in enumerate(zip(self.rows, tokens)) if row.push(token)]
        self._drop(finished)
        return len(cancelled) + len(finished)

    def _drop(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [index for index in range(len(self.rows)) if index not in set(indices)]
        self.rows = [self.rows[index] for index in keep]
        if self.rows:
            rows = torch.tensor(keep, device=self.device)
            self.idx, self.mask = self.idx[rows], self.mask[rows]
            if self.cache is not None:
                self.cache.keep_rows(rows)


class BatchWorker:
    """The thread that answers ``Job``s for one ``ChatModel``, up to ``max_batch`` of them at a time.

    ``window_s`` is how long the first waiting request waits for others to join its batch; at most
    ``max_queue`` requests wait (``submit`` refuses more). ``snapshot`` reports what it is doing;
    ``history`` holds the last finished jobs (newest last).
    """

    def __init__(self, chat_model: ChatModel, *, max_batch: int = 16, window_s: float = 0.01, max_queue: int = 256):
        self.chat_model = chat_model
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.history: collections.deque[Job] = collections.deque(maxlen=64)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stats = {"batches": 0, "answered": 0, "cancelled": 0, "failed": 0, "largest_batch": 0, "active": 0}
        self._thread = threading.Thread(target=self._loop, name="generation worker", daemon=True)
        parameter = next(chat_model.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def start(self) -> BatchWorker:
        """Start the thread (the model is put in eval mode); return the worker."""
        self.chat_model.model.eval()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after the batch it is decoding; requests still waiting are failed."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        """Queue ``job`` for the next batch and return it; ``WorkerUnavailable`` if the queue is full or stopped."""
        if not self.alive:
            raise WorkerUnavailable("the generation worker is not running; restart the server")
        if self._queue.qsize() >= self.max_queue:
            raise WorkerUnavailable(f"{self.max_queue} requests are already waiting; try again shortly")
        self._queue.put(job)
        return job

    def snapshot(self) -> dict[str, int]:
        """Counts: ``queued`` and ``active`` requests now; ``batches``, ``answered``, ``cancelled``, ``failed`` so far;
        the ``largest_batch`` decoded."""
        with self._lock:
            return {**self._stats, "queued": self._queue.qsize()}

    def _count(self, **changes: int) -> None:
        with self._lock:
            for key, value in changes.items():
                self._stats[key] = value if key in ("active", "largest_batch") else self._stats[key] + value

    def _loop(self) -> None:
        with torch.inference_mode():
            while (jobs := self._collect()) is not None:
                try:
                    self._answer(jobs)
                except Exception as error:  # a failing batch fails its requests, never the worker
                    message = f"generation failed: {type(error).__name__}: {error}"
                    for job in jobs:
                        if not job.done.is_set():
                            job._finish("error", message)
                finally:
                    self._count(active=0, **self._tally(jobs))
                    self.history.extend(jobs)
        while True:  # stopped: whoever still waits hears so
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job._finish("error", "the server is shutting down")

    @staticmethod
    def _tally(jobs: list[Job]) -> dict[str, int]:
        reasons = collections.Counter(job.finish_reason for job in jobs)
        return {"answered": reasons["stop"] + reasons["length"], "cancelled": reasons["cancelled"],
                "failed": reasons["error"]}

    def _collect(self) -> list[Job] | None:
        """The next batch: the first waiting job and those arriving within the window; None once stopped."""
        first = self._queue.get()
        if first is _STOP:
            return None
        jobs = [first]
        deadline = first.submitted + self.window_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP:
                self._queue.put(_STOP)  # end after this batch
                break
            jobs.append(job)
        return jobs

    def _answer(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` step by step until every one has finished."""
        model, context = self.chat_model.model, self.chat_model.context_length
        rows = [_Row(job, self.chat_model, self.device) for job in jobs]
        pad_id = min(self.chat_model.stop_ids, default=0)  # any id will do: padding is masked
        if isinstance(model, GPTModel):
            groups = [_Group(rows, pad_id, self.device)]
        else:  # no attention mask to hide padding behind: each row alone
            groups = [_Group([row], pad_id, self.device) for row in rows]
        self._count(batches=1, largest_batch=max(len(jobs), self.snapshot()["largest_batch"]), active=len(jobs))
        active = len(jobs)
        while groups:
            for group in groups:
                active -= group.step(model, context)
            groups = [group for group in groups if group.rows]
            self._count(active=active)
