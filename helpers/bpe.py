"""Byte-level byte-pair encoding from scratch (Part 02): pre-tokenizing, learning merges, applying them.

``BPETokenizer`` splits text into pieces with one or more regular expressions, turns each piece's
UTF-8 bytes into one token each, and merges neighbours in the order the merges were learned. With
OpenAI's GPT-2 tables it encodes exactly as tiktoken; with SmolLM2's (``helpers.gguf``) exactly as
Hugging Face ``tokenizers``. Reading and checking the tables' files is ``helpers.bpe_files``' job.
"""

from __future__ import annotations

import heapq
import json
import numbers
import os
import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import regex

from helpers.bpe_files import (
    SAVED_FORMAT,
    BPETables,
    check_id_table,
    check_saved_document,
    printable,
    read_gpt2_files,
    read_json,
    tables_from_strings,
)
from helpers.runtime import write_atomically

__all__ = ["DIGITS_SPLIT_PATTERN", "GPT2_SPLIT_PATTERN", "SMOLLM_SPLIT_PATTERNS", "BPETokenizer", "apply_merges",
           "learn_merges", "split_text"]

# GPT-2's pre-tokenizer (as tiktoken writes it): contractions, letters, digits, other symbols,
# each optionally led by one space; whitespace runs keep their last space for the next word.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DIGITS_SPLIT_PATTERN = r"\p{N}"
"""Every digit a piece of its own (Hugging Face's ``Digits(individual_digits=True)``)."""
SMOLLM_SPLIT_PATTERNS = (DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN)
"""SmolLM2's pre-tokenizer (llama.cpp's ``smollm``): digits apart first, then GPT-2's pattern on the rest."""

_CACHE_LIMIT = 200_000

Pattern = str | Sequence[str]


# --------------------------------------------------------------------------------------------
# pre-tokenizing


def _compile_patterns(pattern: Pattern, where: str) -> tuple[regex.Pattern, ...]:
    patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: the pattern must be a regular expression or a non-empty list of them, "
                         f"got {pattern!r}")
    try:
        return tuple(regex.compile(p) for p in patterns)
    except regex.error as error:
        raise ValueError(f"{where}: the pattern {pattern!r} is not a valid regular expression ({error})") from error


