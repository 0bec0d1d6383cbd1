"""Checkpoints (Part 07): save_checkpoint / load_checkpoint round trips, damage and mismatches refused."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    model_from_config,
    read_arch,
    read_config,
    save_checkpoint,
)
from helpers.model import GPTConfig, GPTModel

VOCAB = 61


def _cfg(**changes) -> GPTConfig:
    values = {"vocab_size": VOCAB, "context_length": 12, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
              "drop_rate": 0.0, **changes}
    return GPTConfig(**values)


def _model(seed: int = 0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(_cfg(**changes))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _train(model: GPTModel, optimizer: torch.optim.Optimizer, seeds) -> None:
    from helpers.train import calc_loss_batch

    for seed in seeds:
        inputs, targets = _batch(seed)
        calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()
        optimizer.zero_grad()


def _adamw(model: GPTModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys() and state_a["state"]
    for index, entry in state_a["state"].items():
        for key, value in entry.items():
            other = state_b["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, key)


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("target", ["folder", "run/weights.safetensors"])
def test_checkpoint_round_trip_restores_weights_optimizer_and_state(tmp_path, target):
    # given a model and AdamW after two training steps
    model = _model(seed=1)
    optimizer = _adamw(model)
    _train(model, optimizer, seeds=[1, 2])

    # when it is saved (to a folder or a .safetensors path) with extra state, and loaded into fresh objects
    path = tmp_path / target
    weights_path = save_checkpoint(path, model, optimizer, step=2, tokens_seen=48, note="warm",
                                   history={"loss": [3.5, 3.1]}, best=torch.tensor([1.5]))
    restored = _model(seed=99)
    restored_optimizer = _adamw(restored)
    state = load_checkpoint(path, restored, restored_optimizer)

    # then the files are where checkpoint_paths says, and weights, optimizer state and extra state are back
    assert weights_path == checkpoint_paths(path)[0]
    assert weights_path.is_file() and checkpoint_paths(path)[1].is_file()
    if target == "folder":
        assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "model.state.pt"]
    else:
        assert weights_path == path and checkpoint_paths(path)[1].name == "weights.state.pt"
    _assert_same_weights(model, restored)
    _assert_same_optimizer_state(optimizer, restored_optimizer)
    assert state["step"] == 2 and state["tokens_seen"] == 48 and state["note"] == "warm"
    assert state["history"] == {"loss": [3.5, 3.1]}
    assert torch.equal(state["best"], torch.tensor([1.5]))
    assert state["config"] == model.cfg.to_dict()


def test_training_continues_identically_after_loading_a_checkpoint(tmp_path):
    # given a run saved after two steps
    model = _model(seed=1)
    optimizer = _adamw(model)
    _train(model, optimizer, seeds=[1, 2])
    save_checkpoint(tmp_path, model, optimizer, step=2)

    # when the original continues for two steps, and a fresh model loaded from the checkpoint does the same
    _train(model, optimizer, seeds=[3, 4])
    resumed = _model(seed=42)
    resumed_optimizer = _adamw(resumed)
    load_checkpoint(tmp_path, resumed, resumed_optimizer)
    _train(resumed, resumed_optimizer, seeds=[3, 4])

    # then both end with exactly the same weights (AdamW's moments were restored, not restarted)
    _assert_same_weights(model, resumed)


def test_tied_weights_stay_tied_after_loading(tmp_path):
    # given a trained model whose output head shares the token embedding
    model = _model(seed=1, tie_weights=True)
    optimizer = _adamw(model)
    _train(model, optimizer, seeds=[1])

    # when it is saved and loaded into a fresh tied model
    save_checkpoint(tmp_path / "ckpt", model, optimizer, step=1)
    restored = _model(seed=5, tie_weights=True)
    load_checkpoint(tmp_path / "ckpt", restored, _adamw(restored))

    # then the head is still the embedding (one tensor), holding the saved values
    assert restored.out_head.weight is restored.tok_emb.weight
    assert restored.out_head.weight.data_ptr() == restored.tok_emb.weight.data_ptr()
    assert torch.equal(restored.tok_emb.weight, model.tok_emb.weight)
    with torch.no_grad():
        restored.tok_emb.weight[0, 0] = 123.0
    assert restored.out_head.weight[0, 0] == 123.0


def test_checkpoint_of_a_wrapped_model_loads_into_a_bare_one(tmp_path):
    # given a model inside nn.DataParallel (its state_dict names start with "module.")
    model = _model(seed=1)
    save_checkpoint(tmp_path, torch.nn.DataParallel(model), step=0)

    # when it is loaded into a bare model
    restored = _model(seed=2)
    load_checkpoint(tmp_path, restored)

    # then the weights are those of the wrapped model
    _assert_same_weights(model, restored)


def test_restore_rng_continues_the_random_streams_after_the_save(tmp_path):
    # given random generators in some state when a checkpoint is saved
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    torch.rand(3), random.random(), np.random.rand(), np.random.randn()
    model = _model(seed=3)
    torch.manual_seed(11)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    save_checkpoint(tmp_path, model, step=0)
    expected = (torch.rand(5), [random.random() for _ in range(3)], np.random.rand(3), np.random.randn(3))

    # when the generators move on, and the checkpoint is loaded with restore_rng=True
    torch.rand(100), random.random(), np.random.rand(50)
    load_checkpoint(tmp_path, _model(seed=3), restore_rng=True)
    actual = (torch.rand(5), [random.random() for _ in range(3)], np.random.rand(3), np.random.randn(3))

    # then every stream continues from where the save left it
    assert torch.equal(actual[0], expected[0])
    assert actual[1] == expected[1]
    np.testing.assert_array_equal(actual[2], expected[2])
    np.testing.assert_array_equal(actual[3], expected[3])


def test_load_without_restore_rng_leaves_the_random_streams_alone(tmp_path):
    # given a checkpoint saved at one point of the torch stream
    save_checkpoint(tmp_path, _model(seed=3), step=0)
    saved_stream = torch.rand(4)

    # when it is loaded without restore_rng
    target = _model(seed=3)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    load_checkpoint(tmp_path, target)

    # then the stream is where the caller left it, not where the save was
    actual = torch.rand(4)
    assert torch.equal(actual, expected) and not torch.equal(actual, saved_stream)


def test_save_leaves_no_temporary_files(tmp_path):
    # given a folder that receives three saves (the last overwriting the first)
    model = _model(seed=1)
    optimizer = _adamw(model)
    save_checkpoint(tmp_path / "a", model, optimizer, step=1)
    save_checkpoint(tmp_path / "b.safetensors", model, optimizer, step=1)
    save_checkpoint(tmp_path / "a", model, optimizer, step=2)

    # then only the checkpoint files exist, no temporary names beside them
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert found == ["a/model.safetensors", "a/model.state.pt", "b.safetensors", "b.state.pt"]
    assert load_checkpoint(tmp_path / "a", _model())["step"] == 2


# ---------------------------------------------------------------------------------------------
# refusals


def test_state_that_weights_only_cannot_read_is_refused_at_save_time(tmp_path):
    # given extra state holding an arbitrary object (a Path is pickled as a class instance)
    model = _model()

    # when / then saving refuses it, naming the entry, and writes nothing
    with pytest.raises(TypeError, match=r"state\['where'\] is a \w*Path"):
        save_checkpoint(tmp_path / "ckpt", model, step=1, where=Path("/tmp"))
    with pytest.raises(TypeError, match=r"state\['extra'\]\[1\]\['deep'\] is a object"):
        save_checkpoint(tmp_path / "ckpt", model, extra=[1, {"deep": object()}])
    assert not (tmp_path / "ckpt").exists()


class _Payload:
    """A class instance: unpickling it would mean running arbitrary code paths."""


def test_a_state_file_holding_pickled_objects_is_refused_on_load(tmp_path):
    # given a valid checkpoint whose state file is replaced by one that pickles a class instance
    model = _model()
    save_checkpoint(tmp_path, model, step=1)
    weights_path, state_path = checkpoint_paths(tmp_path)
    bundle = torch.load(state_path, weights_only=True)
    bundle["state"]["payload"] = _Payload()
    torch.save(bundle, state_path)

    # when / then loading reads it with weights_only and refuses, naming the state file
    with pytest.raises(CheckpointError, match=str(state_path)):
        load_checkpoint(tmp_path, _model())


@pytest.mark.parametrize("which", ["weights", "state"])
def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path, which):
    # given a checkpoint with one of its two files cut in half
    model = _model(seed=1)
    save_checkpoint(tmp_path, model, _adamw(model), step=1)
    damaged = checkpoint_paths(tmp_path)[0 if which == "weights" else 1]
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])

    # when / then loading raises CheckpointError whose message names the damaged file
    restored = _model(seed=2)
    with pytest.raises(CheckpointError, match=str(damaged)):
        load_checkpoint(tmp_path, restored, _adamw(restored))


@pytest.mark.parametrize("which", ["weights", "state"])
def test_a_missing_checkpoint_file_is_refused_naming_it(tmp_path, which):
    # given an empty folder, and a checkpoint missing one of its files
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "model.safetensors")):
        load_checkpoint(tmp_path / "nothing", _model())
    save_checkpoint(tmp_path, _model(), step=1)
    missing = checkpoint_paths(tmp_path)[0 if which == "weights" else 1]
    missing.unlink()

    # when / then loading raises a CheckpointError (also a FileNotFoundError) naming the missing file
    with pytest.raises(CheckpointError, match=str(missing)) as caught:
        load_checkpoint(tmp_path, _model())
    assert isinstance(caught.value, FileNotFoundError)


@pytest.mark.parametrize(("field", "value"), [("emb_dim", 64), ("n_layers", 1), ("tie_weights", True),
                                              ("vocab_size", 70), ("qkv_bias", True)])
def test_a_checkpoint_of_another_config_is_refused_naming_the_field(tmp_path, field, value):
    # given a checkpoint of the default config
    save_checkpoint(tmp_path, _model(), step=1)
    before = torch.load(checkpoint_paths(tmp_path)[1], weights_only=True)["save_id"]

    # when / then loading it into a model that differs in one field names that field
    other = _model(**{field: value})
    weights_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{field}.*{value}") as caught:
        load_checkpoint(tmp_path, other)
    assert str(checkpoint_paths(tmp_path)[0]) in str(caught.value)
    # and the model was left untouched, the files too
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, weights_before[name]), name
    assert torch.load(checkpoint_paths(tmp_path)[1], weights_only=True)["save_id"] == before


def test_a_model_without_config_gets_shape_errors_naming_the_tensor(tmp_path):
    # given a checkpoint of a plain module, loaded into one whose layer has another size
    saved = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(4, 3, bias=False)))
    save_checkpoint(tmp_path, saved, step=0)
    other = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(4, 5, bias=False)))

    # when / then the error names the tensor and both shapes
    with pytest.raises(CheckpointError, match=r"proj\.weight.*\[3, 4\].*\[5, 4\]"):
        load_checkpoint(tmp_path, other)


def test_weights_and_state_of_different_saves_are_refused(tmp_path):
    # given two saves, and the state file of the second copied beside the weights of the first
    model = _model(seed=1)
    save_checkpoint(tmp_path / "first", model, step=1)
    save_checkpoint(tmp_path / "second", model, step=2)
    first_state = checkpoint_paths(tmp_path / "first")[1]
    first_state.write_bytes(checkpoint_paths(tmp_path / "second")[1].read_bytes())

    # when / then loading says the pair does not belong together
    with pytest.raises(CheckpointError, match="does not belong"):
        load_checkpoint(tmp_path / "first", _model())


def test_loading_an_optimizer_from_a_checkpoint_saved_without_one_is_refused(tmp_path):
    # given a checkpoint saved without an optimizer
    save_checkpoint(tmp_path, _model(), step=1)

    # when / then asking for the optimizer state says it is not there
    model = _model()
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path, model, _adamw(model))


def _modern(seed: int = 0):
    from helpers.modern import ModernConfig, ModernModel

    torch.manual_seed(seed)
    return ModernModel(ModernConfig(vocab_size=VOCAB, context_length=12, emb_dim=32, n_heads=4, n_kv_heads=2,
                                    n_layers=1, hidden_dim=64, head_dim=8, tie_weights=False))


def test_a_modern_checkpoint_records_its_architecture_and_loads_into_a_model_built_from_its_header(tmp_path):
    # given a ModernModel (Part 10) saved with its optimizer
    from helpers.modern import ModernModel

    model = _modern(seed=1)
    optimizer = _adamw(model)
    _train(model, optimizer, seeds=[0])
    save_checkpoint(tmp_path / "ckpt", model, optimizer, step=1)

    # when the header says what to build, and the checkpoint is loaded into that fresh model
    assert read_arch(tmp_path / "ckpt") == "modern"
    fresh = model_from_config(read_config(tmp_path / "ckpt"), read_arch(tmp_path / "ckpt"))
    fresh_optimizer = _adamw(fresh)
    state = load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer)

    # then it is a ModernModel with the saved config, weights and optimizer state
    assert isinstance(fresh, ModernModel) and fresh.cfg == model.cfg and state["step"] == 1
    _assert_same_weights(model, fresh)
    _assert_same_optimizer_state(optimizer, fresh_optimizer)


def test_a_checkpoint_of_one_architecture_is_refused_by_a_model_of_the_other_naming_both(tmp_path):
    # given a modern checkpoint and a GPT-2 one
    save_checkpoint(tmp_path / "modern", _modern())
    save_checkpoint(tmp_path / "gpt2", _model())

    # when / then each is refused by a model of the other architecture, naming both and what to do
    with pytest.raises(CheckpointError, match=r"holds a modern model \(ModernModel\), not a gpt2 one \(GPTModel\).*"
                                              r"model_from_config\(read_config\(path\), read_arch\(path\)\)"):
        load_checkpoint(tmp_path / "modern", _model())
    with pytest.raises(CheckpointError, match=r"holds a gpt2 model \(GPTModel\), not a modern one"):
        load_checkpoint(tmp_path / "gpt2", _modern())
    # and GPT-2's loader refuses the modern one, naming its architecture and the way to load it
    from helpers.weights import WeightsError, load_gpt2

    with pytest.raises(WeightsError, match=r"holds a modern model.*load_gpt2 cannot build.*model_from_config"):
        load_gpt2(tmp_path / "modern" / "model.safetensors")


def test_a_checkpoint_without_an_architecture_is_read_as_gpt2(tmp_path, monkeypatch):
    # given a GPT-2 checkpoint saved as they were before checkpoints named their architecture
    import helpers.checkpoint

    model = _model(seed=2)
    with monkeypatch.context() as patch:
        patch.setattr(helpers.checkpoint, "_arch_of", lambda model: None)
        save_checkpoint(tmp_path / "old", model)

    # when / then it reads as GPT-2, and loads into the GPTModel built from its header
    assert read_arch(tmp_path / "old") == "gpt2"
    fresh = model_from_config(read_config(tmp_path / "old"))
    load_checkpoint(tmp_path / "old", fresh)
    assert isinstance(fresh, GPTModel)
    _assert_same_weights(model, fresh)


def test_read_config_returns_the_saved_config_without_loading_weights(tmp_path):
    # given a checkpoint of a small model
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0,
                    tie_weights=True)
    save_checkpoint(tmp_path / "ckpt", GPTModel(cfg))
    # when its config is read from the header
    config = read_config(tmp_path / "ckpt")
    # then it rebuilds the same config, and a missing checkpoint is refused by name
    assert GPTConfig.from_dict(config) == cfg
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_config(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# crashes during a save


class _Killed(BaseException):
    """Stands for the process dying: nothing after it runs, not even ``except Exception`` blocks."""


def _filled_model(value: float) -> GPTModel:
    model = _model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def _loaded_version(path: Path) -> int:
    """Load the checkpoint at ``path``; check that its weights are the version its state names; return it."""
    model = _model(seed=9)
    step = load_checkpoint(path, model, _adamw(model))["step"]
    for name, parameter in model.named_parameters():
        assert torch.all(parameter == step), f"{name} does not hold version {step}: the pair is mixed"
    return step


@pytest.mark.parametrize(("crash_at_rename", "expected_step"), [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)])
def test_a_save_killed_at_any_rename_leaves_the_previous_or_the_new_checkpoint(tmp_path, monkeypatch,
                                                                                crash_at_rename, expected_step):
    # given a checkpoint of version 1 (every weight 1.0)
    first = _filled_model(1.0)
    save_checkpoint(tmp_path, first, _adamw(first), step=1)
    real_replace, calls = os.replace, []

    def dying_replace(source, target):
        calls.append(target)
        if len(calls) > crash_at_rename:
            raise _Killed
        real_replace(source, target)

    # when the save of version 2 dies at one of its renames (staging the state, the weights in two moves,
    # then the swap of state and weights)
    second = _filled_model(2.0)
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, second, _adamw(second), step=2)
    monkeypatch.setattr(os, "replace", real_replace)

    # then the folder loads as one whole version: the old one before the staged pair is complete, else the new
    assert _loaded_version(tmp_path) == expected_step
    # and the next save finishes cleanly, leaving only the pair
    third = _filled_model(3.0)
    save_checkpoint(tmp_path, third, _adamw(third), step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.state.pt"]
    assert _loaded_version(tmp_path) == 3


_SAVE_LOOP = """
import sys, torch
from helpers.checkpoint import load_checkpoint, save_checkpoint
from helpers.model import GPTConfig, GPTModel
folder, once = sys.argv[1], sys.argv[2] == "once"
model = GPTModel(GPTConfig(vocab_size=4000, context_length=12, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for parameter in model.parameters():
    parameter.grad = torch.ones_like(parameter)
optimizer.step()
try:
    step = load_checkpoint(folder, model, optimizer)["step"]
except FileNotFoundError:
    step = 0
while True:
    step += 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(step)
    save_checkpoint(folder, model, optimizer, step=step)
    print(step, flush=True)
    if once:
        break
"""


def _big_model_version(path: Path) -> int:
    cfg = GPTConfig(vocab_size=4000, context_length=12, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    model = GPTModel(cfg)
    step = load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))["step"]
    for name, parameter in model.named_parameters():
        assert torch.all(parameter == step), f"{name} does not hold version {step}: the pair is mixed"
    return step


@pytest.mark.slow
def test_a_process_killed_with_sigkill_while_saving_always_leaves_a_loadable_checkpoint(tmp_path):
    # given a process that saves versions 1, 2, 3, ... of a model (every weight = its version) in a loop
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    last_loaded = 0
    for _ in range(4):
        process = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(tmp_path), "loop"], cwd=root, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = process.stdout.readline()  # a first save of this process is done
            assert first.strip().isdigit(), process.stderr.read()[-2000:] if process.poll() is not None else first
            printed = [int(first)]
            # when SIGKILL arrives at a random moment of the saves that follow
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            process.kill()
            process.wait(timeout=60)
        printed += [int(line) for line in process.stdout.read().split()]
        process.stdout.close()
        process.stderr.close()
        # then the folder loads as one whole version: the last one reported, or the one being saved after it
        loaded = _big_model_version(tmp_path)
        assert printed[-1] <= loaded <= printed[-1] + 1 and loaded > last_loaded
        last_loaded = loaded

    # and one more save (a fresh process) leaves only the pair: no staged or temporary file survives
    finished = subprocess.run([sys.executable, "-c", _SAVE_LOOP, str(tmp_path), "once"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.state.pt"], finished.stderr
    assert _big_model_version(tmp_path) == last_loaded + 1


# ---------------------------------------------------------------------------------------------
# the optimizer's class


def _trained_adamw_checkpoint(folder: Path) -> None:
    model = _model(seed=1)
    optimizer = _adamw(model)
    _train(model, optimizer, [0])
    save_checkpoint(folder, model, optimizer, step=1)


@pytest.mark.parametrize("other", [torch.optim.SGD, torch.optim.Adam])
def test_adamw_state_is_refused_by_another_optimizer_class_naming_both(tmp_path, other):
    # given a checkpoint of a model trained one step with AdamW
    _trained_adamw_checkpoint(tmp_path)

    # when / then loading it into an SGD or Adam optimizer is refused naming both classes, before any weight changes
    model = _model(seed=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"AdamW optimizer.*a {other.__name__} cannot"):
        load_checkpoint(tmp_path, model, other(model.parameters(), lr=0.1))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_checkpoint_without_the_class_name_is_checked_by_the_optimizer_settings(tmp_path):
    # given an AdamW checkpoint as saved before the class name was stored
    _trained_adamw_checkpoint(tmp_path)
    _, state_path = checkpoint_paths(tmp_path)
    bundle = torch.load(state_path, weights_only=True)
    bundle.pop("optimizer_class", None)
    torch.save(bundle, state_path)

    # when / then an SGD is refused naming what its settings lack (not a KeyError at its first step) and keeps
    # its own settings, and an AdamW still loads it
    model = _model(seed=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="lack dampening, momentum.*another optimizer class"):
        load_checkpoint(tmp_path, model, sgd)
    assert sgd.param_groups[0]["momentum"] == 0.9
    adamw = _adamw(model)
    assert load_checkpoint(tmp_path, model, adamw)["step"] == 1
    assert adamw.state_dict()["state"]


# ---------------------------------------------------------------------------------------------
# one writer per folder, and readers during a save


_HOLD_LOCK = """
import sys
import threading
from helpers.checkpoint import checkpoint_lock
with checkpoint_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _lock_holder(folder: Path) -> subprocess.Popen:
    """A process holding the checkpoint lock of ``folder`` until its stdin is closed."""
    process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], cwd=Path(__file__).parent.parent,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    return process


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    from helpers.checkpoint import CheckpointLockedError

    model = _model()
    save_checkpoint(tmp_path, model, step=1)

    # given another process holding the folder's lock
    holder = _lock_holder(tmp_path)
    try:
        # when / then a save is refused naming the holder's process id and host, and the checkpoint is untouched
        with pytest.raises(CheckpointLockedError, match=rf"process {holder.pid} on {socket.gethostname()}"):
            save_checkpoint(tmp_path, model, step=2)
        assert load_checkpoint(tmp_path, _model())["step"] == 1
    finally:
        holder.communicate("\n", timeout=60)  # a normal exit
    # and once it exits normally, its lock is gone and the save goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.state.pt"]
    save_checkpoint(tmp_path, model, step=2)

    # given a holder killed with SIGKILL: its lock file stays behind, naming a dead process
    holder = _lock_holder(tmp_path)
    holder.kill()
    holder.communicate(timeout=60)
    assert (tmp_path / "model.lock").is_file()

    # when / then the next save takes the stale lock over, and leaves only the pair
    save_checkpoint(tmp_path, model, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.state.pt"]
    assert load_checkpoint(tmp_path, _model())["step"] == 3


def test_two_writer_threads_get_a_clear_refusal_or_a_whole_save(tmp_path):
    from helpers.checkpoint import CheckpointLockedError

    # given two threads saving 15 versions each into one folder at the same time
    outcomes: list[str] = []

    def writer(offset: int) -> None:
        model = _model()
        for version in range(15):
            try:
                save_checkpoint(tmp_path, model, step=offset + version)
                outcomes.append("saved")
            except CheckpointLockedError as error:
                assert "another thread of process" in str(error)
                outcomes.append("refused")
            except Exception as error:  # noqa: BLE001 (any other failure is the finding)
                outcomes.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in (0, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # then each save either went through whole or was refused naming the holder, and the folder loads
    assert sorted(set(outcomes)) <= ["refused", "saved"], outcomes
    assert "saved" in outcomes
    assert load_checkpoint(tmp_path, _model())["step"] in range(200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.state.pt"]


def test_loads_during_saves_read_a_whole_version(tmp_path):
    # given a thread saving versions 2, 3, ... (every weight = its version) as fast as it can, until the
    # reader below has loaded 10 times (a load that meets a save waits for it, so on a busy machine few
    # loads fit into a fixed number of saves) or 400 versions were written
    first = _filled_model(1.0)
    save_checkpoint(tmp_path, first, _adamw(first), step=1)
    done = threading.Event()
    failures: list[str] = []
    loaded: list[int] = []

    def writer() -> None:
        try:
            for version in range(2, 401):
                if len(loaded) >= 10:
                    break
                model = _filled_model(float(version))
                save_checkpoint(tmp_path, model, _adamw(model), step=version)
        except Exception as error:  # noqa: BLE001
            failures.append(f"writer: {type(error).__name__}: {error}")
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()

    # when the main thread loads the folder again and again meanwhile
    try:
        while not done.is_set():
            loaded.append(_loaded_version(tmp_path))
    except Exception as error:  # noqa: BLE001
        failures.append(f"reader after {len(loaded)} loads: {type(error).__name__}: {error}")
    thread.join(timeout=120)

    # then every load read one whole version (weights and state of the same save), never an error
    assert not failures, failures
    assert len(loaded) >= 10 and loaded == sorted(loaded)
