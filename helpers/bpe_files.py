"""The files of a byte-level BPE (Part 02): GPT-2's printable byte alphabet, reading and checking token tables.

A vocabulary file writes each token's bytes as printable characters (``bytes_to_unicode``), and a
merges file writes each merge as two such tokens separated by a space. ``BPETables`` is what
``BPETokenizer`` is built from; ``tables_from_strings`` turns the strings of any source (our JSON,
OpenAI's ``encoder.json`` + ``vocab.bpe``, a GGUF file's token list) into it, refusing tables that
contradict themselves with a ``ValueError`` naming the source.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SAVED_FORMAT", "BPETables", "bytes_to_unicode", "check_saved_document", "from_printable", "printable",
           "read_gpt2_files", "read_json", "tables_from_strings"]

SAVED_FORMAT = "llm-from-scratch/byte-level-bpe"
"""The ``format`` key of the JSON files ``BPETokenizer.save`` writes."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, used in its vocabulary files.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (space, control characters, ...)
    are shifted to the code points from 256 on, so that a space is written ``Ġ``.
    """
    printable_bytes = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable_bytes:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def printable(token: bytes) -> str:
    """``token``'s bytes in GPT-2's printable alphabet (``b" the"`` -> ``"Ġthe"``)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def from_printable(text: str, where: str) -> bytes:
    """The bytes a token written in GPT-2's printable alphabet stands for; ``where`` names the source in errors."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[char] for char in text)
    except KeyError as error:
        raise ValueError(f"{where}: {text!r} contains {error.args[0]!r}, which is not a GPT-2 byte character") from None


def read_json(path: Path, what: str) -> object:
    """The parsed JSON of ``path``; an unreadable or malformed file raises ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable {what} ({error})") from error


def read_gpt2_files(encoder_path: Path, vocab_path: Path) -> tuple[dict[str, int], list[str], dict[str, int]]:
    """The ordinary tokens, merge lines and special tokens of OpenAI's ``encoder.json`` and ``vocab.bpe``."""
    encoder = read_json(encoder_path, "GPT-2 encoder.json")
    check_id_table(encoder, encoder_path, "the vocabulary")
    try:
        lines = vocab_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{vocab_path}: not a readable GPT-2 vocab.bpe ({error})") from error
    merges = [line for line in lines if line and not line.startswith("#version")]
    specials = {token: index for token, index in encoder.items() if token.startswith("<|") and token.endswith("|>")}
    ordinary = {token: index for token, index in encoder.items() if token not in specials}
    return ordinary, merges, specials


@dataclass(frozen=True)
class BPETables:
    """Everything a byte-level BPE is: tokens, merges in rank order, special tokens, and the unknown-byte id.

    ``vocab`` maps each ordinary id to its bytes; ``merges`` maps (left id, right id) to the merged id,
    in the order the merges were learned; ``special_tokens`` maps text to id; ``unk_id`` is the id a byte
    without a token of its own becomes (None when every byte has one).
    """

    vocab: dict[int, bytes]
    merges: dict[tuple[int, int], int]
    special_tokens: dict[str, int]
    unk_id: int | None = None


def tables_from_strings(vocab: dict[str, int], merges: list[list[str]], special_tokens: dict[str, int], *,
                        unk_token: str | None = None, vocab_source: str, merges_source: str) -> BPETables:
    """Check and convert token tables written in GPT-2's printable alphabet; ``*_source`` name them in errors.

    The ordinary and special ids must be exactly 0 .. n - 1, every merge must join two known tokens into
    a known token, and the ordinary tokens must be the single bytes plus one per merge. A byte without a
    token is allowed only with ``unk_token`` (a special token), which it then becomes.
    """
    _check_ids(vocab, special_tokens, vocab_source)
    table = {index: from_printable(token, vocab_source) for token, index in vocab.items()}
    single_bytes = {token[0] for token in table.values() if len(token) == 1}
    if len(vocab) != len(single_bytes) + len(merges):
        raise ValueError(
            f"{merges_source}: {len(merges):,} merges, but {vocab_source} has {len(vocab):,} ordinary tokens; "
            f"a byte-level BPE has its {len(single_bytes)} single bytes plus one token per merge = "
            f"{len(single_bytes) + len(merges):,}"
        )
    missing = sorted(set(range(256)) - single_bytes)
    if missing and unk_token is None:
        raise ValueError(f"{vocab_source}: the vocabulary lacks the single-byte tokens of bytes {missing[:8]}; "
                         "without an unknown token they could not be encoded")
    if unk_token is not None and unk_token not in special_tokens:
        raise ValueError(f"{vocab_source}: the unknown token {unk_token!r} is not one of the special tokens "
                         f"({', '.join(list(special_tokens)[:8])}, ...)")
    unk_id = special_tokens[unk_token] if unk_token is not None else None
    return BPETables(table, _merge_table(merges, vocab, merges_source), dict(special_tokens), unk_id)


_SAVED_FIELDS = {"version": int, "pattern": (str, list), "vocab": dict, "merges": list, "special_tokens": dict}


def check_saved_document(document: object, path: Path) -> None:
    """Refuse a document that is not ``BPETokenizer.save``'s, lacks a key or holds a value of the wrong type."""
    if not isinstance(document, dict) or document.get("format") != SAVED_FORMAT:
        raise ValueError(f"{path}: not a file written by BPETokenizer.save (no format {SAVED_FORMAT!r})")
    for key, kind in _SAVED_FIELDS.items():
        if key not in document:
            raise ValueError(f"{path}: the tokenizer file lacks {key!r}; it is damaged or was not written by "
                             "BPETokenizer.save")
        if not isinstance(document[key], kind) or isinstance(document[key], bool):
            names = " or a ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{path}: {key!r} should be a {names}, got {type(document[key]).__name__}")
    if document["version"] != 1:
        raise ValueError(f"{path}: tokenizer file version {document['version']}, but this code reads version 1")
    if isinstance(document["pattern"], list) and not all(isinstance(p, str) for p in document["pattern"]):
        raise ValueError(f"{path}: 'pattern' should be a string or a list of strings, got {document['pattern']!r}")
    unk = document.get("unk_token")
    if unk is not None and not isinstance(unk, str):
        raise ValueError(f"{path}: 'unk_token' should be a string or null, got {unk!r}")
    check_id_table(document["vocab"], path, "'vocab'")
    check_id_table(document["special_tokens"], path, "'special_tokens'")
    bad = next((line for line in document["merges"] if not isinstance(line, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: every merge should be a string 'left right', got {bad!r}")


def check_id_table(table: object, path: Path | str, what: str) -> None:
    """Refuse a token table that is not a mapping from non-empty strings to integer ids."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {what} should map token strings to ids, got a {type(table).__name__}")
    for token, index in table.items():
        if not token or not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"{path}: {what} maps {token!r} to {index!r}; tokens must be non-empty strings and "
                             "ids integers")


def _check_ids(vocab: dict[str, int], special_tokens: dict[str, int], source: str) -> None:
    """Refuse ids that repeat or leave gaps: the ordinary and special ids must be exactly 0 .. n - 1."""
    ids = [*vocab.values(), *special_tokens.values()]
    repeated = sorted(index for index, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"{source}: token ids {repeated[:8]} are given to more than one token")
    outside = sorted(index for index in ids if not 0 <= index < len(ids))
    if outside:
        raise ValueError(f"{source}: token ids {outside[:8]} are out of range for {len(ids):,} tokens "
                         f"(ids must be 0..{len(ids) - 1:,})")


def _merge_table(merges: list[list[str]], ids: dict[str, int], source: str) -> dict[tuple[int, int], int]:
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
