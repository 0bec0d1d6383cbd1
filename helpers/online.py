"""Online or offline: which branch a notebook takes, and loading GPT-2 from the hub without a traceback.

A notebook that can use OpenAI's GPT-2 weights has an online branch (the book's recipe, for Colab on
a GPU) and an offline one (our own models). ``choose_branch`` is the one rule that picks between them:

- ``LLM_ONLINE=1`` takes the online branch (on a CPU too; ``LLM_QUICK=1`` shrinks it as everything);
- ``LLM_ONLINE=0`` takes the offline one;
- unset, the choice is automatic: offline under ``HF_HUB_OFFLINE=1`` and in quick mode (``make test``
  never downloads; its rehearsal sets ``LLM_ONLINE=1``), offline on a machine without a CUDA GPU when
  the branch trains GPT-2 355M, online otherwise.

``try_load_gpt2`` then loads the weights, and turns every way the hub can fail (401, 403, 404, 500,
a dropped connection, a timeout, offline mode) into ``(None, reason)``: the notebook falls back to
its offline branch and prints the reason in one line.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from helpers.model import GPTModel
from helpers.runtime import quick_mode
from helpers.weights import GPT2_NAMES, GPT2_REVISIONS, load_gpt2

__all__ = ["Branch", "choose_branch", "hub_failure_reason", "try_load_gpt2"]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Branch:
    """The branch a notebook takes (``online``) and why, in a few words (``reason``)."""

    online: bool
    reason: str

    def line(self, online_does: str, offline_does: str) -> str:
        """The one line a notebook prints: the branch, why, and what it does there."""
        does = online_does if self.online else offline_does
        return f"{'ONLINE' if self.online else 'OFFLINE'} ({self.reason}): {does}"

    def fallback(self, reason: str) -> Branch:
        """The offline branch this one falls back to when the weights cannot be loaded."""
        return Branch(False, f"{reason}; fell back to offline")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is neither on nor off: set {name}=1 (online), {name}=0 (offline), "
                     "or unset it for the automatic choice")


def choose_branch(*, trains_gpt2_medium: bool = False, device: torch.device | str | None = None) -> Branch:
    """The branch to take: ``LLM_ONLINE`` if set, else the automatic choice (see the module's docstring).

    ``trains_gpt2_medium``: the online branch finetunes GPT-2 355M, which needs a CUDA GPU to finish in
    reasonable time and memory, so the automatic choice takes it only on one. ``device``: where the
    notebook computes (default ``helpers.device()``).
    """
    setting = _flag("LLM_ONLINE")
    if setting is not None:
        return Branch(setting, f"LLM_ONLINE={os.environ['LLM_ONLINE'].strip()}")
    if _flag("HF_HUB_OFFLINE"):
        return Branch(False, "HF_HUB_OFFLINE=1, so the hub is not asked; LLM_ONLINE=1 overrides")
    if quick_mode():
        return Branch(False, "quick mode does not download; LLM_ONLINE=1 takes the online branch")
    if trains_gpt2_medium:
        from helpers.runtime import device as best_device

        where = torch.device(device) if device is not None else best_device()
        if where.type != "cuda":
            return Branch(False, f"no CUDA GPU here ({where.type}) and this branch finetunes GPT-2 355M; "
                                 "LLM_ONLINE=1 takes it anyway")
    return Branch(True, "automatic: the hub is tried; LLM_ONLINE=0 skips it")


# ---------------------------------------------------------------------------------------------
# loading without a traceback


_STATUS_ADVICE = {
    401: "401 Unauthorized: the hub refused the token; check HF_TOKEN or run `hf auth login`",
    403: "403 Forbidden: this token may not read the repository; check its permissions",
    404: "404 Not Found: the repository or revision is not on the hub; check helpers.weights.GPT2_REVISIONS",
    429: "429 Too Many Requests: the hub is rate-limiting this machine; wait and run the cell again",
}


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def hub_failure_reason(error: BaseException) -> str:
    """One line saying why loading from the hub failed and what to do, for any error the hub or network gives."""
    for cause in _causes(error):
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int) and status >= 400:
            if status in _STATUS_ADVICE:
                return f"the hub answered {_STATUS_ADVICE[status]}"
            if status >= 500:
                return f"the hub answered {status} (a server error); try again later"
            return f"the hub answered {status}"
    names = {type(cause).__name__ for cause in _causes(error)}
    if "OfflineModeIsEnabled" in names or _flag("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE=1 and the weights are not in the Hugging Face cache; unset it to download them"
    if any("Timeout" in name for name in names):
        return "the hub did not answer in time (timeout); check the connection or try again later"
    if names & {"ConnectError", "ConnectionError", "ConnectionRefusedError", "RemoteProtocolError", "ReadError",
                "ConnectionResetError", "NetworkError", "ProtocolError", "LocalEntryNotFoundError"}:
        return "the hub could not be reached (no connection, or it dropped); check the network or HF_ENDPOINT"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def try_load_gpt2(name: str, **load_options) -> tuple[GPTModel | None, str]:
    """``(load_gpt2(name, **load_options), where it came from)``, or ``(None, one-line reason)`` if that failed.

    Errors of the hub, the network and the downloaded files all become the reason; errors in the
    arguments (``TypeError``) still raise, since falling back would hide a bug.
    """
    if name not in GPT2_NAMES:
        raise ValueError(f"try_load_gpt2: {name!r} is not a GPT-2 name; use one of {', '.join(GPT2_NAMES)}")
    try:
        model = load_gpt2(name, **load_options)
    except (TypeError, NameError, AttributeError):
        raise
    except Exception as error:  # noqa: BLE001 (every hub or network failure means: fall back)
        return None, hub_failure_reason(error)
    return model, f"{GPT2_NAMES[name]} at revision {GPT2_REVISIONS[name][:7]}"
