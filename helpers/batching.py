"""The chat server's generation worker: one thread that answers the requests waiting together, in padded batches.

Requests (``Job``) wait in a queue. The worker takes the first, waits a short window (``window_s``)
for others, and decodes them as one batch: the prompts left-padded to one length with an attention
mask (``helpers.generate.left_pad``, a decoder's ``forward(..., attention_mask=...)``) and one KV cache,
one new token per row per step. Each row samples with its own settings (temperature, top-p, and a
``torch.Generator`` seeded from its own seed) and stops on its own: a stop token id, a stop string,
its ``max_tokens``, or a cancel by its client; a finished row leaves the batch
(``KVCache.keep_rows``) and the others go on. Greedy rows get the tokens they would get alone.

Requests that arrive while a batch is decoding join it between two steps: the newcomers are prefilled
on their own, then their KV cache is joined to the batch's, left-padded to the longer (``_join_caches``).
A model without ``helpers.model``'s decoder protocol (``GPTModel`` and ``ModernModel`` have it), which
takes no attention mask to hide padding behind, decodes its rows side by side, one forward pass per
row and step (as ``generate_batch`` answers them one at a time).
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
from helpers.model import KVCache, is_decoder

__all__ = ["BatchWorker", "Job", "Sampling", "WorkerUnavailable"]

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

    def step(self, model: torch.nn.Module, context: int) -> None:
        """Drop cancelled rows, give every other row its next token, and drop the rows that finished."""
        cancelled = [index for index, row in enumerate(self.rows) if row.job.cancelled]
        for index in cancelled:
            self.rows[index].job._finish("cancelled")
        self._drop(cancelled)
        if not self.rows:
            return
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
        self._drop([index for index, (row, token) in enumerate(zip(self.rows, tokens)) if row.push(token)])

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

    def join(self, other: _Group) -> None:
        """Take in ``other``'s rows (a decoder's; both groups past a step): padded to the longer, caches joined.

        The rows keep their cached keys and values; padding at the front of the shorter group is
        masked, and positions count real tokens only, so every row goes on as it would have alone.
        """
        width = max(self.idx.shape[1], other.idx.shape[1])
        self.idx = torch.cat([_pad_left(self.idx, width, self.pad_id), _pad_left(other.idx, width, self.pad_id)])
        self.mask = torch.cat([_pad_left(self.mask, width, False), _pad_left(other.mask, width, False)])
        self.padded = not bool(self.mask.all())
        _join_caches(self.cache, other.cache)
        self.rows += other.rows


def _pad_left(tensor: torch.Tensor, width: int, value: int | bool) -> torch.Tensor:
    """``tensor`` ``(rows, n)`` with ``value`` columns in front, to ``(rows, width)``."""
    return torch.cat([tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value), tensor], dim=1)


def _join_caches(cache: KVCache, other: KVCache) -> None:
    """Append ``other``'s rows to ``cache``, both right-aligned at the longer length; the shorter is masked in front."""
    length = max(cache.length, other.length)
    masks = [_pad_left(part.key_mask if part.key_mask is not None else
                       torch.ones(part.layers[0].keys.shape[0], part.length, dtype=torch.bool,
                                  device=part.layers[0].keys.device), length, False) for part in (cache, other)]
    for layer, joining in zip(cache.layers, other.layers):
        rows, room = layer.keys.shape[0], max(layer.keys.shape[2], joining.keys.shape[2])  # a growing cache's room
        keys = layer.keys.new_zeros((rows + joining.keys.shape[0], layer.keys.shape[1], room, layer.keys.shape[3]))
        values = torch.zeros_like(keys)
        for buffer, mine, theirs in ((keys, layer.keys, joining.keys), (values, layer.values, joining.values)):
            buffer[:rows, :, length - layer.length:length] = mine[:, :, :layer.length]
            buffer[rows:, :, length - joining.length:length] = theirs[:, :, :joining.length]
        layer.keys, layer.values, layer.length = keys, values, length
    cache.key_mask = torch.cat(masks)


