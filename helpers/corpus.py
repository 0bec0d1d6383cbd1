"""A tokenized training corpus on disk: text files -> one uint16 memmap, built once and cached.

Used by ``python -m helpers.pretrain``. The cache lives in ``--cache-dir`` (default
``$LLM_CACHE_DIR`` or ``~/.cache/llm-from-scratch/tokens``), never beside the data, which may be
read-only; its name is a hash of the tokenizer, the cache format and every file's contents, so
edited data is tokenized again and unchanged data never is.

The tokens are exactly those of tokenizing each file whole (``encode_ordinary``), then
``<|endoftext|>``. Long files are encoded piece by piece, cut only where a letter or digit meets a
space or a line break: GPT-2's pre-tokenizer never joins such a pair (a word, number or
punctuation run ends before whitespace, and it has no look-behind), so the pieces' tokens are the
whole file's. A manifest beside the cache records what it was built from (each file's size and
sha256, the token counts per file, the sha256 of the token file itself); a cache that disagrees with
it is rebuilt, never used. The token file's hash is checked on every use (one read of the cache per
run), so damage that keeps its size (a flipped byte could be token 65535, beyond the vocabulary)
is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from helpers.data import sha256_file
from helpers.runtime import remove_stale_temporaries, write_atomically

__all__ = ["default_cache_dir", "expand_data_paths", "load_token_cache", "token_batch"]

_TOKENIZER = "gpt2"  # GPT-2's BPE; every id fits in uint16 (50,257 < 65,536)
_EOT = 50256  # <|endoftext|> in GPT-2's vocabulary
_FORMAT = 2  # 2: files tokenized whole (format 1 cut them at line breaks, which changed tokens)
_CHUNK_CHARS = 1 << 20  # encode about 1 MB of text at a time, cut where tokenization provably does not cross


def default_cache_dir() -> Path:
    """``$LLM_CACHE_DIR`` or ``~/.cache/llm-from-scratch/tokens``."""
    configured = os.environ.get("LLM_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llm-from-scratch" / "tokens"


def expand_data_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Text files named by ``paths``: files as given, folders as their ``*.txt`` files (recursively, sorted).

    A name that is not a path but a dataset of ``helpers.data`` (e.g. ``the-verdict``, ``gutenberg``)
    is fetched first.
    """
    from helpers.data import DATASETS, GROUPS, fetch

    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists() and (str(raw) in DATASETS or str(raw) in GROUPS):
            path = fetch(str(raw))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"--data {raw}: the folder holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data {raw}: no such file or folder (nor a dataset name of helpers.data)")
    return files


def _fingerprint(files: list[Path]) -> tuple[str, list[str]]:
    """The cache's name (tokenizer, format and contents of ``files``) and each file's sha256."""
    hashes = [sha256_file(path) for path in files]
    digest = hashlib.sha256(f"{_TOKENIZER}/format-{_FORMAT}".encode())
    for file_hash in hashes:
        digest.update(bytes.fromhex(file_hash))
    return digest.hexdigest()[:24], hashes


def _safe_cut(text: str, start: int, end: int) -> int:
    """The last index in (start, end] where a letter or digit is followed by a space or line break; else len(text)."""
    if end >= len(text):
        return len(text)
    cut = end
    while cut > start:
        cut = max(text.rfind(" ", start + 1, cut + 1), text.rfind("\n", start + 1, cut + 1))
        if cut <= start:
            break
        if text[cut - 1].isalnum():  # a letter or digit never shares a pre-token with the whitespace after it
            return cut
        cut -= 1
    return len(text)  # no safe cut in this window: encode the rest in one piece


