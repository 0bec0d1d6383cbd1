"""Tokenizers of Part 02: word-level (V1, V2), GPT-2's BPE via tiktoken, and byte-level BPE from scratch."""

from __future__ import annotations

import functools
import heapq
import inspect
import json
import numbers
import os
import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import regex

from helpers.runtime import write_atomically

__all__ = [
    "BPETokenizer",
    "GPT2_SPLIT_PATTERN",
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "UnknownWordError",
    "build_vocab",
    "bytes_to_unicode",
    "encode_user_text",
    "encode_with_endoftext",
    "gpt2_tokenizer",
    "split_words",
]

ENDOFTEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"

# --------------------------------------------------------------------------------------------
# Word-level tokenizers
# --------------------------------------------------------------------------------------------

_WORD_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?_!"()\'])')


class UnknownWordError(KeyError, ValueError):
    """A word-level tokenizer met a word that is not in its vocabulary."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def split_words(text: str) -> list[str]:
    """Split text into words and punctuation the way the word-level tokenizers do (no whitespace)."""
    return [piece.strip() for piece in _WORD_SPLIT.split(text) if piece.strip()]


def build_vocab(text: str, special_tokens: Iterable[str] = ()) -> dict[str, int]:
    """Map every distinct word of ``text`` (sorted) to an id, then append ``special_tokens``."""
    words = sorted(set(split_words(text)))
    for token in special_tokens:
        if token not in words:
            words.append(token)
    return {word: index for index, word in enumerate(words)}


def _join_words(words: Iterable[str]) -> str:
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words))


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary; an unknown word is an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {index: word for word, index in self.str_to_int.items()}

    def encode(self, text: str) -> list[int]:
        """Return the ids of the words and punctuation of ``text``."""
        ids = []
        for word in split_words(text):
            if word not in self.str_to_int:
                raise UnknownWordError(
                    f"{word!r} is not in the vocabulary of {len(self.str_to_int)} words; "
                    "SimpleTokenizerV2 maps unknown words to <|unk|> instead"
                )
            ids.append(self.str_to_int[word])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Join the words of ``ids`` with spaces, with no space before punctuation."""
        words = []
        for index in ids:
            index = int(index)
            if index not in self.int_to_str:
                raise ValueError(f"token id {index} is not in the vocabulary (ids 0..{len(self.int_to_str) - 1})")
            words.append(self.int_to_str[index])
        return _join_words(words)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """Word-level tokenizer that maps unknown words to ``<|unk|>`` and knows ``<|endoftext|>``.

    If ``vocab`` lacks either special token, it is appended with the next free id.
    """

    def __init__(self, vocab: dict[str, int]):
        vocab = dict(vocab)
        for token in (ENDOFTEXT, UNKNOWN):
            if token not in vocab:
                vocab[token] = max(vocab.values(), default=-1) + 1
        super().__init__(vocab)

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``; words outside the vocabulary become ``<|unk|>``."""
        unknown = self.str_to_int[UNKNOWN]
        return [self.str_to_int.get(word, unknown) for word in split_words(text)]


# --------------------------------------------------------------------------------------------
# GPT-2's tokenizer, as tiktoken ships it
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """Return tiktoken's ``gpt2`` encoding (50,257 tokens; ``<|endoftext|>`` is 50256)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # tiktoken raises whatever its HTTP client raised
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(unset)")
        raise RuntimeError(
            "tiktoken could not load GPT-2's BPE files: it downloads them on first use. "
            "Go online once, or set TIKTOKEN_CACHE_DIR to a folder that already holds them "
            f"(currently TIKTOKEN_CACHE_DIR={cache}). Cause: {error}"
        ) from error


def encode_with_endoftext(tokenizer, text: str) -> list[int]:
    """Encode ``text`` with any tokenizer here or tiktoken's, ``<|endoftext|>`` becoming its special id.

    Tokenizers whose ``encode`` has an ``allowed_special`` parameter (tiktoken, ``BPETokenizer``) are
    asked to allow ``<|endoftext|>`` where they know it; others (the word-level ones) get plain
    ``encode(text)``. Errors raised inside ``encode`` reach the caller unchanged.
    """
    if not _has_parameter(tokenizer.encode, "allowed_special"):
        return tokenizer.encode(text)
    known = getattr(tokenizer, "special_tokens_set", None)  # tiktoken
    if known is None:
        known = getattr(tokenizer, "special_tokens", None)  # BPETokenizer
    allowed = {ENDOFTEXT} if known is None or ENDOFTEXT in known else set()
    return tokenizer.encode(text, allowed_special=allowed)


