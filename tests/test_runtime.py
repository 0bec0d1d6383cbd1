"""helpers.runtime: device choice, quick mode, seeding, headline numbers."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runtime import device, project_root, quick_mode, record_results, seed_everything


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


def test_seed_everything_makes_torch_draws_repeat():
    seed_everything(11)
    first = torch.randn(5)
    seed_everything(11)
    assert torch.equal(torch.randn(5), first)


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
