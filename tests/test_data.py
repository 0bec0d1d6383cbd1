"""helpers.data: the registry and ``fetch`` (mirror, local copy, download, verification)."""

from __future__ import annotations

import email.message
import hashlib
import http.client
import io
import re
import urllib.error
import urllib.request
import urllib.response
import zipfile
from pathlib import Path

import pytest

from helpers.data import DATASETS, DataError, fetch, read_text


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Every file (hidden ones included) below ``folder``; empty if the folder does not exist."""
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def entries_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``LLM_DATA_DIR`` for one test."""
    folder = tmp_path / "data"
    monkeypatch.setenv("LLM_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to open a URL."""

    def refuse(*args, **kwargs):
        pytest.fail(f"fetch tried the network: urlopen{args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """Make ``urlopen`` answer with given bytes (no mirror set); return the list of URLs requested."""
    monkeypatch.delenv("LLM_DATA_MIRROR", raising=False)
    requested: list[str] = []

    def install(payload: bytes) -> list[str]:
        def fake_urlopen(request, timeout=None):
            url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
            requested.append(url)
            headers = email.message.Message()
            headers["Content-Length"] = str(len(payload))
            return urllib.response.addinfourl(io.BytesIO(payload), headers, url, code=200)

        monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
        return requested

    return install


def test_fetch_from_mirror_matches_registry_sha256(mirror, data_dir, no_network):
    # given an empty data folder and a mirror
    entry = DATASETS["the-verdict"]
    # when
    path = fetch("the-verdict", progress=False)
    # then the copy lands in the data folder and hashes to the registry's value
    assert path == data_dir / entry.file
    assert sha256_of(path.read_bytes()) == entry.sha256
    assert path.stat().st_size == entry.size
    assert path.read_bytes() == (mirror / entry.file).read_bytes()


def test_second_fetch_reuses_local_copy_without_the_mirror(mirror, data_dir, no_network, tmp_path,
                                                           monkeypatch):
    # given a dataset fetched once from the mirror
    first = fetch("the-verdict", progress=False)
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    # when the mirror points at an empty folder and we fetch again
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("LLM_DATA_MIRROR", str(empty))
    second = fetch("the-verdict", progress=False)
    # then the same, untouched file is returned
    assert second == first
    assert (second.stat().st_mtime_ns, second.stat().st_ino) == stamp
    assert sha256_of(second.read_bytes()) == DATASETS["the-verdict"].sha256


def test_corrupt_local_copy_is_replaced_from_mirror(mirror, data_dir, no_network):
    # given a local copy of the right size but the wrong content
    entry = DATASETS["the-verdict"]
    target = data_dir / entry.file
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * entry.size)
    # when
    path = fetch("the-verdict", progress=False)
    # then it is replaced by the verified file
    assert sha256_of(path.read_bytes()) == entry.sha256


def test_mirror_with_wrong_sha256_raises_and_leaves_nothing(mirror, data_dir, no_network, tmp_path,
                                                            monkeypatch):
    # given a mirror whose copy of The Verdict has one byte changed
    entry = DATASETS["the-verdict"]
    good = (mirror / entry.file).read_bytes()
    bad = good[:100] + bytes([good[100] ^ 0x20]) + good[101:]
    bad_mirror = tmp_path / "bad-mirror"
    (bad_mirror / entry.file).parent.mkdir(parents=True)
    (bad_mirror / entry.file).write_bytes(bad)
    monkeypatch.setenv("LLM_DATA_MIRROR", str(bad_mirror))
    # when / then: refused, naming both hashes, without trying the network
    with pytest.raises(DataError) as caught:
        fetch("the-verdict", progress=False)
    message = str(caught.value)
    assert entry.sha256 in message
    assert sha256_of(bad) in message
    # and no file, nor temporary file, is left in the data folder
    assert files_under(data_dir) == []


def test_unknown_name_lists_the_known_names(data_dir, no_network):
    with pytest.raises(DataError) as caught:
        fetch("the-verdikt", progress=False)
    message = str(caught.value)
    assert "the-verdikt" in message
    for name in [*DATASETS, "gutenberg"]:
        assert name in message


def test_offline_without_mirror_explains_manual_download(data_dir, monkeypatch):
    # given no mirror and no network
    monkeypatch.delenv("LLM_DATA_MIRROR", raising=False)
    tried: list[str] = []

    def offline(request, timeout=None):
        tried.append(request.full_url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    entry = DATASETS["the-verdict"]
    # when / then
    with pytest.raises(DataError) as caught:
        fetch("the-verdict", progress=False)
    message = str(caught.value)
    assert tried == list(entry.urls)
    assert entry.urls[0] in message  # what to download by hand
    assert str(data_dir / entry.file) in message  # where to put it
    assert "LLM_DATA_MIRROR" in message  # or the alternative
    assert files_under(data_dir) == []


def test_offline_tries_every_url_of_a_dataset(data_dir, monkeypatch):
    # given a dataset with two sources and no network
    monkeypatch.delenv("LLM_DATA_MIRROR", raising=False)
    tried: list[str] = []

    def offline(request, timeout=None):
        tried.append(request.full_url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    entry = DATASETS["sms-spam"]
    assert len(entry.urls) == 2
    # when / then: both were tried and both failures are reported
    with pytest.raises(DataError) as caught:
        fetch("sms-spam", progress=False)
    assert tried == list(entry.urls)
    for url in entry.urls:
        assert url in str(caught.value)
    assert "SMSSpamCollection" in str(caught.value)
    assert files_under(data_dir) == []


def test_mirror_without_the_file_names_it_and_does_not_download(data_dir, no_network, tmp_path, monkeypatch):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("LLM_DATA_MIRROR", str(empty))
    with pytest.raises(DataError) as caught:
        fetch("tinyshakespeare", progress=False)
    message = str(caught.value)
    assert "LLM_DATA_MIRROR" in message
    assert DATASETS["tinyshakespeare"].file in message
    assert files_under(data_dir) == []


def test_mirror_file_of_the_wrong_size_is_refused_before_copying_or_hashing(data_dir, tmp_path, monkeypatch):
    # given a mirror whose tinyshakespeare.txt is 10 bytes long, and copying and hashing that fail the test
    entry = DATASETS["tinyshakespeare"]
    short_mirror = tmp_path / "short-mirror"
    (short_mirror / entry.file).parent.mkdir(parents=True)
    (short_mirror / entry.file).write_bytes(b"0123456789")
    monkeypatch.setenv("LLM_DATA_MIRROR", str(short_mirror))

    def refuse(*args, **kwargs):
        pytest.fail("fetch copied or hashed a mirror file whose size already told it was wrong")

    monkeypatch.setattr("helpers.data.shutil.copyfile", refuse)
    monkeypatch.setattr("helpers.data.sha256_file", refuse)

    # when / then it is refused naming the file, the expected and the actual sizes, and nothing lands
    with pytest.raises(DataError) as caught:
        fetch("tinyshakespeare", progress=False)
    message = str(caught.value)
    assert str(short_mirror / entry.file) in message and f"{entry.size:,}" in message and "10 bytes" in message
    assert files_under(data_dir) == []


def test_fetch_accepts_the_registry_file_name(mirror, data_dir, no_network):
    assert fetch("the-verdict.txt", progress=False) == data_dir / DATASETS["the-verdict"].file


def test_download_with_correct_bytes_is_put_in_place(mirror, data_dir, serve):
    # given a server that returns the genuine file
    entry = DATASETS["the-verdict"]
    requested = serve((mirror / entry.file).read_bytes())
    # when
    path = fetch("the-verdict", progress=False)
    # then
    assert requested == [entry.urls[0]]
    assert path == data_dir / entry.file
    assert sha256_of(path.read_bytes()) == entry.sha256
    assert entries_under(data_dir) == [entry.file]  # no scratch folder or part file left


def test_download_with_corrupted_bytes_raises_and_leaves_nothing(mirror, data_dir, serve):
    # given a server that returns a truncated file
    entry = DATASETS["the-verdict"]
    corrupted = (mirror / entry.file).read_bytes()[:-10]
    serve(corrupted)
    # when / then
    with pytest.raises(DataError) as caught:
        fetch("the-verdict", progress=False)
    assert entry.sha256 in str(caught.value)
    assert sha256_of(corrupted) in str(caught.value)
    assert files_under(data_dir) == []
    assert entries_under(data_dir) == []


def test_connection_dropped_mid_download_raises_data_error_and_leaves_nothing(mirror, data_dir, monkeypatch):
    # given a server that sends part of the file, then breaks the transfer (as http.client reports
    # a chunked response cut short)
    monkeypatch.delenv("LLM_DATA_MIRROR", raising=False)
    entry = DATASETS["the-verdict"]
    partial = (mirror / entry.file).read_bytes()[:4096]

    class DroppedResponse(io.BytesIO):
        headers = email.message.Message()

        def read(self, size=-1):
            block = super().read(size)
            if not block:
                raise http.client.IncompleteRead(partial)
            return block

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: DroppedResponse(partial))
    # when / then: the failure is reported as a DataError that says what to do, and no file is left
    with pytest.raises(DataError) as caught:
        fetch("the-verdict", progress=False)
    assert entry.urls[0] in str(caught.value)
    assert files_under(data_dir) == []


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def test_sms_spam_download_is_unzipped_and_verified(mirror, data_dir, serve):
    # given a server returning a zip that holds SMSSpamCollection (as UCI serves it)
    entry = DATASETS["sms-spam"]
    collection = (mirror / entry.file).read_bytes()
    requested = serve(zip_of({"SMSSpamCollection": collection, "readme": b"SMS Spam Collection v.1\n"}))
    # when
    path = fetch("sms-spam", progress=False)
    # then only the member lands, verified
    assert requested == [entry.urls[0]]
    assert path == data_dir / entry.file
    assert sha256_of(path.read_bytes()) == entry.sha256
    assert files_under(data_dir) == [path]


def test_sms_spam_download_with_corrupted_member_raises_and_leaves_nothing(mirror, data_dir, serve):
    entry = DATASETS["sms-spam"]
    collection = (mirror / entry.file).read_bytes()
    corrupted = collection[:1000] + bytes([collection[1000] ^ 0x01]) + collection[1001:]
    serve(zip_of({"SMSSpamCollection": corrupted}))
    with pytest.raises(DataError, match="sha256"):
        fetch("sms-spam", progress=False)
    assert files_under(data_dir) == []


def test_sms_spam_download_that_is_not_a_zip_raises(data_dir, serve):
    serve(b"<html>Service unavailable</html>")
    with pytest.raises(DataError, match="zip"):
        fetch("sms-spam", progress=False)
    assert files_under(data_dir) == []


def test_fetch_gutenberg_returns_folder_of_the_three_novels(mirror, data_dir, no_network):
    # when
    folder = fetch("gutenberg", progress=False)
    # then
    novels = ["pride-and-prejudice", "sherlock-holmes", "house-of-mirth"]
    assert folder.is_dir()
    assert folder == data_dir / "gutenberg"
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(DATASETS[n].file).name for n in novels)
    for name in novels:
        path = folder / Path(DATASETS[name].file).name
        assert sha256_of(path.read_bytes()) == DATASETS[name].sha256


def test_read_text_returns_the_story(mirror, data_dir, no_network):
    text = read_text("the-verdict")
    assert text.startswith("I HAD always thought Jack Gisburn rather a cheap genius")
    assert len(text) == 20_479
    assert re.search(r"\bGisburn\b", text)