class BatchWorker:
    """The thread that answers ``Job``s for one ``ChatModel``, up to ``max_batch`` of them at a time.

    When idle, the first request waits up to ``window_s`` for others to share its batch. Requests that
    arrive while a batch decodes join it between two steps (once the oldest has waited ``window_s``, or
    as many wait as there is room for): each is prefilled on its own, then its KV cache joins the batch's.
    At most ``max_queue`` requests wait (``submit`` refuses more). ``snapshot`` reports what the worker
    is doing; ``history`` holds the last finished jobs (newest last).
    """

    def __init__(self, chat_model: ChatModel, *, max_batch: int = 16, window_s: float = 0.01, max_queue: int = 256):
        self.chat_model = chat_model
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.history: collections.deque[Job] = collections.deque(maxlen=64)
        self._waiting: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._lock = threading.Lock()  # guards _stats
        self._stats = {"batches": 0, "joined": 0, "answered": 0, "cancelled": 0, "failed": 0, "largest_batch": 0,
                       "active": 0}
        self._thread = threading.Thread(target=self._loop, name="generation worker", daemon=True)
        parameter = next(chat_model.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def start(self) -> BatchWorker:
        """Start the thread (the model is put in eval mode); return the worker."""
        self.chat_model.model.eval()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after the step it is taking; requests decoding or waiting fail ("shutting down")."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        """Queue ``job`` for the worker and return it; ``WorkerUnavailable`` if the queue is full or it has stopped."""
        with self._changed:
            if self._stopping or not self.alive:
                raise WorkerUnavailable("the generation worker is not running; restart the server")
            if len(self._waiting) >= self.max_queue:
                raise WorkerUnavailable(f"{self.max_queue} requests are already waiting; try again shortly")
            self._waiting.append(job)
            self._changed.notify()
        return job

    def snapshot(self) -> dict[str, int]:
        """The worker's counts, by name, now and so far.

        Now: ``queued`` (waiting) and ``active`` (decoding) requests. So far: ``batches`` started from idle,
        requests that ``joined`` a running batch, ``answered``, ``cancelled``, ``failed``, and the
        ``largest_batch`` (most rows decoded at once).
        """
        with self._lock:
            stats = dict(self._stats)
        return {**stats, "queued": len(self._waiting)}

    def _count(self, **changes: int) -> None:
        with self._lock:
            for key, value in changes.items():
                if key == "active":
                    self._stats["active"] = value
                    self._stats["largest_batch"] = max(self._stats["largest_batch"], value)
                else:
                    self._stats[key] += value

    def _loop(self) -> None:
        with torch.inference_mode():
            while (jobs := self._collect()) is not None:
                try:
                    self._answer(jobs)  # jobs grows as requests join
                except Exception as error:  # a failing batch fails its requests, never the worker
                    message = f"generation failed: {type(error).__name__}: {error}"
                    for job in jobs:
                        if not job.done.is_set():
                            job._finish("error", message)
                finally:
                    reasons = collections.Counter(job.finish_reason for job in jobs)
                    self._count(active=0, answered=reasons["stop"] + reasons["length"],
                                cancelled=reasons["cancelled"], failed=reasons["error"])
                    self.history.extend(jobs)
        with self._changed:  # stopped: whoever still waits hears so
            while self._waiting:
                self._waiting.popleft()._finish("error", "the server is shutting down")

    def _collect(self) -> list[Job] | None:
        """The next batch, once idle: the first waiting job and those arriving within its window; None once stopped."""
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            deadline = self._waiting[0].submitted + self.window_s
            while len(self._waiting) < self.max_batch and not self._stopping and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]

    def _joining(self, room: int) -> list[Job]:
        """The waiting jobs that join the running batch now (up to ``room``), without waiting for any."""
        with self._changed:
            if room <= 0 or not self._waiting or self._stopping:
                return []
            if len(self._waiting) < room and time.monotonic() < self._waiting[0].submitted + self.window_s:
                return []  # let a few more gather: each joining is one prefill
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _answer(self, jobs: list[Job]) -> None:
        """Decode ``jobs``, and those that join them, step by step until every one has finished."""
        model, context = self.chat_model.model, self.chat_model.context_length
        pad_id = min(self.chat_model.stop_ids, default=0)  # any id will do: padding is masked
        batched = is_decoder(model)  # others take no attention mask to hide padding behind: a row each
        self._count(batches=1)
        groups: list[_Group] = []
        newcomers = list(jobs)
        while groups or newcomers:
            if self._stopping:
                for job in jobs:
                    if not job.done.is_set():
                        job._finish("error", "the server is shutting down")
                return
            rows = [_Row(job, self.chat_model, self.device) for job in newcomers]
            groups += [_Group(rows, pad_id, self.device)] if batched and rows else \
                [_Group([row], pad_id, self.device) for row in rows]
            self._count(active=sum(len(group.rows) for group in groups))
            for group in groups:  # a newcomer's first step is its prefill
                group.step(model, context)
            groups = [group for group in groups if group.rows]
            if batched and len(groups) > 1:
                for group in groups[1:]:
                    groups[0].join(group)
                groups = groups[:1]
            newcomers = self._joining(self.max_batch - sum(len(group.rows) for group in groups))
            jobs += newcomers
            if newcomers:  # joining the rows decoding now; or, if the last just finished, a batch of their own
                self._count(**({"joined": len(newcomers)} if groups else {"batches": 1}))
