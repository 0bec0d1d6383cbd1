"""The architecture table: every entry resolves to real classes and loaders, and Part 07 never imports Part 10."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.architectures import (
    ARCHITECTURES,
    UnknownArchitectureError,
    architecture_of,
    get_architecture,
    model_from_config,
    preset_architecture,
)
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel
from helpers.modern import MODERN_CONFIGS, ModernConfig, ModernModel

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def test_each_entry_names_its_real_classes_presets_init_and_loaders():
    gpt2, modern = get_architecture("gpt2"), get_architecture("modern")
    assert (gpt2.model, gpt2.config, gpt2.preset_configs) == (GPTModel, GPTConfig, GPT_CONFIGS)
    assert (modern.model, modern.config, modern.preset_configs) == (ModernModel, ModernConfig, MODERN_CONFIGS)
    for arch in ARCHITECTURES.values():
        assert callable(arch.init_weights)
        assert (HELPERS.parent / "notebooks" / f"{arch.part}.ipynb").is_file()
        for entry in arch.loaders:
            assert callable(arch.loader(entry.split(":")[1]))
    from helpers.modern_weights import load_llama
    from helpers.weights import load_gpt2
    assert gpt2.loader("load_gpt2") is load_gpt2 and modern.loader("load_llama") is load_llama


def test_a_model_and_its_config_are_recognised_and_rebuilt_from_the_config_dict():
    tiny_gpt = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    tiny_modern = ModernModel(ModernConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_kv_heads=1,
                                           head_dim=8, hidden_dim=32, n_layers=1))
    for model, name in ((tiny_gpt, "gpt2"), (tiny_modern, "modern")):
        assert architecture_of(model) == architecture_of(model.cfg) == name
        rebuilt = model_from_config(model.cfg.to_dict(), name)
        assert type(rebuilt) is type(model) and rebuilt.cfg == model.cfg
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}
    assert architecture_of(torch.nn.Linear(2, 2)) is None
    assert architecture_of({"emb_dim": 16}) is None


def test_presets_belong_to_their_architecture():
    assert preset_architecture("gpt2-medium") == "gpt2"
    assert preset_architecture("qwen3-0.6b") == "modern"
    assert preset_architecture("gpt5") is None


def test_an_unknown_architecture_or_loader_is_refused_naming_the_known_ones():
    with pytest.raises(UnknownArchitectureError, match="gpt2, modern"):
        get_architecture("mamba")
    with pytest.raises(UnknownArchitectureError, match="load_qwen3"):
        get_architecture("modern").loader("load_gpt2")


def test_importing_the_checkpoint_and_pretraining_modules_does_not_import_part_10():
    code = ("import sys, helpers.checkpoint, helpers.pretrain, helpers.architectures\n"
            "from helpers.architectures import architecture_of\n"
            "from helpers.model import GPTConfig\n"
            "architecture_of(GPTConfig())\n"
            "print('helpers.modern' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["checkpoint.py", "checkpoint_files.py", "checkpoint_lock.py", "pretrain.py",
                                    "pretrain_options.py", "pretrain_config.py", "distributed.py"])
def test_part_07_modules_import_no_model_by_hand(module):
    tree = ast.parse((HELPERS / module).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    models = {arch.module for arch in ARCHITECTURES.values()}
    assert not imported & models, f"{module} imports {imported & models}: ask helpers.architectures instead"
