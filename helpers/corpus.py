"""A tokenized training corpus on disk: text files -> one uint16 memmap, built once and cached.

Used by ``python -m helpers.pretrain``. The cache lives in ``--cache-dir`` (default
``$LLM_CACHE_DIR`` or ``~/.cache/llm-from-scratch/tokens``), never beside the data, which may be
read-only; its name is a hash of the tokenizer and of every file's contents, so edited data is
tokenized again and unchanged data never is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from helpers.runtime import write_atomically

__all__ = ["default_cache_dir", "expand_data_paths", "load_token_cache", "token_batch"]

_TOKENIZER = "gpt2"  # GPT-2's BPE; every id fits in uint16 (50,257 < 65,536)
_CHUNK_CHARS = 1 << 20  # tokenize about 1 MB of text at a time, cut at a line break


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


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256(_TOKENIZER.encode())
    for path in files:
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:24]


def _text_chunks(text: str):
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def load_token_cache(files: list[Path], cache_dir: Path | None = None, progress: bool = True) -> np.memmap:
    """Return the tokens of ``files`` (each followed by ``<|endoftext|>``) as a read-only uint16 memmap.

    Tokenizes on the first call for this set of files and writes the cache atomically.
    """
    from helpers.tokenizers import gpt2_tokenizer

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{_fingerprint(files)}.uint16"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = gpt2_tokenizer()
        total_bytes = sum(path.stat().st_size for path in files)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                                              disable=not progress) as bar:
                for path in files:
                    text = path.read_text(encoding="utf-8", errors="replace")
                    for chunk in _text_chunks(text):
                        out.write(np.asarray(tokenizer.encode_ordinary(chunk), dtype=np.uint16).tobytes())
                        bar.update(len(chunk.encode("utf-8", errors="replace")))
                    out.write(np.asarray([tokenizer.eot_token], dtype=np.uint16).tobytes())

        write_atomically(target, write)
        manifest = {"tokenizer": _TOKENIZER, "files": [str(p) for p in files],
                    "tokens": target.stat().st_size // 2}
        target.with_suffix(".json").write_text(json.dumps(manifest, indent=1))
    return np.memmap(target, dtype=np.uint16, mode="r")


def token_batch(tokens: np.ndarray, offsets: Iterable[int], context_length: int):
    """Stack input/target windows starting at ``offsets``: two ``(len(offsets), context_length)`` int64 tensors."""
    import torch

    rows = np.stack([np.asarray(tokens[o : o + context_length + 1], dtype=np.int64) for o in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]
