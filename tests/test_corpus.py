"""The token cache of ``python -m helpers.pretrain``: exact tokens however the text is cut, checked on every use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.corpus import _text_pieces, load_token_cache

ENCODING = tiktoken.get_encoding("gpt2")


def _whole_file_tokens(*texts: str) -> list[int]:
    """The reference: tiktoken over each document in one piece, each followed by <|endoftext|>."""
    return [token for text in texts for token in (*ENCODING.encode_ordinary(text), ENCODING.eot_token)]


@pytest.fixture
def verdict(tmp_path) -> Path:
    from helpers.data import read_text

    path = tmp_path / "verdict.txt"
    path.write_text(read_text("the-verdict"), encoding="utf-8")
    return path


def test_cache_with_a_small_chunk_holds_the_tokens_of_the_whole_file(verdict, tmp_path):
    # given The Verdict, encoded by the cache 300 characters at a time (line breaks every few lines)
    text = verdict.read_text(encoding="utf-8")
    assert len(list(_text_pieces(text, 300))) > 50

    # when the token cache is built
    tokens = load_token_cache([verdict], tmp_path / "cache", progress=False, chunk_chars=300)

    # then it holds exactly tiktoken's tokens of the whole file, then <|endoftext|>
    assert tokens.tolist() == _whole_file_tokens(text)


_FRAGMENTS = ["word", "Word", " ", "  ", "\n", "\n\n", "\n  ", "\t", ".", "...", "'s", "'ll", "42", "7", "é", "中文",
              "\u00a0", "\r\n", "!?", "-"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60), st.integers(min_value=1, max_value=25))
def test_pieces_encode_to_the_tokens_of_the_whole_text(fragments, chunk_chars):
    # given text built from words, numbers, punctuation and runs of spaces and line breaks
    text = "".join(fragments)

    # when it is cut into pieces of about chunk_chars and each piece is encoded alone
    pieces = list(_text_pieces(text, chunk_chars))

    # then the pieces rebuild the text, and their tokens are those of the whole text
    assert "".join(pieces) == text
    assert [t for piece in pieces for t in ENCODING.encode_ordinary(piece)] == ENCODING.encode_ordinary(text)


def _cache_files(cache: Path) -> tuple[Path, Path]:
    (tokens,) = cache.glob("*.uint16")
    return tokens, tokens.with_suffix(".json")


def _damage_truncate(tokens: Path, manifest: Path) -> None:
    tokens.write_bytes(tokens.read_bytes()[:-2])


def _damage_shift(tokens: Path, manifest: Path) -> None:  # right size, but the documents do not end where claimed
    data = tokens.read_bytes()
    tokens.write_bytes(data[2:] + data[:2])


def _damage_manifest(tokens: Path, manifest: Path) -> None:
    manifest.unlink()


def _damage_counts(tokens: Path, manifest: Path) -> None:
    claims = json.loads(manifest.read_text())
    claims["doc_tokens"][0] += 1
    manifest.write_text(json.dumps(claims))


def _damage_same_size(tokens: Path, manifest: Path) -> None:  # size and separators intact, a token past the vocab
    data = bytearray(tokens.read_bytes())
    data[2:4] = b"\xff\xff"  # the second token of the first document becomes 65535
    tokens.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_shift, _damage_manifest, _damage_counts,
                                    _damage_same_size])
def test_a_cache_that_disagrees_with_its_manifest_is_rebuilt(tmp_path, damage):
    # given two documents and their built cache
    texts = ["The first document.\n\nIt has two paragraphs.", "A second, shorter one."]
    files = []
    for index, text in enumerate(texts):
        files.append(tmp_path / f"doc{index}.txt")
        files[-1].write_text(text, encoding="utf-8")
    load_token_cache(files, tmp_path / "cache", progress=False)

    # when the cache or its manifest is damaged, and the cache is asked for again
    damage(*_cache_files(tmp_path / "cache"))
    tokens = load_token_cache(files, tmp_path / "cache", progress=False)

    # then it was rebuilt: the tokens are tiktoken's again, and the manifest matches them
    assert tokens.tolist() == _whole_file_tokens(*texts)
    manifest = json.loads(_cache_files(tmp_path / "cache")[1].read_text())
    assert manifest["doc_tokens"] == [len(ENCODING.encode_ordinary(text)) + 1 for text in texts]


def test_an_edited_file_gets_a_new_cache(tmp_path):
    # given a cached file, then edited
    path = tmp_path / "doc.txt"
    path.write_text("before the edit", encoding="utf-8")
    load_token_cache([path], tmp_path / "cache", progress=False)
    path.write_text("after the edit, longer", encoding="utf-8")

    # when / then the cache holds the edited text's tokens
    assert load_token_cache([path], tmp_path / "cache", progress=False).tolist() == _whole_file_tokens(
        "after the edit, longer")


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    # given a cache folder holding the temporary file of a writer that has exited
    path = tmp_path / "doc.txt"
    path.write_text("some text", encoding="utf-8")
    load_token_cache([path], tmp_path / "cache", progress=False)
    tokens, _ = _cache_files(tmp_path / "cache")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tokens.with_name(f".{tokens.name}.{int(dead.stdout)}.tmp")
    stale.write_bytes(b"half a cache")

    # when the cache is used again
    load_token_cache([path], tmp_path / "cache", progress=False)

    # then the temporary file is gone, and the cache is intact
    assert not stale.exists()
    assert np.fromfile(tokens, dtype=np.uint16).tolist() == _whole_file_tokens("some text")
