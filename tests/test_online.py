"""helpers.online: the one rule for online or offline, and every hub failure ending in the offline fallback.

The hub is the stand-in of scripts/stand_in_hub.py on 127.0.0.1, with an empty Hugging Face cache:
nothing here reaches the internet.
"""

from __future__ import annotations

import itertools
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from helpers.online import Branch, choose_branch, hub_failure_reason, try_load_gpt2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from stand_in_hub import FAILURES, start_hub, write_repos  # noqa: E402


@pytest.fixture(autouse=True)
def automatic(monkeypatch):
    """No switch set: each test sets what it means."""
    for name in ("LLM_ONLINE", "HF_HUB_OFFLINE", "LLM_QUICK"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# the switch


@pytest.mark.parametrize(("value", "online"), [("1", True), ("on", True), ("0", False), ("off", False)])
def test_llm_online_decides_whatever_the_machine(monkeypatch, value, online):
    monkeypatch.setenv("LLM_ONLINE", value)
    monkeypatch.setenv("LLM_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    branch = choose_branch(trains_gpt2_medium=True, device="cpu")
    assert branch == Branch(online, f"LLM_ONLINE={value}")


def test_unset_the_gpt2_medium_branch_is_taken_only_on_a_gpu():
    on_cpu = choose_branch(trains_gpt2_medium=True, device="cpu")
    on_gpu = choose_branch(trains_gpt2_medium=True, device="cuda")
    assert not on_cpu.online and "no CUDA GPU" in on_cpu.reason and "LLM_ONLINE=1" in on_cpu.reason
    assert on_gpu.online
    assert choose_branch(trains_gpt2_medium=False, device="cpu").online  # GPT-2 124M: a CPU will do


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "LLM_QUICK"])
def test_unset_offline_mode_and_quick_mode_never_download(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    branch = choose_branch(device="cuda")
    assert not branch.online and "LLM_ONLINE=1" in branch.reason


def readme_branch(llm_online: str | None, hub_offline: bool, quick: bool, trains_355m: bool, cuda: bool) -> bool:
    """The rule as README.md states it ("Online or offline"), restated here as the reference:

    "`LLM_ONLINE=1` or `0` if set; unset, online unless quick mode or `HF_HUB_OFFLINE=1` says otherwise,
    and for the two notebooks that finetune GPT-2 355M only on a CUDA GPU."
    """
    if llm_online is not None:
        return llm_online == "1"
    if quick or hub_offline:
        return False
    return cuda or not trains_355m


SETTINGS = list(itertools.product([None, "1", "0"], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize(("llm_online", "hub_offline", "quick", "trains_355m", "cuda"), SETTINGS,
                         ids=lambda value: {None: "unset", True: "y", False: "n"}.get(value, value))
def test_every_combination_of_switches_takes_the_branch_readme_states(monkeypatch, llm_online, hub_offline, quick,
                                                                       trains_355m, cuda):
    # given each switch set or unset (LLM_QUICK too: make test sets it, which alone would force offline),
    # and a machine with or without a CUDA GPU (the device found, not passed)
    for name, value in (("LLM_ONLINE", llm_online), ("HF_HUB_OFFLINE", "1" if hub_offline else None),
                        ("LLM_QUICK", "1" if quick else None)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    # when the branch is chosen
    branch = choose_branch(trains_gpt2_medium=trains_355m)

    # then it is README's, and an automatic offline choice says why and how to override it
    assert branch.online == readme_branch(llm_online, hub_offline, quick, trains_355m, cuda)
    if llm_online is not None:
        assert branch.reason == f"LLM_ONLINE={llm_online}"
    elif not branch.online:
        cause = "HF_HUB_OFFLINE=1" if hub_offline else "quick mode" if quick else "no CUDA GPU here (cpu)"
        assert branch.reason.startswith(cause) and "LLM_ONLINE=1" in branch.reason, branch.reason


def test_offline_mode_is_the_reason_a_hub_error_gives_by_its_type_or_by_the_switch(monkeypatch):
    # given huggingface_hub's own errors: the one it raises in offline mode, and a cache miss
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline_error = OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    cache_miss = LocalEntryNotFoundError("the file is not in the cache")
    wrapped = RuntimeError("loading failed")
    wrapped.__cause__ = offline_error

    # when / then offline mode is named, whether the error says so (even wrapped) or HF_HUB_OFFLINE=1 does
    says = "HF_HUB_OFFLINE=1 and the weights are not in the Hugging Face cache; unset it to download them"
    assert hub_failure_reason(offline_error) == says
    assert hub_failure_reason(wrapped) == says
    assert "could not be reached" in hub_failure_reason(cache_miss)  # online, a miss is the network's doing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_failure_reason(cache_miss) == says


def test_a_switch_that_is_neither_on_nor_off_is_refused_with_the_values_to_use(monkeypatch):
    monkeypatch.setenv("LLM_ONLINE", "maybe")
    with pytest.raises(ValueError, match="LLM_ONLINE=1 .online., LLM_ONLINE=0 .offline."):
        choose_branch()


def test_the_printed_line_names_the_branch_and_why():
    branch = Branch(True, "LLM_ONLINE=1")
    assert branch.line("GPT-2", "ours") == "ONLINE (LLM_ONLINE=1): GPT-2"
    assert branch.fallback("the hub answered 500").line("GPT-2", "ours") == \
        "OFFLINE (the hub answered 500; fell back to offline): ours"


def test_try_load_gpt2_refuses_a_name_that_is_not_gpt2():
    with pytest.raises(ValueError, match="not a GPT-2 name"):
        try_load_gpt2("gpt3")


# ---------------------------------------------------------------------------------------------
# against the stand-in hub


@pytest.fixture
def hub_client(monkeypatch, tmp_path):
    """Point huggingface_hub (already imported, so its constants are set) at a hub and an empty cache."""
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http as http

    no_waiting = types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None})

    def point_at(hub):
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # the timeout test waits 1 s, not 10
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
        monkeypatch.setattr(file_download, "_ETAG_RETRY_TIMEOUT", 1)
        monkeypatch.setattr(http, "time", no_waiting)  # the client's retries do not wait 1, 2, 4, 8, 8 s
        hub.hang_seconds = 2  # longer than the client's timeout
        return hub

    hubs = []
    yield lambda folder, failure=None: point_at(hubs.append(start_hub(folder, failure)) or hubs[-1])
    for hub in hubs:
        hub.shutdown()
        hub.server_close()


@pytest.fixture(scope="session")
def stand_in_repos(tmp_path_factory):
    return write_repos(tmp_path_factory.mktemp("stand-in-hub"), "quick")


@pytest.mark.slow
def test_gpt2_loads_from_the_stand_in_hub_at_the_pinned_revision_and_equals_transformers(hub_client, stand_in_repos):
    from transformers import GPT2LMHeadModel

    hub = hub_client(stand_in_repos)
    model, source = try_load_gpt2("gpt2")
    assert model is not None, source
    assert source == "openai-community/gpt2 at revision 607a30d"
    assert any("/resolve/607a30d783dfa663caf39e06633721c8d4cfcd7e/model.safetensors" in r for r in hub.requests)
    reference = GPT2LMHeadModel.from_pretrained(stand_in_repos / "openai-community" / "gpt2").eval()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("failure", "says"), [
    ("401", "401 Unauthorized"), ("403", "403 Forbidden"), ("404", "404 Not Found"), ("500", "500 (a server error)"),
    ("drop", "could not be reached"), ("timeout", "did not answer in time")])
def test_every_hub_failure_ends_in_the_fallback_with_a_one_line_reason(hub_client, tmp_path, failure, says):
    assert failure in FAILURES
    hub_client(tmp_path, failure)
    model, reason = try_load_gpt2("gpt2")
    assert model is None
    assert says in reason and "\n" not in reason and len(reason) < 200, reason


def test_offline_mode_without_a_cache_ends_in_the_fallback(hub_client, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub_client(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, reason = try_load_gpt2("gpt2")
    assert model is None and reason.startswith("HF_HUB_OFFLINE=1 and the weights are not in the Hugging Face cache")


def test_a_reason_is_one_line_even_for_an_error_nobody_foresaw():
    reason = hub_failure_reason(RuntimeError("first line\nsecond line " + "x" * 500))
    assert reason.startswith("RuntimeError: first line second line") and "\n" not in reason and len(reason) < 200


# ---------------------------------------------------------------------------------------------
# Colab


TRAINS = {"part08_pretrained_weights", "part09_finetuning_classification", "part09_finetuning_instructions",
          "part09_finetuning_preferences", "part10_modern_llm", "part11_finetuning_a_real_model"}


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("part*.ipynb")), ids=lambda path: path.stem)
def test_every_notebook_opens_on_colab_with_python3_and_the_training_ones_ask_for_a_gpu(path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"] == {"display_name": "Python 3", "language": "python", "name": "python3"}
    wants_gpu = path.stem in TRAINS
    assert (notebook.metadata.get("accelerator") == "GPU") == wants_gpu
    assert (notebook.metadata.get("colab", {}).get("gpuType") == "T4") == wants_gpu
    setup = notebook.cells[1].source
    assert "requirements.txt" in setup and '"torch"' in setup and "REPO_URL" in setup.split("raise RuntimeError")[1]

