"""A stand-in for the Hugging Face hub on 127.0.0.1, serving random GPT-2 checkpoints in the hub's own layout.

Usage: python scripts/stand_in_hub.py --folder DIR [--sizes quick|true] [--port 0] [--port-file FILE]
                                      [--fail 401|403|404|500|drop|timeout]

``huggingface_hub`` (and so ``load_gpt2`` and ``transformers``) talks to ``$HF_ENDPOINT``; pointed at
this server, the notebooks' online branches run end to end without the internet. What it serves:

- ``openai-community/gpt2`` and ``openai-community/gpt2-medium``: weights of GPT2LMHeadModel with a
  random initialisation (seed 0), written by transformers and rewritten as the hub's files are: no
  ``transformer.`` prefix, the ``h.{i}.attn.bias`` causal-mask buffers present, no ``lm_head``.
  ``--sizes quick`` gives small models (GPT-2's vocabulary, so the tokenizer fits; a few layers of
  width 64/96); ``--sizes true`` gives GPT-2 124M's and 355M's true shapes (about 2 GB to write).
- the endpoints the hub client calls: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` (with the
  ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers it needs; a missing file answers 404
  with ``X-Error-Code: EntryNotFound``) and ``GET /api/models/{repo}[/revision/{revision}]``.

``--fail`` makes every request fail as a real hub or network can: 401, 403, 404 or 500 answers, a
connection dropped without an answer, or no answer for 60 s (a timeout; ``hang_seconds``). ``start_hub`` runs the
same server in a thread for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the stand-in's one commit (any revision resolves to it)
REPOS = ("openai-community/gpt2", "openai-community/gpt2-medium")
SIZES = {  # repo -> (n_embd, n_layer, n_head)
    "quick": {"openai-community/gpt2": (64, 2, 4), "openai-community/gpt2-medium": (96, 3, 4)},
    "true": {"openai-community/gpt2": (768, 12, 12), "openai-community/gpt2-medium": (1024, 24, 16)},
}
FAILURES = ("401", "403", "404", "500", "drop", "timeout")
_FAILURE_MESSAGES = {"401": "Invalid credentials in Authorization header", "403": "Access to this model is restricted",
                     "404": "Repository not found", "500": "Internal Error - We're working hard to fix this"}


# ---------------------------------------------------------------------------------------------
# the checkpoints


def write_repo(folder: Path, repo: str, n_embd: int, n_layer: int, n_head: int) -> Path:
    """Write one repository's config.json, generation_config.json and model.safetensors into folder/repo."""
    target = folder / repo
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    written = folder / ".transformers" / repo
    GPT2LMHeadModel(config).save_pretrained(written)  # transformers' own layout: transformer.*, tied head
    saved = load_file(written / "model.safetensors")
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in saved.items() if name != "lm_head.weight"}
    mask = torch.tril(torch.ones(1024, 1024, dtype=torch.float32)).view(1, 1, 1024, 1024)  # as GPT-2's files hold
    for layer in range(n_layer):
        tensors[f"h.{layer}.attn.bias"] = mask.clone()
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / ".model.safetensors.tmp"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (target / name).write_bytes((written / name).read_bytes())
    os.replace(target / ".model.safetensors.tmp", target / "model.safetensors")
    shutil.rmtree(folder / ".transformers", ignore_errors=True)
    return target


def write_repos(folder: Path, sizes: str = "quick") -> Path:
    """Write every stand-in repository of ``sizes`` ("quick" or "true") under ``folder``; return it."""
    folder = Path(folder)
    for repo, shape in SIZES[sizes].items():
        write_repo(folder, repo, *shape)
    return folder


# ---------------------------------------------------------------------------------------------
# the server


def _etag(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_version = "stand-in-hub"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        self.server.requests.append(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}")

    def _fail(self) -> bool:
        failure = self.server.failure
        if failure is None:
            return False
        if failure == "drop":
            self.server.requests.append(f"{self.command} {self.path} -> dropped")
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return True
        if failure == "timeout":
            time.sleep(self.server.hang_seconds)
            self.close_connection = True
            return True
        self._send_json(int(failure), {"error": _FAILURE_MESSAGES[failure]},
                        {"X-Error-Code": "RepoNotFound"} if failure in {"401", "404"} else {})
        return True

    def _send_json(self, status: int, document: dict, headers: dict | None = None) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                           "X-Repo-Commit": COMMIT, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _api(self, repo: str) -> None:
        folder = self.server.folder / repo
        if not folder.is_dir():
            self._send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        self._send_json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False,
                              "siblings": [{"rfilename": name} for name in files]})

    def _resolve(self, repo: str, revision: str, filename: str) -> None:
        folder, path = self.server.folder / repo, self.server.folder / repo / filename
        if not folder.is_dir():
            self._send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        if "/" in filename or not path.is_file():
            self._send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        size = path.stat().st_size
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and self.command == "GET":
            start = min(int(ranged.group(1)), size)
        commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else COMMIT  # a pinned revision is echoed
        self.send_response(206 if start else 200)
        for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(size - start),
                           "ETag": f'"{_etag(path)}"',
                           "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            with open(path, "rb") as handle:
                handle.seek(start)
                while chunk := handle.read(1 << 20):
                    self.wfile.write(chunk)

    def _route(self) -> None:
        if self._fail():
            return
        url = self.path.split("?", 1)[0]
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?/?", url)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url)
        if api:
            self._api(api.group(1))
        elif resolve:
            self._resolve(*resolve.groups())
        else:
            self._send_json(404, {"error": f"the stand-in hub does not serve {url}"})

    do_GET = do_HEAD = _route  # noqa: N815 (the names http.server calls)


class StandInHub(ThreadingHTTPServer):
    """The server: ``folder`` holds the repositories; ``failure`` (one of FAILURES, or None) breaks every answer."""

    daemon_threads = True
    hang_seconds = 60.0  # how long "timeout" keeps a request waiting

    def __init__(self, folder: Path, failure: str | None = None, port: int = 0):
        if failure is not None and failure not in FAILURES:
            raise ValueError(f"failure must be one of {', '.join(FAILURES)} or None, got {failure!r}")
        super().__init__(("127.0.0.1", port), _Handler)
        self.folder, self.failure, self.requests = Path(folder), failure, []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def start_hub(folder: Path, failure: str | None = None) -> StandInHub:
    """A StandInHub on a free port, serving in a daemon thread; call ``.shutdown()`` to stop it."""
    hub = StandInHub(folder, failure)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    return hub


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="where the repositories are (written if missing)")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, help="write the endpoint URL here once serving")
    parser.add_argument("--fail", choices=FAILURES, default=None)
    args = parser.parse_args()
    write_repos(args.folder, args.sizes)
    hub = StandInHub(args.folder, args.fail, args.port)
    if args.port_file:
        args.port_file.write_text(hub.endpoint)
    print(f"stand-in hub serving {args.folder} ({args.sizes} sizes) at {hub.endpoint}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        hub.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
