"""Tokenizers of Part 02: word-level (V1, V2), GPT-2's BPE via tiktoken, and byte-level BPE from scratch.

The byte-level BPE lives in ``helpers.bpe`` (the algorithm) and ``helpers.bpe_files`` (its files); its
public names are importable from here too, as Part 02 promotes them.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Iterable

from helpers.bpe import DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, SMOLLM_SPLIT_PATTERNS, BPETokenizer
from helpers.bpe_files import bytes_to_unicode

__all__ = [
    "BPETokenizer",
    "DIGITS_SPLIT_PATTERN",
    "GPT2_SPLIT_PATTERN",
    "SMOLLM_SPLIT_PATTERNS",
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
