"""The datasets of the series: where each comes from, and ``fetch(name)`` to get a verified copy.

``fetch`` looks, in order, for a verified copy under ``LLM_DATA_DIR`` (default: the project's
``data/``), then in ``LLM_DATA_MIRROR`` (a folder that already holds the files under their
registry file names), and only then downloads. Every file is checked against its sha256 before
it is put in place, so a partial or corrupt file never lands where the series looks for it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from helpers.runtime import project_root, write_atomically

__all__ = ["DATASETS", "DataError", "Dataset", "data_dir", "fetch"]

_TIMEOUT_S = 60


class DataError(RuntimeError):
    """A dataset could not be provided; the message says what failed and what to do."""


@dataclass(frozen=True)
class Dataset:
    """One file of the registry: where it comes from and what it must hash to."""

    name: str
    file: str  # path under the data folder (and under a mirror)
    urls: tuple[str, ...]
    sha256: str
    size: int  # bytes
    licence: str
    description: str
    zip_member: str | None = None  # the URLs serve a zip holding this member


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_GPT2_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_GUTENBERG = "https://raw.githubusercontent.com/gutenbergbooks"

_ENTRIES = [
    Dataset(
        "the-verdict", "the-verdict.txt",
        (f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",),
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20_479,
        "public domain (Edith Wharton, 1908)",
        "'The Verdict', a short story; the series' small running example",
    ),
    Dataset(
        "sms-spam", "sms_spam/SMSSpamCollection",
        (
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
        ),
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", 477_907,
        "CC BY 4.0 (UCI ML Repository #228; Almeida, Gomez Hidalgo & Yamakami, DocEng'11)",
        "SMS Spam Collection v.1: 5,574 messages labelled ham or spam, tab-separated",
        zip_member="SMSSpamCollection",
    ),
    Dataset(
        "instruction-data", "instruction-data.json",
        (f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",),
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203_524,
        "Apache-2.0 (Sebastian Raschka, LLMs-from-scratch)",
        "1,100 Alpaca-style instruction/input/output records",
    ),
    Dataset(
        "instruction-preference", "instruction-data-with-preference.json",
        (f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",),
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", 386_968,
        "Apache-2.0 (Sebastian Raschka, LLMs-from-scratch)",
        "the 1,100 instruction records, each with a chosen (polite) and a rejected (impolite) answer",
    ),
    Dataset(
        "tinyshakespeare", "tinyshakespeare.txt",
        ("https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
         "/data/tinyshakespeare/input.txt",),
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394,
        "public domain (Shakespeare)",
        "40,000 lines of Shakespeare's plays",
    ),
    Dataset(
        "pride-and-prejudice", "gutenberg/pg1342-pride-and-prejudice.txt",
        (f"{_GUTENBERG}/1342/041e520899f9a02af517d6cb253bc1fdfbf923e2/1342-0.txt",),
        "86dab871eec9c0cef97f4cb6313f86c6cc48f6f7809534e65cd3f1c1d486d247", 737_944,
        "public domain in the USA (Project Gutenberg #1342)",
        "Jane Austen, Pride and Prejudice",
    ),
    Dataset(
        "sherlock-holmes", "gutenberg/pg1661-adventures-of-sherlock-holmes.txt",
        (f"{_GUTENBERG}/1661/4583fe51c670727bf1edf51b41e7b67b7736224a/1661-0.txt",),
        "e21895308fe6da6919abc53e2cf77d81f914887897546153cc5d49b2eadefe50", 575_796,
        "public domain in the USA (Project Gutenberg #1661)",
        "Arthur Conan Doyle, The Adventures of Sherlock Holmes",
    ),
    Dataset(
        "house-of-mirth", "gutenberg/pg284-house-of-mirth.txt",
        (f"{_GUTENBERG}/284/98e60abc09d0af74bd223adf2846e2e2aac1bf5c/284-0.txt",),
        "75028da35a9befd2b79b832b5dd5ed3bcc2aaff73b0ffec2ef16e62e7093da29", 744_145,
        "public domain in the USA (Project Gutenberg #284)",
        "Edith Wharton, The House of Mirth",
    ),
    Dataset(
        "gpt2-encoder", "gpt2/encoder.json",
        (f"{_GPT2_BPE}/encoder.json",),
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", 1_042_301,
        "Modified MIT (c) 2019 OpenAI",
        "GPT-2's BPE vocabulary: token string -> id",
    ),
    Dataset(
        "gpt2-vocab", "gpt2/vocab.bpe",
        (f"{_GPT2_BPE}/vocab.bpe",),
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", 456_318,
        "Modified MIT (c) 2019 OpenAI",
        "GPT-2's 50,000 BPE merges, in rank order",
    ),
]

DATASETS: dict[str, Dataset] = {entry.name: entry for entry in _ENTRIES}
"""The registry, by name."""

GROUPS: dict[str, tuple[str, ...]] = {
    "gutenberg": ("pride-and-prejudice", "sherlock-holmes", "house-of-mirth"),
    "gpt2-bpe": ("gpt2-encoder", "gpt2-vocab"),
}
"""Names that stand for several datasets in one folder; ``fetch`` returns that folder."""


def data_dir() -> Path:
    """The folder where fetched files live: ``LLM_DATA_DIR``, else the project's ``data/``."""
    configured = os.environ.get("LLM_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    root = project_root()
    if root is not None:
        return root / "data"
    return Path.home() / ".cache" / "llm-from-scratch" / "data"


def _resolve(name: str) -> Dataset:
    if name in DATASETS:
        return DATASETS[name]
    by_file = {entry.file: entry for entry in _ENTRIES}
    by_file.update({Path(entry.file).name: entry for entry in _ENTRIES})
    if name in by_file:
        return by_file[name]
    known = ", ".join(sorted([*DATASETS, *GROUPS]))
    raise DataError(f"unknown dataset {name!r}; the known names are: {known}")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install(source: Path, entry: Dataset, target: Path, origin: str) -> None:
    """Copy ``source`` to ``target`` through a checked temporary file; raise on a bad checksum."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def copy_and_check(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        _verify(tmp, entry, origin)

    write_atomically(target, copy_and_check)


def _verify(path: Path, entry: Dataset, origin: str) -> None:
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise DataError(
            f"{entry.name}: the copy from {origin} has the wrong sha256\n"
            f"  expected {entry.sha256}\n  actual   {actual}\n"
            "It is corrupt or a different version; replace it with the file from one of: "
            + ", ".join(entry.urls)
        )


def _download(url: str, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "llm-from-scratch"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))


def _fetch_from_network(entry: Dataset, target: Path, progress: bool) -> None:
    failures = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for url in entry.urls:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
            raw = Path(scratch) / "download"
            try:
                _download(url, raw, progress)
            except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, a connection cut short
                failures.append(f"{url}: {error}")
                continue
            if entry.zip_member is not None:
                raw = _extract(raw, entry, url)
            _install(raw, entry, target, url)
            return
    mirror_hint = entry.file
    raise DataError(
        f"could not download {entry.name!r}:\n  " + "\n  ".join(failures) + "\n"
        f"If this machine is offline, download it by hand from {entry.urls[0]}"
        + (f" (unzip it and keep {entry.zip_member})" if entry.zip_member else "")
        + f" and save it as {target}, or set LLM_DATA_MIRROR to a folder that holds {mirror_hint}."
    )


def _extract(archive: Path, entry: Dataset, url: str) -> Path:
    try:
        with zipfile.ZipFile(archive) as bundle:
            names = {Path(n).name: n for n in bundle.namelist()}
            if entry.zip_member not in names:
                raise DataError(f"{url} does not contain {entry.zip_member}; it holds {sorted(names)}")
            member = archive.with_name(entry.zip_member)
            member.write_bytes(bundle.read(names[entry.zip_member]))
            return member
    except zipfile.BadZipFile as error:
        raise DataError(f"{url} did not return a valid zip file ({error})") from error


def fetch(name: str, *, progress: bool = True) -> Path:
    """Return the path of a verified local copy of dataset ``name``, getting it first if needed.

    ``name`` is a key of ``DATASETS`` (or its registry file name), or a key of ``GROUPS``, for
    which every member is fetched and their common folder returned. Raises ``DataError`` when
    the data cannot be provided, saying what to do.
    """
    if name in GROUPS:
        paths = [fetch(member, progress=progress) for member in GROUPS[name]]
        return paths[0].parent
    entry = _resolve(name)
    target = data_dir() / entry.file
    if target.is_file() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
        return target

    mirror = os.environ.get("LLM_DATA_MIRROR")
    if mirror:
        source = Path(mirror).expanduser() / entry.file
        if not source.is_file():
            raise DataError(
                f"LLM_DATA_MIRROR is set to {mirror}, but it has no {entry.file} for {entry.name!r}; "
                f"put the file there, or unset LLM_DATA_MIRROR to download from {entry.urls[0]}"
            )
        actual = source.stat().st_size
        if actual != entry.size:  # refused before copying or hashing what may be hundreds of megabytes
            raise DataError(
                f"the mirror file {source} has {actual:,} bytes, but {entry.name!r} has {entry.size:,}; "
                f"it is truncated or a different version: replace it with the file from {entry.urls[0]}"
            )
        _install(source, entry, target, f"the mirror file {source}")
        return target

    if target.exists():  # present but wrong: never trust it, replace it
        target.unlink()
    _fetch_from_network(entry, target, progress)
    return target


def read_text(name: str) -> str:
    """Fetch a text dataset and return its contents as a string (UTF-8)."""
    return fetch(name).read_text(encoding="utf-8")
