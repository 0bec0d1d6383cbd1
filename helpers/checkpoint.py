"""Saving and loading training checkpoints (Part 07), safely and atomically.

A checkpoint is two files side by side: ``model.safetensors`` (the weights, plus the model's
config and a save id in its metadata) and ``model.state.pt`` (optimizer state, RNG states,
config and whatever the caller adds, read back with ``torch.load(weights_only=True)``, so loading
never runs pickled code). The shared save id catches a pair that does not belong together.

A crash at any moment leaves a loadable checkpoint. A save first writes the new pair under
staging names (``model.new.safetensors``, ``model.new.state.pt``), each through a temporary file
renamed into place, and only then renames the state and the weights over the current pair.
``load_checkpoint`` takes the newest complete pair it finds: the staged pair, the staged weights
with the current state (a crash between the two final renames), else the current pair. The next
save finishes or discards what a killed save left, temporary files included.

One writer per folder. A save holds a lock file beside the weights (``model.lock``) that names its
holder (process id, host, time); a save while another process or thread holds it raises
``CheckpointLockedError`` naming the holder. ``checkpoint_lock`` holds it across many saves (a
training run does). The lock is removed when the holder is done; one left by a killed process
(its process id no longer runs on this host) is taken over. Readers take no lock: a load whose
files a save renames under it waits for that save to finish and reads again.

The optimizer's class name is saved with its state, and a load into an optimizer of another class
is refused (a checkpoint older than this check is compared by the settings the optimizer needs).

Architectures. The weights' metadata names the model's architecture (``arch``: ``"gpt2"`` for a
``GPTModel``, ``"modern"`` for Part 10's ``ModernModel``; a file without it is GPT-2's, as every file
was before Part 10), and ``read_arch`` reads it back. ``model_from_config(read_config(path),
read_arch(path))`` builds the right model for ``load_checkpoint``, and a model of the other
architecture is refused by name. The architectures are ``helpers.architectures``' table, which
imports ``helpers.modern`` only when a modern checkpoint is read, so this Part 07 module does not
depend on Part 10 at import. The file names and the newest pair are ``helpers.checkpoint_files``',
the lock ``helpers.checkpoint_lock``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from helpers.architectures import ARCHITECTURES, UnknownArchitectureError, architecture_of, get_architecture
from helpers.architectures import model_from_config as _model_from_config
from helpers.checkpoint_files import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    checkpoint_paths,
    files_signature,
    files_to_load,
    newest_pair,
    read_header,
    save_id_of_weights,
    staging_paths,
)
from helpers.checkpoint_lock import checkpoint_lock, lock_held, lock_path, locked_message
from helpers.runtime import remove_stale_temporaries, unwrap_model, write_atomically

__all__ = ["ARCHITECTURES", "CheckpointError", "CheckpointLockedError", "CheckpointNotFoundError", "checkpoint_lock",
           "checkpoint_paths", "load_checkpoint", "model_from_config", "read_arch", "read_config",
           "recover_interrupted_save", "remove_stale_temporaries", "save_checkpoint"]

_UNMARKED_ARCH = "gpt2"  # the architecture of a file saved before checkpoints named theirs
_UNSTRUCTURAL = ("drop_rate",)  # config fields that do not change the shapes or sharing of the weights


def _config_of(model: nn.Module) -> dict | None:
    cfg = getattr(unwrap_model(model), "cfg", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def _arch_of(model: nn.Module) -> str | None:
    """The ``ARCHITECTURES`` name of ``model``'s config class; None for a model of another kind."""
    return architecture_of(model)


def _classes(arch: str) -> tuple[type, type]:
    """The (model class, config class) of ``arch``, importing its module on first use."""
    try:
        architecture = get_architecture(arch)
    except UnknownArchitectureError as error:
        raise CheckpointError(str(error)) from None
    return architecture.model, architecture.config


def model_from_config(config: dict, arch: str = "gpt2") -> nn.Module:
    """A new model of architecture ``arch`` (``"gpt2"`` or ``"modern"``) built from a saved ``config`` dict.

    ``model_from_config(read_config(path), read_arch(path))`` builds the model a checkpoint's weights
    fit, for ``load_checkpoint``: a ``GPTModel`` or a ``ModernModel`` (``helpers.architectures`` names them).
    """
    _classes(arch)  # an unknown name is a CheckpointError here
    return _model_from_config(config, arch)


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"checkpoint state {where} is a {type(value).__name__}; only numbers, strings, tensors and "
                    "lists/dicts of them can be saved (convert it first)")