def _split_once(compiled: regex.Pattern, text: str) -> list[str]:
    """The matches of ``compiled`` in ``text`` and, as pieces of their own, the stretches between them."""
    pieces = compiled.findall(text)
    if sum(map(len, pieces)) == len(text):  # the matches cover the text (GPT-2's pattern always does)
        return pieces
    pieces, end = [], 0
    for match in compiled.finditer(text):
        if match.start() > end:
            pieces.append(text[end:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        end = match.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def split_text(text: str, patterns: Sequence[regex.Pattern]) -> list[str]:
    """Pre-tokenize ``text``: each compiled pattern in turn splits every piece the one before left.

    A pattern's matches become pieces, and so does any text between them, so nothing is lost:
    ``"".join(split_text(text, patterns)) == text``. Merges never cross from one piece to the next.
    """
    pieces = _split_once(patterns[0], text)
    for compiled in patterns[1:]:
        pieces = [part for piece in pieces for part in _split_once(compiled, piece)]
    return pieces


def _split_on_specials(text: str, specials: Collection[str]) -> list[str]:
    """Split ``text`` around occurrences of ``specials``, keeping them as their own segments."""
    if not specials:
        return [text] if text else []
    alternatives = "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True))
    return [segment for segment in re.split(f"({alternatives})", text) if segment]


# --------------------------------------------------------------------------------------------
# merges


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` (left to right) with ``new_id``."""
    merged, i, first, second = [], 0, pair[0], pair[1]
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == first and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def apply_merges(ids: list[int], ranks: dict[tuple[int, int], int], merges: dict[tuple[int, int], int]) -> list[int]:
    """Merge adjacent tokens of ``ids`` as BPE does: always the pair learned first, leftmost first.

    The tokens form a linked list (``after[i]`` and ``before[i]`` are the neighbours of position
    ``i``) and the mergeable pairs wait in a heap ordered by (rank, position), so a chunk of n bytes
    takes O(n log n) steps, not O(n^2). A merge keeps the left position and unlinks the right one;
    heap entries whose pair has changed since they were pushed are skipped when they come up.
    """
    n = len(ids)
    if n < 2:
        return ids
    tokens = list(ids)  # tokens[i] is -1 once position i has been merged into its left neighbour
    after = [*range(1, n), -1]
    before = list(range(-1, n - 1))
    # a heap entry is the single int rank * n + position: it sorts by rank, then position, and is cheap
    heap = [ranks[pair] * n + i for i, pair in enumerate(zip(ids, ids[1:])) if pair in ranks]
    heapq.heapify(heap)

    def push(left: int, right: int) -> None:
        rank = ranks.get((tokens[left], tokens[right]))
        if rank is not None:
            heapq.heappush(heap, rank * n + left)

    while heap:
        rank, left = divmod(heapq.heappop(heap), n)
        right = after[left]
        if tokens[left] < 0 or right < 0 or ranks.get((tokens[left], tokens[right])) != rank:
            continue  # stale: one of the two tokens has been merged since this entry was pushed
        tokens[left] = merges[(tokens[left], tokens[right])]
        tokens[right] = -1
        after[left] = after[right]
        if after[left] >= 0:
            before[after[left]] = left
            push(left, after[left])
        if before[left] >= 0:
            push(before[left], left)
    return [token for token in tokens if token >= 0]


def _check_training_settings(vocab_size: int, special_tokens: list[str]) -> None:
    """Refuse a vocabulary size that is not an integer or leaves no room for the bytes and specials."""
    if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least 256 bytes + {len(special_tokens)} "
                         f"special tokens = {smallest}")
    bad = [token for token in special_tokens if not isinstance(token, str) or not token]
    if bad:
        raise ValueError(f"special_tokens must be non-empty strings, got {bad}")


def learn_merges(chunk_counts: Counter[bytes], n_merges: int,
                 progress: bool = False) -> tuple[dict[int, bytes], dict[tuple[int, int], int]]:
    """Learn up to ``n_merges`` merges from chunks and their counts; return the vocabulary and the merges.

    Pair counts are kept up to date incrementally: a merge recounts only the chunks that hold its pair.
    """
    from tqdm import tqdm

    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}  # pair -> the words that hold it
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[index]
            where.setdefault(pair, set()).add(index)

    vocab = {byte: bytes([byte]) for byte in range(256)}
    merges: dict[tuple[int, int], int] = {}
    for step in tqdm(range(n_merges), desc="BPE merges", disable=not progress):
        if not pair_counts:
            break
        # the most frequent pair; ties go to the smallest (left id, right id), so training is reproducible
        best, count = max(pair_counts.items(), key=lambda item: (item[1], -item[0][0], -item[0][1]))
        if count < 2:
            break
        new_id = 256 + step
        merges[best] = new_id
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        for index in where.pop(best, ()):
            word, freq = words[index], freqs[index]
            for pair in zip(word, word[1:]):  # forget the word's old pairs...
                pair_counts[pair] -= freq
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            word = words[index] = _merge_pair(word, best, new_id)
            for pair in zip(word, word[1:]):  # ...and count its new ones
                pair_counts[pair] += freq
                where.setdefault(pair, set()).add(index)
    return vocab, merges


# --------------------------------------------------------------------------------------------
# the tokenizer


class BPETokenizer:
    """Byte-level byte-pair encoding, written from scratch.

    Text is split into pieces by ``pattern`` (GPT-2's regular expression by default; a list of
    expressions applies each in turn, as ``SMOLLM_SPLIT_PATTERNS`` does); each piece's UTF-8 bytes
    start as one token each and the learned merges are applied in the order they were learned.
    Any string round-trips, ``decode(encode(text)) == text``, unless the vocabulary lacks some bytes
    (SmolLM2's lacks 21 that UTF-8 text rarely holds): a run of those becomes the unknown token.

    Build one with ``BPETokenizer().train(...)``, ``BPETokenizer.from_gpt2(...)``,
    ``BPETokenizer.from_tables(...)`` or ``BPETokenizer.load(path)``.
    """

    def __init__(self, pattern: Pattern = GPT2_SPLIT_PATTERN):
        self.pattern = pattern if isinstance(pattern, str) else tuple(pattern)
        self._set_state(BPETables(vocab={byte: bytes([byte]) for byte in range(256)}, merges={}, special_tokens={}))

    # -- state -------------------------------------------------------------------------------

    def _set_state(self, tables: BPETables) -> None:
        self.vocab = tables.vocab  # id -> bytes, for every ordinary token
        self.merges = tables.merges  # (left id, right id) -> merged id, in the order learned
        self.special_tokens = tables.special_tokens  # text -> id
        self.unk_id = tables.unk_id  # what a byte without a token becomes (None: every byte has one)
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        token_ids = {token: index for index, token in self.vocab.items()}
        missing = [byte for byte in range(256) if bytes([byte]) not in token_ids]
        if missing and self.unk_id is None:
            raise ValueError(f"the vocabulary lacks single-byte tokens for bytes {missing[:8]}...")
        self._byte_ids = [token_ids.get(bytes([byte]), self.unk_id) for byte in range(256)]
        self._special_by_id = {index: token.encode("utf-8") for token, index in self.special_tokens.items()}
        self._compiled = _compile_patterns(self.pattern, "BPETokenizer")
        self._cache: dict[bytes, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        """Number of token ids (ordinary and special), as tiktoken names it."""
        return max([*self.vocab, *self._special_by_id]) + 1

    def __repr__(self) -> str:
        return f"BPETokenizer(n_vocab={self.n_vocab}, merges={len(self.merges)}, special={list(self.special_tokens)})"

    # -- training ----------------------------------------------------------------------------

    def train(self, text: str, vocab_size: int, special_tokens: Sequence[str] = (), *,
              progress: bool = False) -> BPETokenizer:
        """Learn merges from ``text`` until the vocabulary has ``vocab_size`` ids; return ``self``.

        The 256 single bytes come first, then one id per merge, then ``special_tokens``. Training
        stops early if no pair of tokens occurs twice anywhere (there is nothing left to learn).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        _check_training_settings(vocab_size, special_tokens)
        chunk_counts: Counter[bytes] = Counter()
        for segment in _split_on_specials(text, special_tokens):
            if segment not in special_tokens:
                chunk_counts.update(piece.encode("utf-8") for piece in split_text(segment, self._compiled))
        vocab, merges = learn_merges(chunk_counts, vocab_size - 256 - len(special_tokens), progress)
        next_id = 256 + len(merges)
        specials = {token: next_id + offset for offset, token in enumerate(special_tokens)}
        self._set_state(BPETables(vocab, merges, specials))
        return self

    # -- encoding ----------------------------------------------------------------------------

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = [self._byte_ids[byte] for byte in chunk]
        if self.unk_id is not None and self.unk_id in ids:  # a run of unknown bytes is one unknown token
            ids = [index for i, index in enumerate(ids) if not (index == self.unk_id and i and ids[i - 1] == index)]
        ids = apply_merges(ids, self._ranks, self.merges)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as ordinary text."""
        ids: list[int] = []
        for piece in split_text(text, self._compiled):
            ids.extend(self._encode_chunk(piece.encode("utf-8", errors="surrogatepass")))
        return ids

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Return the token ids of ``text``.

        Special tokens follow tiktoken's rules: those in ``allowed_special`` ("all" or a set) become
        their ids; any other special token found in the text raises ``ValueError`` unless
        ``disallowed_special=()``, in which case it is encoded as ordinary text.
        """
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names tokens this tokenizer does not have: {sorted(unknown)}; "
                             f"it has {sorted(self.special_tokens)}")
        disallowed = (set(self.special_tokens) - allowed) if disallowed_special == "all" else set(disallowed_special)
        for token in disallowed:
            if token in text:
                raise ValueError(
                    f"the text contains the special token {token!r}; pass allowed_special={{{token!r}}} to "
                    "encode it as a special token, or disallowed_special=() to encode it as ordinary text"
                )
        ids: list[int] = []
        for segment in _split_on_specials(text, allowed):
            if segment in allowed:
                ids.append(self.special_tokens[segment])
            else:
                ids.extend(self.encode_ordinary(segment))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Return the raw bytes of ``ids`` (a token may hold part of a UTF-8 character)."""
        pieces = []
        for index in ids:
            index = int(index)
            piece = self.vocab.get(index)
            if piece is None:
                piece = self._special_by_id.get(index)
                if piece is None:
                    raise ValueError(f"token id {index} is not in the vocabulary (n_vocab={self.n_vocab})")
            pieces.append(piece)
        return b"".join(pieces)

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        raw = self.decode_bytes(ids)
        try:
            return raw.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as readable JSON (tokens in GPT-2's printable byte alphabet), atomically."""
        path = Path(path)
        by_text = {printable(token): index for index, token in sorted(self.vocab.items())}
        if len(by_text) != len(self.vocab):
            raise ValueError(f"cannot save to {path}: two token ids have the same bytes, and the file maps each "
                             "token's text to one id")
        unk = next((token for token, index in self.special_tokens.items() if index == self.unk_id), None)
        document = {
            "format": SAVED_FORMAT,
            "version": 1,
            "pattern": self.pattern if isinstance(self.pattern, str) else list(self.pattern),
            "vocab": by_text,
            "merges": [f"{printable(self.vocab[a])} {printable(self.vocab[b])}" for a, b in self.merges],
            "special_tokens": self.special_tokens,
            "unk_token": unk,
        }
        text = json.dumps(document, ensure_ascii=False, indent=1)
        return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer written by ``save``.

        A file that is not one, lacks a key, has a value of the wrong type or contradicts itself
        (merges and vocabulary sizes, ids, tokens) raises ``ValueError`` naming the file.
        """
        path = Path(path)
        document = read_json(path, "tokenizer file")
        check_saved_document(document, path)
        return cls.from_tables(document["vocab"], document["merges"], document["special_tokens"],
                               pattern=document["pattern"], unk_token=document.get("unk_token"), source=str(path))

    @classmethod
    def from_gpt2(cls, encoder_json: str | os.PathLike | None = None,
                  vocab_bpe: str | os.PathLike | None = None) -> BPETokenizer:
        """Load OpenAI's GPT-2 files (``encoder.json``, ``vocab.bpe``); it then encodes exactly as tiktoken.

        Without paths, the files are fetched through ``helpers.data.fetch``. Files that are not what
        they claim (unreadable, wrong types, merges that disagree with the vocabulary) raise
        ``ValueError`` naming the file.
        """
        from helpers.data import fetch

        encoder_path = Path(encoder_json) if encoder_json is not None else fetch("gpt2-encoder")
        vocab_path = Path(vocab_bpe) if vocab_bpe is not None else fetch("gpt2-vocab")
        ordinary, merges, specials = read_gpt2_files(encoder_path, vocab_path)
        return cls.from_tables(ordinary, merges, specials, source=str(encoder_path), merges_source=str(vocab_path))

    @classmethod
    def from_tables(cls, vocab: dict[str, int], merges: Sequence[str | Sequence[str]],
                    special_tokens: dict[str, int] | None = None, *, pattern: Pattern = GPT2_SPLIT_PATTERN,
                    unk_token: str | None = None, source: str = "the token tables",
                    merges_source: str | None = None) -> BPETokenizer:
        """A tokenizer from token tables written in GPT-2's printable byte alphabet (``"Ġthe"`` is ``b" the"``).

        ``vocab`` maps each ordinary token to its id; ``merges`` are ``"left right"`` strings (or pairs)
        in rank order; ``special_tokens`` map text to id. ``unk_token``, a special token, is what a byte
        without a token of its own becomes. Tables that contradict themselves raise ``ValueError``
        naming ``source`` (and ``merges_source`` for the merges, when they come from another file).
        """
        check_id_table(vocab, source, "the vocabulary")
        check_id_table(special_tokens or {}, source, "the special tokens")
        _compile_patterns(pattern, source)  # a bad pattern is refused before the tables are built
        split = [line.split(" ") if isinstance(line, str) else list(line) for line in merges]
        tables = tables_from_strings(vocab, split, dict(special_tokens or {}), unk_token=unk_token,
                                     vocab_source=source, merges_source=merges_source or source)
        tokenizer = cls(pattern)
        tokenizer._set_state(tables)
        return tokenizer