def _text_pieces(text: str, chunk_chars: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = _safe_cut(text, start, start + chunk_chars)
        yield text[start:end]
        start = end


def _manifest_problem(target: Path, files: list[Path], hashes: list[str]) -> str | None:
    """Why the cache at ``target`` cannot be used (missing, or not what its manifest claims); None if it can."""
    manifest_path = target.with_suffix(".json")
    if not target.is_file() or not manifest_path.is_file():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        counts = [int(count) for count in manifest["doc_tokens"]]
        claims = (manifest["tokenizer"], manifest["format"], manifest["dtype"], manifest["sha256"], manifest["sizes"])
        tokens_sha256 = manifest["tokens_sha256"]
    except (ValueError, KeyError, TypeError) as error:
        return f"its manifest is unreadable ({error})"
    if claims != (_TOKENIZER, _FORMAT, "uint16", hashes, [path.stat().st_size for path in files]):
        return "it was built from other files, sizes, tokenizer or format"
    if target.stat().st_size != 2 * sum(counts) or manifest["tokens"] != sum(counts):
        return f"it holds {target.stat().st_size} bytes, not 2 x {sum(counts)} tokens"
    tokens = np.memmap(target, dtype=np.uint16, mode="r")
    ends = np.cumsum(counts) - 1
    if len(counts) != len(files) or (len(ends) and not np.all(tokens[ends] == _EOT)):
        return "its documents do not end with <|endoftext|> where the manifest says"
    if sha256_file(target) != tokens_sha256:
        return "its tokens do not hash to the sha256 in its manifest (the file was changed or damaged)"
    return None


def _write_tokens(tmp: Path, files: list[Path], chunk_chars: int, progress: bool) -> tuple[list[int], str]:
    """Encode ``files`` into ``tmp`` as uint16, each followed by <|endoftext|>; return each file's token count
    and the sha256 of the bytes written."""
    from helpers.tokenizers import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    counts, digest = [], hashlib.sha256()
    total_bytes = sum(path.stat().st_size for path in files)
    with open(tmp, "wb") as out, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                                      disable=not progress) as bar:
        for path in files:
            count = 0
            for piece in _text_pieces(path.read_text(encoding="utf-8", errors="replace"), chunk_chars):
                ids = np.asarray(tokenizer.encode_ordinary(piece), dtype=np.uint16).tobytes()
                out.write(ids)
                digest.update(ids)
                count += len(ids) // 2
                bar.update(len(piece.encode("utf-8", errors="replace")))
            eot = np.asarray([tokenizer.eot_token], dtype=np.uint16).tobytes()
            out.write(eot)
            digest.update(eot)
            counts.append(count + 1)
    return counts, digest.hexdigest()


def load_token_cache(files: list[Path], cache_dir: Path | None = None, progress: bool = True, *,
                     chunk_chars: int = _CHUNK_CHARS) -> np.memmap:
    """Return the tokens of ``files`` (each followed by ``<|endoftext|>``) as a read-only uint16 memmap.

    Tokenizes on the first call for this set of files, or when the cache on disk does not match its
    manifest, and writes cache and manifest atomically. ``chunk_chars`` bounds the text encoded at
    once; the tokens do not depend on it.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name, hashes = _fingerprint(files)
    target = cache_dir / f"{name}.uint16"
    for leftover in (target, target.with_suffix(".json")):  # left by a writer that was killed
        remove_stale_temporaries(leftover)
    if _manifest_problem(target, files, hashes) is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        written: list[tuple[list[int], str]] = []
        write_atomically(target, lambda tmp: written.append(_write_tokens(tmp, files, chunk_chars, progress)))
        [(counts, tokens_sha256)] = written
        manifest = {"tokenizer": _TOKENIZER, "format": _FORMAT, "dtype": "uint16", "files": [str(p) for p in files],
                    "sizes": [path.stat().st_size for path in files], "sha256": hashes, "doc_tokens": counts,
                    "tokens": sum(counts), "tokens_sha256": tokens_sha256}
        write_atomically(target.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return np.memmap(target, dtype=np.uint16, mode="r")


def token_batch(tokens: np.ndarray, offsets: Iterable[int], context_length: int):
    """Stack input/target windows starting at ``offsets``: two ``(len(offsets), context_length)`` int64 tensors."""
    import torch

    rows = np.stack([np.asarray(tokens[o : o + context_length + 1], dtype=np.int64) for o in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]
