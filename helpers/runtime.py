"""What every module stands on: the device, quick mode, atomic writes, headline numbers, and the
shared training policies (unwrapping a model, eval mode, compute precision, peak FLOP/s).

torch is imported inside the functions that need it, so ``import helpers`` stays light.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: torch is imported inside the functions
    import torch
    from torch import nn


def device() -> torch.device:
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


def check_count(name: str, value: object, minimum: int = 1, *, allow_none: bool = False) -> None:
    """Refuse ``value`` unless it is an integer >= ``minimum`` (or None, when allowed), naming the argument."""
    if value is None and allow_none:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return
    none = " or None" if allow_none else ""
    hint = " (it must be positive)" if minimum == 1 else ""
    raise ValueError(f"{name} must be an integer >= {minimum}{none}, got {value!r}{hint}")


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


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed ``write_atomically(target, ...)`` left beside ``target``.

    Only files named for a process that no longer runs are removed (a live writer keeps its own);
    returns the removed paths.
    """
    target = Path(target)
    removed = []
    for candidate in target.parent.glob(f".{target.name}.*.tmp*"):
        pid = candidate.name[len(target.name) + 2 :].split(".")[0]
        if not candidate.name.endswith((".tmp", ".tmp.d")) or (pid.isdigit() and _process_alive(int(pid))):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():  # our own leftovers: no write of ours is in progress while we clean
        return False
    return process_alive(pid)


def process_alive(pid: int) -> bool:
    """True if a process with id ``pid`` runs on this machine (this one included; another user's too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or no such process id at all
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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


# ---------------------------------------------------------------------------------------------
# models: the one place that knows about wrappers and train/eval mode


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and (Distributed)DataParallel wrappers."""
    from torch import nn

    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` runs the block in eval mode (no dropout) and restores the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# precision: one answer to "which dtype do the matrix products run in"

PRECISIONS = ("float32", "bfloat16", "float16", "auto")


def compute_dtype(device: torch.device | str, precision: str = "float32") -> torch.dtype:
    """The dtype autocast should compute in for ``precision`` on ``device``.

    ``"float32"``, ``"bfloat16"`` and ``"float16"`` are taken as given; ``"auto"`` is bfloat16 on a
    CUDA GPU that computes it natively (compute capability 8.0 or newer: A100, L4, H100, RTX 30xx on)
    and float32 everywhere else (CPUs, MPS, and older GPUs such as Colab's T4, where
    ``torch.cuda.is_bf16_supported()`` says True but bfloat16 is emulated, slower than float32).
    float16 is never chosen automatically: it needs loss scaling, which the training loops do not do.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, precision)


def native_bfloat16(device: torch.device | str) -> bool:
    """True on a CUDA GPU whose tensor cores compute bfloat16 (compute capability >= 8.0), not by emulation."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast(device: torch.device | str, precision: str = "float32") -> contextlib.AbstractContextManager:
    """A context that runs the forward pass in ``compute_dtype(device, precision)`` (a no-op for float32)."""
    import torch

    device = torch.device(device)
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Peak dense bf16 FLOP/s of common accelerators, by a substring of torch.cuda.get_device_name().
KNOWN_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "T4": 65e12,
                    "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def measure_cpu_peak_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 matmul FLOP/s of this CPU (square matrices of ``size``), the best of three timings."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):  # the best of three, so a moment of contention does not lower the peak
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device | str, override: float | None = None) -> tuple[float | None, str]:
    """The peak FLOP/s that MFU divides by, and where it came from.

    In order: ``override``, ``$LLM_PEAK_FLOPS``, the datasheet bf16 peak of a known GPU, a float32
    matmul measured now on a CPU; ``(None, "unknown")`` otherwise.
    """
    import torch

    if override:
        return float(override), "given"
    if os.environ.get("LLM_PEAK_FLOPS"):
        value = os.environ["LLM_PEAK_FLOPS"]
        try:
            return float(value), "LLM_PEAK_FLOPS"
        except ValueError:
            raise ValueError(f"LLM_PEAK_FLOPS must be a number of FLOP/s such as 989e12, got {value!r}") from None
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = next((peak for key, peak in KNOWN_PEAK_FLOPS.items() if key in name), None)
        return (found, f"{name} datasheet, bf16 dense") if found else (None, "unknown")
    if device.type == "cpu":
        return measure_cpu_peak_flops(), "measured float32 matmul"
    return None, "unknown"