def _rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
    }


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np.array(saved["key"], dtype=np.uint32),
                         "pos": saved["pos"]}, "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})


# ---------------------------------------------------------------------------------------------
# one writer per folder: a lock file naming its holder


# ---------------------------------------------------------------------------------------------
# saving


def _save_weights(model: nn.Module, tmp: Path, metadata: dict) -> None:
    """Write the weights to ``tmp`` through a private folder: safetensors stages its own ``.tmpXXXXXX`` file
    beside its target, which a killed process would otherwise leave in the checkpoint's folder."""
    private = tmp.with_name(f"{tmp.name}.d")
    private.mkdir()
    try:
        save_model(unwrap_model(model), str(private / "weights.safetensors"), metadata=metadata)
        os.replace(private / "weights.safetensors", tmp)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **state: Any) -> Path:
    """Save model weights (safetensors), optimizer state, RNG states, config and ``state``; return the weights path.

    ``path`` is a ``.safetensors`` file or a folder (which gets ``model.safetensors``). Extra
    ``state`` (e.g. ``step=1200``) must be numbers, strings, tensors or lists/dicts of them.
    Killed at any moment, the save leaves the previous checkpoint or this one loadable.
    """
    _check_plain(state, "state")
    weights_path, state_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint_lock(weights_path):
        recover_interrupted_save(weights_path)
        save_id = uuid.uuid4().hex
        config, arch = _config_of(model), _arch_of(model)
        bundle = {
            "save_id": save_id,
            "config": config,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
            "rng": _rng_states(),
            "state": state,
        }
        metadata = {"format": "pt", "save_id": save_id, "config": json.dumps(config)}
        if arch is not None:
            metadata["arch"] = arch
        new_weights, new_state = staging_paths(weights_path)
        write_atomically(new_state, lambda tmp: torch.save(bundle, tmp))
        write_atomically(new_weights, lambda tmp: _save_weights(model, tmp, metadata))
        os.replace(new_state, state_path)  # from here until the next line, the pair is (new weights, this state)
        os.replace(new_weights, weights_path)
    return weights_path


def recover_interrupted_save(path: str | os.PathLike) -> Path | None:
    """Finish or discard what a killed ``save_checkpoint`` left at ``path``; return the weights path in use.

    The newest complete pair is renamed into place, staging and stale temporary files are deleted;
    a folder without a checkpoint gets None. Holds the folder's lock (``checkpoint_lock``) meanwhile.
    """
    weights_path, state_path = checkpoint_paths(path)
    if not weights_path.parent.is_dir():
        return None
    new_weights, new_state = staging_paths(weights_path)
    with checkpoint_lock(weights_path):
        for leftover in (weights_path, state_path, new_weights, new_state):
            remove_stale_temporaries(leftover)
        pair = newest_pair(weights_path)
        if pair is not None and pair[1] == new_state:
            os.replace(new_state, state_path)
        if pair is not None and pair[0] == new_weights:
            os.replace(new_weights, weights_path)
        for leftover in (new_weights, new_state):
            leftover.unlink(missing_ok=True)
    return weights_path if pair is not None or weights_path.is_file() else None


def read_config(path: str | os.PathLike) -> dict | None:
    """The model config saved with a checkpoint (a dict for ``GPTConfig.from_dict``), read from the file header only.

    Lets a caller build the right model before ``load_checkpoint``; None if the model had no config.
    A config that is not a dict or lacks one of its config class's fields raises ``CheckpointError``.
    The dict is a ``ModernConfig``'s when ``read_arch`` says ``"modern"``: ``model_from_config`` builds either.
    """
    def read() -> dict | None:
        weights_path, _ = files_to_load(path)
        _, metadata = _read_header_of_chosen(weights_path)
        return _parse_config(weights_path, metadata)

    return _read_consistently(path, read)


def read_arch(path: str | os.PathLike) -> str:
    """The architecture of the model saved with a checkpoint (an ``ARCHITECTURES`` name), from the file header only.

    ``"gpt2"`` for a file saved before checkpoints recorded it; an unknown name raises ``CheckpointError``.
    """
    def read() -> str:
        weights_path, _ = files_to_load(path)
        _, metadata = _read_header_of_chosen(weights_path)
        return _parse_arch(weights_path, metadata)

    return _read_consistently(path, read)


