"""The files of a checkpoint on disk (Part 07): their names, and which pair of them is the newest whole one.

A checkpoint is ``model.safetensors`` (weights, config and a save id in its metadata) beside
``model.state.pt`` (optimizer and RNG states, the same save id). A save stages its new pair as
``model.new.safetensors`` / ``model.new.state.pt`` before renaming it into place, so after a crash
the newest pair whose save ids match is the staged one, the staged weights with the current state,
or the current pair (``newest_pair``). ``helpers.checkpoint`` saves and loads through these.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["CheckpointError", "CheckpointLockedError", "CheckpointNotFoundError", "checkpoint_paths", "files_signature",
           "files_to_load", "newest_pair", "read_header", "save_id_of_weights", "staging_paths"]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not fit the model; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointLockedError(CheckpointError):
    """Another process or thread is writing checkpoints to the folder; the message names it."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Return ``(weights, state)`` file paths: ``path`` itself if it ends in .safetensors, else inside it."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / "model.safetensors"
    return weights, weights.with_name(f"{weights.stem}.state.pt")


def staging_paths(weights_path: Path) -> tuple[Path, Path]:
    """Where a save writes its new pair before renaming it over the current one."""
    return checkpoint_paths(weights_path.with_name(f"{weights_path.stem}.new.safetensors"))


def read_header(weights_path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The tensor shapes and metadata of a safetensors file, from its header; ``CheckpointError`` if it is damaged."""
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
            return shapes, handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"{weights_path} is truncated or not a safetensors file ({error})") from error


def save_id_of_weights(weights_path: Path) -> str | None:
    """The save id in a weights file's metadata; None if the file cannot be read."""
    try:
        return read_header(weights_path)[1].get("save_id")
    except (CheckpointError, OSError):
        return None


def _save_id_of_state(state_path: Path) -> str | None:
    try:
        bundle = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a state file: not a candidate
        return None
    return bundle.get("save_id") if isinstance(bundle, dict) else None


def newest_pair(weights_path: Path) -> tuple[Path, Path] | None:
    """The newest (weights, state) files of one save: staged, half-swapped, or current; None if none is whole."""
    _, state_path = checkpoint_paths(weights_path)
    new_weights, new_state = staging_paths(weights_path)
    if not (new_weights.is_file() or new_state.is_file()):  # no interrupted save: the current pair, checked later
        return (weights_path, state_path) if weights_path.is_file() and state_path.is_file() else None
    weights_ids = {path: save_id_of_weights(path) for path in (new_weights, weights_path) if path.is_file()}
    for candidate_state in (new_state, state_path):
        state_id = _save_id_of_state(candidate_state) if candidate_state.is_file() else None
        for candidate_weights, weights_id in weights_ids.items():
            if state_id is not None and weights_id == state_id:
                return candidate_weights, candidate_state
    return None


def files_to_load(path: str | os.PathLike) -> tuple[Path, Path]:
    """The (weights, state) pair a load should read: the newest complete one, else the current names."""
    weights_path, state_path = checkpoint_paths(path)
    return newest_pair(weights_path) or (weights_path, state_path)


def files_signature(*paths: Path) -> tuple:
    """What identifies the files now (inode, modification time, size; None where missing): a save changes it."""
    signature = []
    for path in paths:
        try:
            stat = path.stat()
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except OSError:
            signature.append(None)
    return tuple(signature)