def encode_user_text(tokenizer, text: str) -> list[int]:
    """Encode text a user or a dataset supplied, special-token strings included, as ordinary text.

    The one rule for text from outside (a chat line, an SMS, an instruction, an answer): a literal
    ``<|endoftext|>`` in it is just characters, never the end-of-text id, so it can neither end a
    sequence early nor raise tiktoken's "disallowed special token" error. Where the project itself
    marks an end of text it appends the id explicitly. ``text`` must be a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.60}")
    if _has_parameter(tokenizer.encode, "disallowed_special"):
        return tokenizer.encode(text, disallowed_special=())
    return tokenizer.encode(text)


def _has_parameter(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without an inspectable signature
        return False


# --------------------------------------------------------------------------------------------
# Byte-level BPE from scratch
# --------------------------------------------------------------------------------------------

# GPT-2's pre-tokenizer (as tiktoken writes it): contractions, letters, digits, other symbols,
# each optionally led by one space; whitespace runs keep their last space for the next word.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

_CACHE_LIMIT = 200_000
_FORMAT = "llm-from-scratch/byte-level-bpe"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, used in its vocabulary files.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (space, control characters, ...)
    are shifted to the code points from 256 on, so that a space is written ``Ġ``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _printable(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _from_printable(text: str, where: str) -> bytes:
    inverse = {char: byte for byte, char in bytes_to_unicode().items()}
    try:
        return bytes(inverse[char] for char in text)
    except KeyError as error:
        raise ValueError(f"{where}: {text!r} contains {error.args[0]!r}, which is not a GPT-2 byte character") from None


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


def _apply_merges(ids: list[int], ranks: dict[tuple[int, int], int],
                  merges: dict[tuple[int, int], int]) -> list[int]:
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


def _learn_merges(chunk_counts: Counter[bytes], n_merges: int,
                  progress: bool) -> tuple[dict[int, bytes], dict[tuple[int, int], int]]:
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


class BPETokenizer:
    """Byte-level byte-pair encoding, written from scratch.

    Text is split by a regular expression (GPT-2's by default) into chunks; each chunk's UTF-8 bytes
    start as one token each and the learned merges are applied in the order they were learned.
    Any string round-trips: ``decode(encode(text)) == text``.

    Build one with ``BPETokenizer().train(...)``, ``BPETokenizer.from_gpt2(...)`` or
    ``BPETokenizer.load(path)``.
    """

    def __init__(self, pattern: str = GPT2_SPLIT_PATTERN):
        self.pattern = pattern
        self._set_state(
            vocab={byte: bytes([byte]) for byte in range(256)},
            merges={},
            special_tokens={},
        )

    # -- state -------------------------------------------------------------------------------

    def _set_state(self, vocab: dict[int, bytes], merges: dict[tuple[int, int], int],
                   special_tokens: dict[str, int]) -> None:
        self.vocab = vocab  # id -> bytes, for every ordinary token
        self.merges = merges  # (left id, right id) -> merged id, in the order learned
        self.special_tokens = special_tokens  # text -> id
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        token_ids = {token: index for index, token in vocab.items()}
        missing = [byte for byte in range(256) if bytes([byte]) not in token_ids]
        if missing:
            raise ValueError(f"the vocabulary lacks single-byte tokens for bytes {missing[:8]}...")
        self._byte_ids = [token_ids[bytes([byte])] for byte in range(256)]
        self._special_by_id = {index: token.encode("utf-8") for token, index in special_tokens.items()}
        self._compiled = regex.compile(self.pattern)
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
        compiled = regex.compile(self.pattern)
        chunk_counts: Counter[bytes] = Counter()
        for segment in _split_on_specials(text, special_tokens):
            if segment not in special_tokens:
                chunk_counts.update(match.encode("utf-8") for match in compiled.findall(segment))
        vocab, merges = _learn_merges(chunk_counts, vocab_size - 256 - len(special_tokens), progress)
        next_id = 256 + len(merges)
        specials = {token: next_id + offset for offset, token in enumerate(special_tokens)}
        self._set_state(vocab, merges, specials)
        return self

    # -- encoding ----------------------------------------------------------------------------

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = _apply_merges([self._byte_ids[byte] for byte in chunk], self._ranks, self.merges)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as ordinary text."""
        ids: list[int] = []
        for match in self._compiled.findall(text):
            ids.extend(self._encode_chunk(match.encode("utf-8", errors="surrogatepass")))
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
        by_text = {_printable(token): index for index, token in sorted(self.vocab.items())}
        if len(by_text) != len(self.vocab):
            raise ValueError(f"cannot save to {path}: two token ids have the same bytes, and the file maps each "
                             "token's text to one id")
        document = {
            "format": _FORMAT,
            "version": 1,
            "pattern": self.pattern,
            "vocab": by_text,
            "merges": [f"{_printable(self.vocab[a])} {_printable(self.vocab[b])}" for a, b in self.merges],
            "special_tokens": self.special_tokens,
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
        document = _read_json(path, "tokenizer file")
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a file written by BPETokenizer.save (no format {_FORMAT!r})")
        _check_saved_fields(document, path)
        merges = [line.split(" ") for line in document["merges"]]
        return cls._from_tables(document["vocab"], merges, document["special_tokens"], document["pattern"],
                                vocab_source=path, merges_source=path)

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
        encoder = _read_json(encoder_path, "GPT-2 encoder.json")
        _check_id_table(encoder, encoder_path, "the vocabulary")
        try:
            lines = vocab_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{vocab_path}: not a readable GPT-2 vocab.bpe ({error})") from error
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        specials = {token: index for token, index in encoder.items() if token.startswith("<|") and token.endswith("|>")}
        ordinary = {token: index for token, index in encoder.items() if token not in specials}
        return cls._from_tables(ordinary, merges, specials, GPT2_SPLIT_PATTERN,
                                vocab_source=encoder_path, merges_source=vocab_path)

    @classmethod
    def _from_tables(cls, vocab: dict[str, int], merges: list[list[str]], special_tokens: dict[str, int],
                     pattern: str, *, vocab_source: Path, merges_source: Path) -> BPETokenizer:
        try:
            regex.compile(pattern)
        except regex.error as error:
            raise ValueError(f"{vocab_source}: the pattern {pattern!r} is not a valid regular expression ({error})") \
                from error
        _check_ids(vocab, special_tokens, vocab_source)
        table = {index: _from_printable(token, str(vocab_source)) for token, index in vocab.items()}
        if len(vocab) != 256 + len(merges):
            raise ValueError(
                f"{merges_source}: {len(merges):,} merges, but {vocab_source} has {len(vocab):,} ordinary tokens; "
                f"a byte-level BPE has the 256 bytes plus one token per merge = {256 + len(merges):,}"
            )
        missing = sorted(set(range(256)) - {token[0] for token in table.values() if len(token) == 1})
        if missing:
            raise ValueError(f"{vocab_source}: the vocabulary lacks the single-byte tokens of bytes {missing[:8]}")
        tokenizer = cls(pattern)
        tokenizer._set_state(table, _merge_table(merges, vocab, merges_source), dict(special_tokens))
        return tokenizer


def _read_json(path: Path, what: str) -> object:
    """The parsed JSON of ``path``; an unreadable or malformed file raises ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable {what} ({error})") from error


_SAVED_FIELDS = {"version": int, "pattern": str, "vocab": dict, "merges": list, "special_tokens": dict}


def _check_saved_fields(document: dict, path: Path) -> None:
    """Refuse a saved tokenizer that lacks a key or holds a value of the wrong type."""
    for key, kind in _SAVED_FIELDS.items():
        if key not in document:
            raise ValueError(f"{path}: the tokenizer file lacks {key!r}; it is damaged or was not written by "
                             "BPETokenizer.save")
        if not isinstance(document[key], kind) or isinstance(document[key], bool):
            raise ValueError(f"{path}: {key!r} should be a {kind.__name__}, got {type(document[key]).__name__}")
    if document["version"] != 1:
        raise ValueError(f"{path}: tokenizer file version {document['version']}, but this code reads version 1")
    _check_id_table(document["vocab"], path, "'vocab'")
    _check_id_table(document["special_tokens"], path, "'special_tokens'")
    bad = next((line for line in document["merges"] if not isinstance(line, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: every merge should be a string 'left right', got {bad!r}")


def _check_id_table(table: object, path: Path, what: str) -> None:
    """Refuse a token table that is not a mapping from non-empty strings to integer ids."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {what} should map token strings to ids, got a {type(table).__name__}")
    for token, index in table.items():
        if not token or not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"{path}: {what} maps {token!r} to {index!r}; tokens must be non-empty strings and "
                             "ids integers")


