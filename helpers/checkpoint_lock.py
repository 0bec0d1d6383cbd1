"""One writer per checkpoint folder (Part 07): a lock file beside the weights that names its holder.

``checkpoint_lock(path)`` creates ``model.lock`` (process id, host, start time) with an exclusive
create, so two writers cannot both hold it; a second writer, in another process or another thread
of this one, gets ``CheckpointLockedError`` naming the holder. It is re-entrant within a thread (a
training run holds it across its saves). A lock left by a killed process (its process id no longer
runs on this host, or it never got its holder's name written) is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from helpers.checkpoint_files import CheckpointLockedError, checkpoint_paths
from helpers.runtime import process_alive

__all__ = ["checkpoint_lock", "lock_held", "lock_path", "locked_message"]


_HELD: dict[str, list[int]] = {}  # lock file -> [thread id, depth] of the locks this process holds
_HELD_GUARD = threading.Lock()
_UNNAMED_LOCK_S = 10.0  # a lock file still without its holder's name after this long was left by a killed writer


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the checkpoint at ``path`` (``model.lock`` beside ``model.safetensors``)."""
    weights_path, _ = checkpoint_paths(path)
    return weights_path.with_name(f"{weights_path.stem}.lock")


def _read_holder(lock: Path) -> dict | None:
    """The holder named in ``lock``; None if it is gone or does not name one (yet)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_stale(lock: Path, holder: dict | None) -> bool:
    """True if no live process holds ``lock``: its holder is dead on this host, or it never got a holder."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _UNNAMED_LOCK_S
        except FileNotFoundError:  # released meanwhile
            return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: cannot be checked from here
    # our own process id, not held by this process: an earlier process with the same id left it
    return holder["pid"] == os.getpid() or not process_alive(holder["pid"])


def locked_message(lock: Path, holder: dict | None = None, process: str = "process") -> str:
    """What to tell a writer that finds ``lock`` held: who holds it (read from the file if not given), what to do."""
    holder = holder if holder is not None else _read_holder(lock)
    who = (f"{process} {holder['pid']} on {holder.get('host')} (since {holder.get('since')})" if holder
           else "another process")
    return (f"{lock.parent} is being written by {who}, which holds {lock}: one writer per checkpoint folder. "
            f"Wait for it to finish or save to another folder; if that process no longer runs, delete {lock}")


def _take_lock(lock: Path) -> None:
    """Create ``lock`` naming this process, taking over a stale one; raise ``CheckpointLockedError`` if held."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if not _is_stale(lock, holder):
                raise CheckpointLockedError(locked_message(lock, holder)) from None
            if _read_holder(lock) == holder:  # still the dead holder's, not one that took it over meanwhile
                lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(me))
        return
    raise CheckpointLockedError(locked_message(lock, _read_holder(lock)))


def _release_lock(lock: Path) -> None:
    holder = _read_holder(lock)
    if holder is not None and (holder["pid"], holder.get("host")) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def checkpoint_lock(path: str | os.PathLike) -> Iterator[Path]:
    """``with checkpoint_lock(path):`` makes this thread the one writer of the checkpoint at ``path``; yields the lock.

    Re-entrant in one thread (``save_checkpoint`` inside the block takes it again). Raises
    ``CheckpointLockedError`` naming the holder when another process or thread holds it; a lock
    whose process no longer runs on this host is taken over. The folder must exist.
    """
    lock = lock_path(path)
    key = str(lock.absolute())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] != threading.get_ident():
            raise CheckpointLockedError(locked_message(lock, _read_holder(lock), "another thread of process"))
        if held is None:
            _take_lock(lock)
            held = _HELD[key] = [threading.get_ident(), 0]
        held[1] += 1
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                _release_lock(lock)


def lock_held(lock: Path) -> bool:
    """True if a live writer (this process included) holds ``lock`` now."""
    with _HELD_GUARD:
        if str(lock.absolute()) in _HELD:
            return True
    return lock.exists() and not _is_stale(lock, _read_holder(lock))
