"""Small conveniences every notebook needs: the device, quick mode, seeding, headline numbers."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any


def device() -> torch.device:  # noqa: F821 (torch is imported lazily)
    """Return the best available device: cuda, then mps, then cpu.

    Set ``LLM_DEVICE`` (for example ``cpu``) to override the choice.
    """
    import torch

    override = os.environ.get("LLM_DEVICE")
    if override:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def quick_mode() -> bool:
    """True when ``LLM_QUICK`` is set to a true value (``make test`` sets ``LLM_QUICK=1``)."""
    return os.environ.get("LLM_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's random number generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def project_root() -> Path | None:
    """The checkout this package lives in (the folder with pyproject.toml), or None if installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def write_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``target``, then rename it into place.

    An interrupted or failing write leaves ``target`` as it was and no temporary file behind. The
    new file gets the usual permissions (0666 minus the umask; some writers create 0600 files).
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _results_dir() -> Path:
    configured = os.environ.get("LLM_RESULTS_DIR")
    if configured:
        return Path(configured)
    root = project_root() or Path.cwd()
    return root / "runs" / "results"


def record_results(notebook: str, numbers: dict[str, Any]) -> Path:
    """Write a notebook's headline numbers as JSON for ``make run``'s summary; return the file.

    The file is ``$LLM_RESULTS_DIR/<notebook>.json`` (default ``runs/results/``), written under a
    temporary name and renamed, so a reader never sees half a file.
    """
    folder = _results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    document = json.dumps({"notebook": notebook, "quick": quick_mode(), **numbers}, indent=2, default=str)
    return write_atomically(folder / f"{notebook}.json", lambda tmp: tmp.write_text(document))
