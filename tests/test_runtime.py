"""helpers.runtime: device choice, quick mode, seeding, headline numbers."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runtime import (
    autocast,
    compute_dtype,
    device,
    eval_mode,
    peak_flops,
    project_root,
    quick_mode,
    record_results,
    unwrap_model,
)


def test_device_honours_llm_device(monkeypatch):
    monkeypatch.setenv("LLM_DEVICE", "cpu")
    assert device() == torch.device("cpu")


def test_device_prefers_cuda_when_available(monkeypatch):
    monkeypatch.delenv("LLM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device() == torch.device("cuda")


def test_device_falls_back_to_cpu(monkeypatch):
    monkeypatch.delenv("LLM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device() == torch.device("cpu")


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), (" Yes ", True), ("0", False),
                                                 ("", False), ("no", False)])
def test_quick_mode_reads_llm_quick(monkeypatch, value, expected):
    monkeypatch.setenv("LLM_QUICK", value)
    assert quick_mode() is expected


def test_eval_mode_switches_off_dropout_and_restores_the_mode_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_unwrap_model_sees_through_dataparallel_and_compile():
    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(inner)) is inner
    assert unwrap_model(torch.compile(inner)) is inner
    assert unwrap_model(inner) is inner


def test_precision_auto_is_float32_on_a_cpu_and_named_precisions_are_kept():
    assert compute_dtype("cpu", "auto") == torch.float32
    assert compute_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        compute_dtype("cpu", "bf16")


@pytest.mark.parametrize(("gpu", "capability", "expected"), [
    ("A100", (8, 0), torch.bfloat16), ("H100", (9, 0), torch.bfloat16),
    ("T4, which emulates bfloat16", (7, 5), torch.float32), ("V100", (7, 0), torch.float32)])
def test_precision_auto_is_bfloat16_only_where_the_gpu_computes_it_natively(monkeypatch, gpu, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # a T4 says so too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert compute_dtype("cuda", "auto") == expected, gpu


def test_autocast_bfloat16_on_cpu_computes_matmuls_in_bfloat16():
    a = torch.randn(4, 4)
    with autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32


def test_peak_flops_prefers_the_override_then_the_environment(monkeypatch):
    assert peak_flops("cpu", 5e12) == (5e12, "given")
    monkeypatch.setenv("LLM_PEAK_FLOPS", "7e12")
    assert peak_flops("cpu") == (7e12, "LLM_PEAK_FLOPS")
    monkeypatch.setenv("LLM_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="LLM_PEAK_FLOPS"):
        peak_flops("cpu")


def test_project_root_is_the_checkout():
    root = project_root()
    assert root is not None
    assert (root / "pyproject.toml").is_file()
    assert (root / "helpers" / "runtime.py").is_file()


def test_record_results_writes_the_numbers_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("LLM_QUICK", "1")
    path = record_results("part02_tokenization", {"vocab_size": 1130, "tokens": 5145})
    assert path == tmp_path / "results" / "part02_tokenization.json"
    assert json.loads(path.read_text()) == {
        "notebook": "part02_tokenization", "quick": True, "vocab_size": 1130, "tokens": 5145,
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["part02_tokenization.json"]


def test_process_alive_tells_a_running_process_from_a_finished_one():
    import os
    import subprocess
    import sys

    from helpers.runtime import process_alive

    # given this process, and one that has exited (its id is free, barring reuse)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)

    # then only this one is alive; ids no process can have are not
    assert process_alive(os.getpid())
    assert not process_alive(int(finished.stdout))
    assert not process_alive(0) and not process_alive(-1) and not process_alive(2**70)