def _check_ids(vocab: dict[str, int], special_tokens: dict[str, int], source: Path) -> None:
    """Refuse ids that repeat or leave gaps: the ordinary and special ids must be exactly 0 .. n - 1."""
    ids = [*vocab.values(), *special_tokens.values()]
    repeated = sorted(index for index, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"{source}: token ids {repeated[:8]} are given to more than one token")
    outside = sorted(index for index in ids if not 0 <= index < len(ids))
    if outside:
        raise ValueError(f"{source}: token ids {outside[:8]} are out of range for {len(ids):,} tokens "
                         f"(ids must be 0..{len(ids) - 1:,})")


def _merge_table(merges: list[list[str]], ids: dict[str, int], source: Path) -> dict[tuple[int, int], int]:
    """Map each merge's (left id, right id) to its merged id, in rank order; refuse malformed merges."""
    table: dict[tuple[int, int], int] = {}
    for number, parts in enumerate(merges, start=1):
        if len(parts) != 2:
            raise ValueError(f"{source}: merge {number} should be two tokens separated by one space, got {parts}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in ids:
                raise ValueError(f"{source}: merge {number} ({left} {right}) uses {token!r}, "
                                 "which is not in the vocabulary")
        pair = (ids[left], ids[right])
        if pair in table:
            raise ValueError(f"{source}: merge {number} ({left} {right}) repeats an earlier merge")
        table[pair] = ids[left + right]
    return table


def _split_on_specials(text: str, specials: Collection[str]) -> list[str]:
    """Split ``text`` around occurrences of ``specials``, keeping them as their own segments."""
    if not specials:
        return [text] if text else []
    alternatives = "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True))
    return [segment for segment in re.split(f"({alternatives})", text) if segment]