def _parse_arch(weights_path: Path, metadata: dict) -> str:
    arch = metadata.get("arch") or _UNMARKED_ARCH
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{weights_path} holds a model of architecture {arch!r}, which this version of helpers "
                              f"does not know (it knows {', '.join(ARCHITECTURES)}); load it with the version that "
                              "saved it")
    return arch


def _parse_config(weights_path: Path, metadata: dict) -> dict | None:
    try:
        config = json.loads(metadata.get("config") or "null")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{weights_path}: the config in its metadata is not JSON ({error})") from error
    if config is None:
        return None
    if not isinstance(config, dict):
        raise CheckpointError(f"{weights_path}: the config in its metadata is a {type(config).__name__}, not a dict")
    _, config_class = _classes(_parse_arch(weights_path, metadata))
    missing = [field.name for field in dataclasses.fields(config_class) if field.name not in config]
    if missing:
        raise CheckpointError(f"{weights_path}: the saved config lacks {', '.join(missing)}; "
                              "it was not written by save_checkpoint")
    return config


def _check_fits(weights_path: Path, model: nn.Module, stored: dict[str, list[int]], metadata: dict) -> None:
    saved_config = _parse_config(weights_path, metadata)
    saved_arch, arch = _parse_arch(weights_path, metadata), _arch_of(model)
    if saved_config and arch is not None and arch != saved_arch:
        saved_class, model_class = ARCHITECTURES[saved_arch].model_class, type(unwrap_model(model)).__name__
        raise CheckpointError(f"{weights_path} holds a {saved_arch} model ({saved_class}), not a {arch} one "
                              f"({model_class}); build the model it fits with "
                              "model_from_config(read_config(path), read_arch(path))")
    config = _config_of(model)
    if saved_config and config:
        keys = [key for key in {**saved_config, **config} if key not in _UNSTRUCTURAL]
        differences = [f"{key}: file {saved_config.get(key)!r}, model {config.get(key)!r}"
                       for key in keys if saved_config.get(key) != config.get(key)]
        if differences:
            raise CheckpointError(f"{weights_path} was saved from a model with a different config ("
                                  + "; ".join(differences) + "); build the model with the saved config")
    expected = unwrap_model(model).state_dict()
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(tensor.data_ptr() if tensor.device.type != "meta" else id(tensor), []).append(name)
    for names in groups.values():
        if not any(name in stored for name in names):
            raise CheckpointError(f"{weights_path} has no tensor {names[0]} (shape {list(expected[names[0]].shape)}), "
                                  "which the model needs")
    for name, shape in stored.items():
        if name not in expected:
            raise CheckpointError(f"{weights_path} holds {name} (shape {shape}), which the model does not have")
        if list(expected[name].shape) != shape:
            raise CheckpointError(f"{weights_path}: {name} has shape {shape} in the file but "
                                  f"{list(expected[name].shape)} in the model")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = False) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (and ``optimizer``); return its state.

    The returned dict holds the extra ``state`` saved with it, plus ``config`` and ``rng``. With
    ``restore_rng=True`` the Python, NumPy and PyTorch generators continue where the save left them.
    Raises ``CheckpointError`` naming the file when it is missing, damaged or does not fit (an
    optimizer of another class than the saved one included). A save that renames the files while
    they are read is waited for, and the files read again.
    """
    bundle, state_path = _read_consistently(path, lambda: _load_once(path, model, optimizer))
    if optimizer is not None:
        _load_optimizer_state(optimizer, bundle, state_path)
    if restore_rng:
        _restore_rng(bundle["rng"])
    return {**bundle["state"], "config": bundle["config"], "rng": bundle["rng"]}


def _load_once(path: str | os.PathLike, model: nn.Module,
               optimizer: torch.optim.Optimizer | None) -> tuple[dict, Path]:
    """Check the chosen pair and load its weights into ``model``; return its state bundle and state file."""
    weights_path, state_path = files_to_load(path)
    stored, metadata = _read_header_of_chosen(weights_path)
    _check_fits(weights_path, model, stored, metadata)
    try:
        bundle = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, or a pickle that is not plain data
        _raise_if_gone(state_path)
        raise CheckpointError(f"{state_path} is truncated or not a checkpoint state file ({error})") from error
    if not isinstance(bundle, dict) or bundle.get("save_id") != metadata.get("save_id"):
        raise _ChangedWhileReading(CheckpointError(
            f"{state_path} does not belong to {weights_path} (different saves); one of the two files was replaced "
            "by hand or copied from another run: restore the matching file, or start from another checkpoint"))
    if optimizer is not None:
        _check_optimizer_class(optimizer, bundle, state_path)
    target = unwrap_model(model)
    device = next(target.parameters()).device
    try:
        load_model(target, str(weights_path), strict=True, device=str(device))
    except Exception as error:
        _raise_if_gone(weights_path)
        raise CheckpointError(f"{weights_path} could not be read ({error})") from error
    if save_id_of_weights(weights_path) != metadata.get("save_id"):  # renamed over between header and load
        raise _ChangedWhileReading(CheckpointError(f"{weights_path} was replaced by another save while it was read"))
    return bundle, state_path


def _check_optimizer_class(optimizer: torch.optim.Optimizer, bundle: dict, state_path: Path) -> None:
    if bundle["optimizer"] is None:
        raise CheckpointError(f"{state_path} holds no optimizer state (it was saved without an optimizer)")
    saved, this = bundle.get("optimizer_class"), type(optimizer).__name__
    if saved is not None and saved != this:
        raise CheckpointError(f"{state_path} holds the state of a {saved} optimizer, which a {this} cannot use; "
                              f"build a {saved} to continue this run, or load the weights without an optimizer")


def _load_optimizer_state(optimizer: torch.optim.Optimizer, bundle: dict, state_path: Path) -> None:
    """Load the saved optimizer state; a checkpoint without the class name is checked by the settings it holds."""
    previous = optimizer.state_dict()
    try:
        optimizer.load_state_dict(bundle["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{state_path}: the optimizer state does not fit this optimizer ({error})") from error
    missing = sorted({key for group in optimizer.param_groups for key in optimizer.defaults if key not in group})
    if missing:  # the saved settings are another optimizer class's (its first step would raise KeyError)
        optimizer.load_state_dict(previous)
        raise CheckpointError(f"{state_path}: the saved optimizer settings lack {', '.join(missing)}, which "
                              f"{type(optimizer).__name__} needs: they were saved by another optimizer class; build "
                              "that one to continue this run, or load the weights without an optimizer")


# ---------------------------------------------------------------------------------------------
# reading while a save may rename the files


_SAVE_WAIT_S = 10.0  # the longest a reader waits for a save in progress before reading again
Result = TypeVar("Result")


class _ChangedWhileReading(Exception):
    """The files a reader chose were renamed by a save; ``error`` is raised if that keeps happening."""

    def __init__(self, error: CheckpointError):
        super().__init__(str(error))
        self.error = error


def _raise_if_gone(path: Path) -> None:
    if not path.is_file():
        raise _ChangedWhileReading(CheckpointNotFoundError(f"checkpoint file {path} does not exist"))


def _read_header_of_chosen(weights_path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    _raise_if_gone(weights_path)
    try:
        return read_header(weights_path)
    except CheckpointError:
        _raise_if_gone(weights_path)
        raise


def _read_consistently(path: str | os.PathLike, read: Callable[[], Result]) -> Result:
    """Call ``read``; while saves keep renaming the files under it, wait for them and read again.

    A mismatch that a save in progress explains goes away: the files change between two tries. One
    that stays (the same files twice, no writer holding the lock) is real, and its error is raised.
    Past ``_SAVE_WAIT_S`` of saves in a row the error names the writer.
    """
    weights_path, state_path = checkpoint_paths(path)
    lock = lock_path(path)
    deadline = time.monotonic() + _SAVE_WAIT_S
    previous, attempt = None, 0
    while True:
        try:
            return read()
        except _ChangedWhileReading as changed:
            attempt += 1
            signature, writing = files_signature(weights_path, state_path), lock_held(lock)
            if not writing and signature == previous:
                raise changed.error from None
            if time.monotonic() > deadline:
                if writing:  # a writer kept renaming the files: say so, rather than blame a hand-made copy
                    raise type(changed.error)(f"{changed.error}. The checkpoint changed while it was read, "
                                              f"{attempt} times: {locked_message(lock)}") from None
                raise changed.error from None
            previous = signature
            time.sleep(min(0.05 * attempt, 0.5))
            while (time.monotonic() < deadline and lock_held(lock)
                   and any(staged.exists() for staged in staging_paths(weights_path))):
                time.sleep(0.05)


