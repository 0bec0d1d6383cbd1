"""``python -m helpers.pretrain``: files, exact resume, the lr schedule, torchrun, Ctrl-C, the token cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers.checkpoint import load_checkpoint, model_from_config, read_arch, read_config
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel
from helpers.modern import ModernConfig, ModernModel
from helpers.pretrain import flops_per_token, main
from helpers.train import learning_rate_at

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layers", "1", "--n-heads", "2", "--emb-dim", "32", "--context-length", "16"]
# --peak-flops skips the one-second CPU matmul benchmark that MFU would otherwise run at start-up
FAST = ["--device", "cpu", "--peak-flops", "1e12", "--log-every", "1", "--eval-batches", "2", "--seed", "7"]
SCHEDULE = ["--lr", "1e-3", "--warmup-steps", "2", "--decay-steps", "6", "--dropout", "0.1"]
TINY_CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with The Verdict as a text file, and LLM_CACHE_DIR pointing into it for the whole module."""
    from helpers.data import read_text

    root = tmp_path_factory.mktemp("pretrain")
    (root / "data").mkdir()
    (root / "data" / "verdict.txt").write_text(read_text("the-verdict"), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_CACHE_DIR", str(root / "cache"))
        yield root


def _pretrain(workspace: Path, out: Path, max_steps: int, *extra: str, quiet: bool = True) -> int:
    argv = ["--data", str(workspace / "data" / "verdict.txt"), "--out", str(out),
            "--max-steps", str(max_steps), "--batch-size", "4", "--eval-every", "4", *TINY, *FAST, *extra]
    return main(argv + (["--quiet"] if quiet else []))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _max_abs_diff(a: Path, b: Path) -> float:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(workspace) -> Path:
    """8 steps in one go, with dropout, warmup and cosine decay."""
    out = workspace / "full"
    assert _pretrain(workspace, out, 8, *SCHEDULE) == 0
    return out


@pytest.fixture(scope="module")
def split_run(workspace) -> tuple[Path, list[dict]]:
    """The same run as ``full_run`` stopped at step 4 and resumed to 8; also the log of the 4-step run."""
    out = workspace / "split"
    assert _pretrain(workspace, out, 4, *SCHEDULE) == 0
    four_step_log = _log(out)
    assert _pretrain(workspace, out, 8, *SCHEDULE, "--resume") == 0
    return out, four_step_log


@pytest.fixture(scope="module")
def modern_full_run(workspace) -> Path:
    """``full_run`` with ``--arch modern``: 8 steps of Part 10's model at the same tiny sizes."""
    out = workspace / "modern-full"
    assert _pretrain(workspace, out, 8, *SCHEDULE, "--arch", "modern") == 0
    return out


# ---------------------------------------------------------------------------------------------
# a run and its files


def test_a_run_writes_weights_state_and_a_log_of_losses(full_run):
    # given a finished 8-step run (log every step, validation every 4)
    records = _log(full_run)

    # then the checkpoint pair exists, and loads with the step and tokens seen
    assert (full_run / "model.safetensors").is_file() and (full_run / "model.state.pt").is_file()
    state = load_checkpoint(full_run, GPTModel(TINY_CFG))
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 4 * 16
    # and the log has a finite training loss per step, and validation losses at steps 4 and 8
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and 9.0 < r["loss"] < 11.5 for r in losses)  # about ln(50257) = 10.8
    assert [r["tokens_seen"] for r in losses] == [64 * s for s in range(1, 9)]
    validation = [(r["step"], np.isfinite(r["val_loss"])) for r in records if "val_loss" in r]
    assert validation == [(4, True), (8, True)]
    # and nothing but these files is in the folder
    assert sorted(p.name for p in full_run.iterdir()) == ["log.jsonl", "model.safetensors", "model.state.pt"]


def test_resuming_halfway_gives_the_weights_of_an_uninterrupted_run(full_run, split_run):
    # given 8 steps in one go, and 4 steps then --resume to 8 (dropout 0.1, warmup and cosine decay)
    split_out, _ = split_run

    # then the final weights agree, and so do the logged losses and learning rates of steps 5 to 8
    assert _max_abs_diff(full_run / "model.safetensors", split_out / "model.safetensors") <= 1e-6
    full = {r["step"]: r for r in _log(full_run) if "loss" in r}
    split = {r["step"]: r for r in _log(split_out) if "loss" in r}
    assert sorted(split) == list(range(1, 9))
    for step in range(5, 9):
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6)
        assert split[step]["lr"] == pytest.approx(full[step]["lr"], rel=1e-12)
        assert split[step]["tokens_seen"] == full[step]["tokens_seen"]
    state = load_checkpoint(split_out, GPTModel(TINY_CFG))
    assert state["step"] == 8


def test_learning_rate_schedule_does_not_depend_on_max_steps(full_run, split_run):
    # given the log of a 4-step run and that of an 8-step run with the same schedule options
    _, four_step_log = split_run
    short = [(r["step"], r["lr"]) for r in four_step_log if "lr" in r]
    long = [(r["step"], r["lr"]) for r in _log(full_run) if "lr" in r]

    # then the rates at steps 1-4 are the same, and follow learning_rate_at (warmup 2, decay 6, min lr/10)
    assert [step for step, _ in short] == [1, 2, 3, 4]
    assert short == long[:4]
    expected = [learning_rate_at(step - 1, 1e-3, 2, 6, 1e-4) for step in range(1, 9)]
    assert [lr for _, lr in long] == pytest.approx(expected, rel=1e-12)
    assert long[1][1] == pytest.approx(1e-3)  # the peak after the warmup
    assert long[0][1] == pytest.approx(5e-4)


def test_arch_modern_trains_a_modern_model_that_loads_from_its_checkpoint(modern_full_run):
    # given a finished 8-step run with --arch modern (tiny sizes, GPT-2's vocabulary)
    losses = [r["loss"] for r in _log(modern_full_run) if "loss" in r]

    # then its training losses are finite, start near ln(50257) = 10.8 and fall
    assert len(losses) == 8 and all(np.isfinite(losses)) and 9.0 < losses[0] < 11.5
    assert losses[-1] < losses[0]
    # and the checkpoint names its architecture, and loads into the ModernModel its header describes
    assert read_arch(modern_full_run) == "modern"
    model = model_from_config(read_config(modern_full_run), read_arch(modern_full_run))
    assert isinstance(model, ModernModel)
    assert model.cfg == ModernConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_kv_heads=1,
                                     n_layers=1, hidden_dim=64, head_dim=16, rope_theta=10_000.0, qk_norm=True,
                                     tie_weights=False, drop_rate=0.1)
    assert load_checkpoint(modern_full_run, model)["step"] == 8


def test_resuming_a_modern_run_halfway_gives_the_weights_of_an_uninterrupted_run(modern_full_run, workspace):
    # given --arch modern stopped at step 4, then resumed to 8 without --arch (the saved run's is kept)
    out = workspace / "modern-split"
    assert _pretrain(workspace, out, 4, *SCHEDULE, "--arch", "modern") == 0
    assert _pretrain(workspace, out, 8, *SCHEDULE, "--resume") == 0

    # then the weights and the losses of steps 5 to 8 are those of the uninterrupted run
    assert _max_abs_diff(modern_full_run / "model.safetensors", out / "model.safetensors") <= 1e-6
    full = {r["step"]: r["loss"] for r in _log(modern_full_run) if "loss" in r}
    split = {r["step"]: r["loss"] for r in _log(out) if "loss" in r}
    assert [split[step] for step in range(5, 9)] == pytest.approx([full[step] for step in range(5, 9)], abs=1e-6)


@pytest.mark.parametrize(("run", "options", "named"), [
    ("gpt2", ["--arch", "modern"], "--arch modern (saved: gpt2)"),
    ("gpt2", ["--preset", "qwen3-0.6b"], "--preset qwen3-0.6b (a modern model) (saved: gpt2)"),
    ("gpt2", ["--n-kv-heads", "1"], "--n-kv-heads 1 (saved: a gpt2 model, which has no n_kv_heads)"),
    ("modern", ["--arch", "gpt2"], "--arch gpt2 (saved: modern)"),
    ("modern", ["--no-qk-norm"], "--no-qk-norm (saved: True)"),
])
def test_resume_with_another_architecture_is_refused_and_touches_nothing(full_run, modern_full_run, workspace,
                                                                         tmp_path, capsys, run, options, named):
    # given a copy of a finished run of one architecture
    out = tmp_path / "run"
    shutil.copytree(full_run if run == "gpt2" else modern_full_run, out)
    before = _snapshot(out)

    # when / then resuming it as the other architecture (or with the other's options) is refused before the first step
    assert _pretrain(workspace, out, 10, "--resume", *options) == 2
    assert named in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(("options", "named"), [
    (["--n-kv-heads", "2"], "--n-kv-heads 2 sets the modern model"),
    (["--arch", "gpt2", "--no-qk-norm"], "--no-qk-norm sets the modern model"),
    (["--arch", "gpt2", "--preset", "llama3.2-1b"], "--preset llama3.2-1b is a modern model: pass --arch modern"),
    (["--arch", "modern", "--head-dim", "7"], "--head-dim must be an even integer"),
])
def test_options_of_the_other_architecture_are_refused_before_any_work(workspace, tmp_path, capsys, options, named):
    # when / then a new run with options its architecture has no place for is refused, naming them
    assert _pretrain(workspace, tmp_path / "out", 2, *options) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_modern_model_of_default_sizes_has_within_5_percent_of_gpt2s_parameters(workspace, tmp_path, capsys):
    # given Part 07's novel model (4 layers, 4 heads, width 256, context 256, tied head) run for one step as
    # GPT-2 and as a modern model from the same size options
    sizes = ["--n-layers", "4", "--n-heads", "4", "--emb-dim", "256", "--context-length", "256", "--tie-weights"]
    counts = {}
    for arch in ("gpt2", "modern"):
        argv = ["--data", str(workspace / "data" / "verdict.txt"), "--out", str(tmp_path / arch), "--max-steps", "1",
                "--batch-size", "1", "--eval-every", "0", "--val-fraction", "0", *FAST, *sizes, "--arch", arch]
        assert main(argv) == 0
        printed = re.search(r"model ([\d.]+)M parameters (\w+)\(", capsys.readouterr().out)
        counts[arch] = float(printed.group(1))
        assert printed.group(2) == {"gpt2": "GPTConfig", "modern": "ModernConfig"}[arch]

    # then the command prints 16.1M and 15.8M: within 5% (the embedding is most of both)
    assert counts == {"gpt2": 16.1, "modern": 15.8}
    assert abs(counts["modern"] / counts["gpt2"] - 1) < 0.05
    # and without the tied head too (counted on the meta device): 28,953,600 and 28,683,520
    with torch.device("meta"):
        gpt2 = GPTModel(GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4))
        modern = ModernModel(ModernConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_kv_heads=2,
                                          n_layers=4, hidden_dim=704, head_dim=64, tie_weights=False))
    n_gpt2, n_modern = (sum(p.numel() for p in m.parameters()) for m in (gpt2, modern))
    assert abs(n_modern / n_gpt2 - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# refusals


def test_resume_without_a_checkpoint_fails_clearly_and_touches_nothing(workspace, tmp_path, capsys):
    # given an --out folder holding a file but no checkpoint, and one that does not exist
    (tmp_path / "notes.txt").write_text("keep me")

    # when / then --resume refuses both, saying there is no checkpoint, and writes nothing
    assert _pretrain(workspace, tmp_path, 2, "--resume") == 2
    assert re.search("--resume.*no checkpoint", capsys.readouterr().err)
    assert _snapshot(tmp_path) == {"notes.txt": b"keep me"}
    assert _pretrain(workspace, tmp_path / "missing", 2, "--resume") == 2
    assert re.search("--resume.*no checkpoint", capsys.readouterr().err)
    assert not (tmp_path / "missing").exists()


def test_a_second_run_into_a_used_out_folder_fails_clearly_and_keeps_the_run(full_run, workspace, tmp_path, capsys):
    # given a copy of a finished run
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = _snapshot(out)

    # when a new run (without --resume) is pointed at it
    assert _pretrain(workspace, out, 2) == 2
    assert re.search("already holds a run.*--resume", capsys.readouterr().err)

    # then every file is as it was
    assert _snapshot(out) == before


def test_resume_with_other_model_sizes_is_refused_naming_the_option(full_run, workspace, tmp_path, capsys):
    # given a copy of a finished run with emb_dim 32
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = _snapshot(out)

    # when / then resuming it with --emb-dim 64 names the clash, and nothing changes
    assert _pretrain(workspace, out, 10, "--resume", "--emb-dim", "64") == 2
    assert re.search(r"--emb-dim 64 \(saved: 32\)", capsys.readouterr().err)
    assert _snapshot(out) == before


def test_a_diverging_run_stops_with_exit_code_1_and_saves_nothing(workspace, tmp_path, capsys):
    # given an absurd learning rate (1e30; inf itself is refused up front): step 1 is finite, the update ruins
    # the weights
    out = tmp_path / "diverged"

    # when it runs
    code = _pretrain(workspace, out, 5, "--lr", "1e30", "--eval-every", "0")

    # then it stops at step 1 (0-based) with code 1, says why, and writes no checkpoint
    assert code == 1
    assert "the loss became nan at step 1" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
    assert [r["step"] for r in _log(out)] == [1]


# ---------------------------------------------------------------------------------------------
# several processes, and Ctrl-C


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def one_and_two_processes(workspace) -> tuple[Path, Path]:
    """One 4-step run (no dropout) as one process with batch 4, and as torchrun's 2 processes with batch 2."""
    one, two = workspace / "one-process", workspace / "two-processes"
    common = [*TINY, *FAST, "--data", str(workspace / "data" / "verdict.txt"), "--max-steps", "4",
              "--eval-every", "2", "--warmup-steps", "1", "--decay-steps", "3", "--dropout", "0", "--quiet"]
    assert main([*common, "--out", str(one), "--batch-size", "4"]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "helpers.pretrain",
                             *common, "--out", str(two), "--batch-size", "2"],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return one, two


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_like_one_process_with_their_batch(one_and_two_processes):
    # given one process with batch 4, and 2 processes (torchrun, gloo) with batch 2 each; no dropout
    one, two = one_and_two_processes

    # then the weights agree, and so do the training losses and tokens seen of every step
    assert _max_abs_diff(one / "model.safetensors", two / "model.safetensors") <= 1e-5
    train_one = [r for r in _log(one) if "loss" in r]
    train_two = [r for r in _log(two) if "loss" in r]
    assert [r["step"] for r in train_two] == [1, 2, 3, 4]  # one log, written by rank 0 only
    for a, b in zip(train_one, train_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert (b["step"], b["tokens_seen"], b["lr"]) == (a["step"], a["tokens_seen"], a["lr"])


@pytest.mark.slow
def test_torchrun_with_two_processes_reports_the_validation_loss_of_one_process(one_and_two_processes):
    # given the same run as one process with batch 4 and as 2 processes with batch 2
    one, two = one_and_two_processes

    # then the validation losses (the same --eval-batches of the same global batch) agree
    val_one = [(r["step"], r["val_loss"]) for r in _log(one) if "val_loss" in r]
    val_two = [(r["step"], r["val_loss"]) for r in _log(two) if "val_loss" in r]
    assert [step for step, _ in val_two] == [step for step, _ in val_one] == [2, 4]
    for (_, a), (_, b) in zip(val_one, val_two, strict=True):
        assert b == pytest.approx(a, abs=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_from_it(workspace, tmp_path, capsys):
    # given a long run in a subprocess, logging every step
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "helpers.pretrain", "--data", str(workspace / "data" / "verdict.txt"),
            "--out", str(out), "--max-steps", "100000", "--batch-size", "2", "--eval-every", "0",
            *TINY, *FAST]
    stderr_file = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=stderr_file,
                               text=True)
    watchdog = threading.Timer(300, process.kill)  # never hang the suite if no log line comes
    watchdog.start()
    try:
        # when Ctrl-C (SIGINT) arrives after its first log line
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step"):
                break
        assert lines and lines[-1].startswith("step"), "".join(lines)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr_file.close()

    # then it exits with 0, says it was interrupted, and leaves a checkpoint at the step it reached
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert "interrupted at step" in rest and "--resume" in rest
    stopped = load_checkpoint(out, GPTModel(TINY_CFG))["step"]
    assert 1 <= stopped < 100000
    assert f"interrupted at step {stopped};" in rest
    assert max(r["step"] for r in _log(out)) == stopped

    # and --resume continues from that step
    code = main(["--data", str(workspace / "data" / "verdict.txt"), "--out", str(out), "--max-steps",
                 str(stopped + 2), "--batch-size", "2", "--eval-every", "0", *TINY, *FAST, "--resume"])
    assert code == 0
    assert f"resuming at step {stopped}" in capsys.readouterr().out
    assert [r["step"] for r in _log(out)][-2:] == [stopped + 1, stopped + 2]
    assert load_checkpoint(out, GPTModel(TINY_CFG))["step"] == stopped + 2


# ---------------------------------------------------------------------------------------------
# data and the token cache


def test_token_cache_lands_in_cache_dir_and_is_reused_without_retokenizing(workspace, tmp_path, monkeypatch):
    # given a text file in a data folder of its own, and a cache folder
    import tiktoken

    data = tmp_path / "data"
    data.mkdir()
    text = (workspace / "data" / "verdict.txt").read_text(encoding="utf-8")[:6000]
    (data / "part.txt").write_text(text, encoding="utf-8")
    cache = tmp_path / "tokens"
    argv = ["--data", str(data / "part.txt"), "--cache-dir", str(cache), "--max-steps", "1",
            "--batch-size", "2", "--eval-every", "0", "--val-fraction", "0", *TINY, *FAST, "--quiet"]

    # when a first run tokenizes it
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0

    # then the cache is in --cache-dir (not beside the data) and holds GPT-2's tokens and <|endoftext|>
    assert sorted(p.name for p in data.iterdir()) == ["part.txt"]
    cached = sorted(cache.glob("*.uint16"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").is_file()
    encoding = tiktoken.get_encoding("gpt2")
    expected = [*encoding.encode_ordinary(text), encoding.eot_token]
    assert np.fromfile(cached[0], dtype=np.uint16).tolist() == expected
    mtime = cached[0].stat().st_mtime_ns

    # when a second run uses the same data, with tokenizing made impossible
    def no_tokenizer():
        raise AssertionError("the second run tokenized again")

    monkeypatch.setattr("helpers.tokenizers.gpt2_tokenizer", no_tokenizer)
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0

    # then it read the same cache file, untouched
    assert sorted(cache.glob("*.uint16")) == cached and cached[0].stat().st_mtime_ns == mtime
    assert (tmp_path / "second" / "model.safetensors").is_file()


def test_token_cache_goes_to_llm_cache_dir_without_cache_dir(workspace, tmp_path, monkeypatch):
    # given LLM_CACHE_DIR pointing at a fresh folder and no --cache-dir
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "env-cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "story.txt").write_text((workspace / "data" / "verdict.txt").read_text(encoding="utf-8")[-5000:])

    # when a run tokenizes the file
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2",
                 "--eval-every", "0", *TINY, *FAST, "--quiet"]) == 0

    # then the cache is in LLM_CACHE_DIR and the data folder is as it was
    assert len(list((tmp_path / "env-cache").glob("*.uint16"))) == 1
    assert sorted(p.name for p in data.iterdir()) == ["story.txt"]


def test_data_accepts_a_folder_of_text_files(workspace, tmp_path):
    # given a folder with two .txt files (one in a subfolder) and a file that is not text
    import tiktoken

    text = (workspace / "data" / "verdict.txt").read_text(encoding="utf-8")
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(text[:8000], encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(text[8000:16000], encoding="utf-8")
    (folder / "README.md").write_text("not training data " * 50)
    cache = tmp_path / "cache"

    # when a run is given the folder
    assert main(["--data", str(folder), "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                 "--max-steps", "2", "--batch-size", "2", "--eval-every", "2", *TINY, *FAST, "--quiet"]) == 0

    # then it trained on both .txt files, in sorted order, each ended by <|endoftext|>, and not on the README
    manifest = json.loads(next(cache.glob("*.json")).read_text())
    assert manifest["files"] == [str(folder / "a.txt"), str(folder / "sub" / "b.txt")]
    encoding = tiktoken.get_encoding("gpt2")
    expected = [*encoding.encode_ordinary(text[:8000]), encoding.eot_token,
                *encoding.encode_ordinary(text[8000:16000]), encoding.eot_token]
    assert np.fromfile(next(cache.glob("*.uint16")), dtype=np.uint16).tolist() == expected
    assert load_checkpoint(tmp_path / "out", GPTModel(TINY_CFG))["step"] == 2


def test_a_folder_without_text_files_is_refused(workspace, tmp_path, capsys):
    # given a folder with no .txt file
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n")

    # when / then the run refuses it, naming the folder
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--max-steps", "1",
                 *TINY, *FAST]) == 2
    assert "no .txt files" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_of_gpt2_124m_matches_an_independent_count():
    # given GPT-2 124M at context 1024, built on the meta device (no memory)
    cfg = GPT_CONFIGS["gpt2"]
    with torch.device("meta"):
        model = GPTModel(cfg)

    # when N is counted as the weights of every matrix product (the linear layers, output head included)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    expected = 6 * n_matmul + 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length

    # then flops_per_token agrees: about 0.85 GFLOPs per token, of which attention's share is 12*L*d*T
    assert n_matmul == 12 * (12 * 768 * 768) + 50257 * 768
    assert flops_per_token(cfg) == pytest.approx(expected, rel=1e-12)
    assert 8.4e8 < flops_per_token(cfg) < 8.6e8


def test_flops_per_token_of_a_modern_model_matches_an_independent_count():
    # given Qwen3-0.6B's sizes at a context of 4096, built on the meta device
    from helpers.modern import MODERN_CONFIGS

    cfg = ModernConfig(**{**MODERN_CONFIGS["qwen3-0.6b"].to_dict(), "context_length": 4096})
    with torch.device("meta"):
        model = ModernModel(cfg)

    # when N is counted as the weights of every matrix product (grouped keys and values, SwiGLU's three, the head)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    expected = 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length

    # then flops_per_token agrees, with attention over queries of n_heads x head_dim = 2048, not emb_dim = 1024
    assert flops_per_token(cfg) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# micro-batches and dropout: what each step trains on


def test_grad_accum_of_two_half_batches_gives_the_weights_of_one_full_batch(workspace, tmp_path):
    # given the same 3-step run (no dropout) as 2 micro-batches of 2 rows, and as 1 batch of 4 rows
    common = ["--max-steps", "3", "--eval-every", "0", "--dropout", "0", "--lr", "1e-3"]
    assert _pretrain(workspace, tmp_path / "accum", 3, *common, "--batch-size", "2", "--grad-accum", "2") == 0
    assert _pretrain(workspace, tmp_path / "whole", 3, *common, "--batch-size", "4", "--grad-accum", "1") == 0

    # then the weights agree: the micro-batches together are the 4 rows of the big batch, each used once
    assert _max_abs_diff(tmp_path / "accum" / "model.safetensors", tmp_path / "whole" / "model.safetensors") <= 1e-6
    # and so do the logged losses: each micro-batch's mean loss counts half (AdamW and clipping would hide a
    # gradient twice too large, the logged loss does not)
    accum = [r["loss"] for r in _log(tmp_path / "accum") if "loss" in r]
    whole = [r["loss"] for r in _log(tmp_path / "whole") if "loss" in r]
    assert len(accum) == 3 and accum == pytest.approx(whole, abs=1e-5)


def _one_sgd_step(batch_size: int, grad_accum: int) -> tuple[float, GPTModel]:
    """One step of pretrain's own step function with plain SGD and no clipping; return (logged loss, model)."""
    from helpers.pretrain import _Dist, _Run, _train_step, build_parser

    args = build_parser().parse_args(["--data", "unused", "--out", "unused", "--max-steps", "1", "--seed", "7",
                                      "--batch-size", str(batch_size), "--grad-accum", str(grad_accum),
                                      "--grad-clip", "0", "--lr", "0.5", "--precision", "float32"])
    torch.manual_seed(0)
    model = GPTModel(TINY_CFG)
    tokens = np.random.default_rng(0).integers(0, TINY_CFG.vocab_size, size=4000).astype(np.uint16)
    run = _Run(args, _Dist("cpu"), TINY_CFG, model, torch.optim.SGD(model.parameters(), lr=0.5),
               forward_model=model, train_tokens=tokens)
    loss, _ = _train_step(run)
    return loss, model


def test_grad_accum_step_with_sgd_moves_the_weights_as_one_batch_of_all_the_rows():
    # given pretrain's step with SGD (an update proportional to the gradient, no clipping): the reference is one
    # batch of 4 rows, against 2 micro-batches of 2 rows (the same rows: they are drawn for the whole step)
    whole_loss, whole = _one_sgd_step(batch_size=4, grad_accum=1)
    accum_loss, accum = _one_sgd_step(batch_size=2, grad_accum=2)

    # then the loss and every weight after the step agree
    assert accum_loss == pytest.approx(whole_loss, abs=1e-5)
    for (name, a), b in zip(accum.named_parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_dropout_draws_new_masks_at_every_step(workspace, tmp_path, monkeypatch):
    # given a 2-step run with dropout 0.5, and every nn.Dropout call recorded with the mask it drew
    masks: dict[int, list[torch.Tensor]] = {}
    original = nn.Dropout.forward

    def recording_forward(self, x):
        out = original(self, x)
        if self.training:
            masks.setdefault(id(self), []).append(((out == 0) & (x != 0)).clone())
        return out

    monkeypatch.setattr(nn.Dropout, "forward", recording_forward)

    # when it runs (the data rows differ per step, the masks' shapes do not)
    assert _pretrain(workspace, tmp_path / "run", 2, "--dropout", "0.5", "--eval-every", "0") == 0

    # then each dropout call dropped about half its inputs, and a different half at step 2 than at step 1
    assert masks and all(len(drawn) % 2 == 0 for drawn in masks.values())
    for drawn in masks.values():
        calls_per_step = len(drawn) // 2  # the shortcut dropout runs twice per block
        for first, second in zip(drawn[:calls_per_step], drawn[calls_per_step:]):
            assert 0.4 < first.float().mean().item() < 0.6
            assert (first != second).float().mean().item() > 0.3


# ---------------------------------------------------------------------------------------------
# bad input: refused before any work, with the option named


@pytest.mark.parametrize(("flag", "value"), [
    ("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--lr", "0"), ("--lr", "inf"), ("--lr", "nan"),
    ("--min-lr", "-0.0001"), ("--weight-decay", "-0.1"), ("--dropout", "1"), ("--dropout", "-0.5"),
    ("--val-fraction", "1"), ("--warmup-steps", "-1"), ("--decay-steps", "0"), ("--save-every", "-2"),
    ("--eval-every", "-1"), ("--log-every", "0"), ("--eval-batches", "0"), ("--batch-size", "0"),
    ("--grad-accum", "-1"), ("--max-steps", "0"), ("--emb-dim", "0"), ("--n-layers", "-2"),
    ("--context-length", "0"), ("--peak-flops", "-1000000.0"), ("--peak-flops", "inf"), ("--seed", "-1"),
    ("--seed", str(2**70)),
])
def test_an_out_of_range_option_is_refused_naming_it_before_any_work(workspace, tmp_path, capsys, flag, value):
    # given a run with one option out of range
    out, cache = tmp_path / "out", tmp_path / "cache"

    # when it starts
    code = _pretrain(workspace, out, 2, "--cache-dir", str(cache), flag, value)

    # then it exits with 2, naming the option and its value on one line, and nothing was written
    err = capsys.readouterr().err
    assert code == 2
    assert f"{flag} must be" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_min_lr_above_lr_is_refused(workspace, tmp_path, capsys):
    assert _pretrain(workspace, tmp_path / "out", 2, "--lr", "1e-4", "--min-lr", "1e-3") == 2
    assert "--min-lr (0.001) must not exceed --lr (0.0001)" in capsys.readouterr().err


def test_val_fraction_0_with_evaluation_is_refused_saying_evaluation_needs_a_split(workspace, tmp_path, capsys):
    # given --val-fraction 0 with evaluation on (the default --eval-every)
    out = tmp_path / "out"

    # when / then it is refused before any work, saying to raise --val-fraction or turn evaluation off
    assert _pretrain(workspace, out, 1, "--val-fraction", "0", "--eval-every", "5") == 2
    err = capsys.readouterr().err
    assert "--val-fraction 0" in err and "raise --val-fraction" in err and "--eval-every 0" in err
    assert "lower" not in err and not out.exists()
    # and without evaluation the same split trains
    assert _pretrain(workspace, out, 1, "--val-fraction", "0", "--eval-every", "0") == 0


def test_a_cache_dir_that_is_a_file_is_refused_naming_the_flag(workspace, tmp_path, capsys):
    # given --cache-dir naming a file, and a folder below that file
    (tmp_path / "a-file").write_text("not a folder")

    # when / then both are refused in one line naming --cache-dir (not a raw errno), before any output
    for cache in (tmp_path / "a-file", tmp_path / "a-file" / "tokens"):
        assert _pretrain(workspace, tmp_path / "out", 1, "--cache-dir", str(cache)) == 2
        err = capsys.readouterr().err
        assert f"--cache-dir {cache}" in err and "Errno" not in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_a_folder_is_refused_before_tokenizing(workspace, tmp_path, capsys):
    # given --out pointing at a file, and at a folder below a file (which no one can create)
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "cache"

    # when / then both are refused with exit status 2, naming --out, before the data is tokenized
    assert _pretrain(workspace, tmp_path / "a-file", 2, "--cache-dir", str(cache)) == 2
    assert "--out" in capsys.readouterr().err and not cache.exists()
    assert _pretrain(workspace, tmp_path / "a-file" / "run", 2, "--cache-dir", str(cache)) == 2
    assert re.search("--out .*cannot be written", capsys.readouterr().err) and not cache.exists()


def test_a_missing_data_path_is_refused_before_any_output(tmp_path, capsys):
    code = main(["--data", str(tmp_path / "no-such.txt"), "--out", str(tmp_path / "out"), "--max-steps", "1",
                 *TINY, *FAST])
    assert code == 2 and "no-such.txt" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(("options", "named"), [
    (["--init", "pytorch"], "--init pytorch"),
    (["--tie-weights"], "--tie-weights"),
    (["--max-steps", "8"], "--max-steps 8 is not beyond the saved step 8"),
    (["--max-steps", "3"], "--max-steps 3 is not beyond the saved step 8"),
    (["--val-fraction", "0.2"], "--val-fraction 0.2 (saved: 0.1; the validation split would no longer be"),
])
def test_resume_with_options_it_would_ignore_is_refused_and_touches_nothing(full_run, workspace, tmp_path, capsys,
                                                                           options, named):
    # given a copy of a finished 8-step run
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = _snapshot(out)

    # when / then resuming it with an option the saved run decides is refused before the first step
    assert _pretrain(workspace, out, 10, "--resume", *options) == 2
    assert named in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_applies_changed_weight_decay_and_clipping_and_says_so(full_run, workspace, tmp_path, capsys,
                                                                      monkeypatch):
    # given a copy of a finished run (weight decay 0.1, clipping at 1.0), and AdamW's steps recorded
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    used: list[list[float]] = []
    holders: list[int | None] = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append([group["weight_decay"] for group in self.param_groups])
        lock = out / "model.lock"
        holders.append(json.loads(lock.read_text())["pid"] if lock.is_file() else None)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)

    # when it is resumed with --weight-decay 0.5 and --grad-clip 0.5
    capsys.readouterr()
    assert _pretrain(workspace, out, 10, *SCHEDULE, "--resume", "--weight-decay", "0.5", "--grad-clip", "0.5",
                     quiet=False) == 0

    # then the optimizer decays the weight matrices by 0.5 (biases and norms still by 0), saves that, and the
    # output and the log say what changed, in one line
    assert used == [[0.5, 0.0], [0.5, 0.0]]
    saved = torch.load(out / "model.state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in saved] == [0.5, 0.0]
    assert "resume: weight_decay 0.1 -> 0.5, grad_clip 1.0 -> 0.5\n" in capsys.readouterr().out
    assert {"step": 8, "note": "resume: weight_decay 0.1 -> 0.5, grad_clip 1.0 -> 0.5"} in _log(out)
    # and the run held the folder's lock through its steps (not only while saving), and removed it at the end
    assert holders == [os.getpid(), os.getpid()] and not (out / "model.lock").exists()


def test_resume_without_the_training_options_keeps_the_saved_ones(full_run, workspace, tmp_path, capsys):
    # given a copy of a finished run trained with lr 1e-3, 2 warmup and 6 decay steps (not the defaults)
    out = tmp_path / "run"
    shutil.copytree(full_run, out)

    # when it is resumed with none of those options
    capsys.readouterr()
    assert _pretrain(workspace, out, 10, "--resume", quiet=False) == 0

    # then it continues with the saved schedule (nothing reported as changed) and saves those values again
    assert "resume:" not in capsys.readouterr().out
    assert not any("note" in record for record in _log(out))
    saved = torch.load(out / "model.state.pt", weights_only=True)["state"]["args"]
    assert (saved["lr"], saved["warmup_steps"], saved["decay_steps"]) == (1e-3, 2, 6)


def test_a_second_run_into_a_folder_being_written_is_refused_naming_the_holder(full_run, workspace, tmp_path,
                                                                               capsys):
    from helpers.checkpoint import checkpoint_lock

    # given a copy of a finished run whose folder another writer holds
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = _snapshot(out)
    held, release = threading.Event(), threading.Event()

    def other_writer():
        with checkpoint_lock(out):
            held.set()
            release.wait(timeout=60)

    writer = threading.Thread(target=other_writer)
    writer.start()
    try:
        assert held.wait(timeout=60)
        # when / then resuming it is refused, naming the holder, and nothing changes
        assert _pretrain(workspace, out, 10, *SCHEDULE, "--resume") == 2
        assert f"process {os.getpid()} on" in capsys.readouterr().err
        assert _snapshot(out) == {**before, "model.lock": (out / "model.lock").read_bytes()}
    finally:
        release.set()
        writer.join(timeout=60)
    assert _snapshot(out) == before


def test_the_command_prints_one_line_and_no_traceback(workspace, tmp_path):
    # given the command run as a user runs it, with a negative --grad-clip
    data = workspace / "data" / "verdict.txt"
    result = subprocess.run([sys.executable, "-m", "helpers.pretrain", "--data", str(data),
                             "--out", str(tmp_path / "out"), "--max-steps", "2", "--grad-clip", "-1"],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)

    # then it exits with 2 and says what is wrong in one line
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["python -m helpers.pretrain: error: --grad-clip must be a finite number >= 0 "
                                          "(0: off), got -1.0"]


# ---------------------------------------------------------------------------------------------
# initialisation, precision, and what a killed run leaves


@pytest.mark.parametrize(("arch", "init", "embedding_std"), [("gpt2", None, 0.02), ("gpt2", "pytorch", 1.0),
                                                              ("modern", None, 0.02), ("modern", "pytorch", 1.0)])
def test_init_chooses_gpt2_or_pytorch_initialisation(workspace, tmp_path, arch, init, embedding_std):
    # given a one-step run with a negligible learning rate, so the saved weights are the initial ones
    options = ["--lr", "1e-12", "--weight-decay", "0", "--eval-every", "0", "--arch", arch]
    options += ["--init", init] if init else []
    assert _pretrain(workspace, tmp_path / "run", 1, *options) == 0

    # then the token embedding has GPT-2's std 0.02 by default, and nn.Embedding's N(0, 1) with --init pytorch
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert weights["tok_emb.weight"].std().item() == pytest.approx(embedding_std, rel=0.05)


def test_precision_chooses_the_compute_dtype_and_dtype_is_its_old_name():
    from helpers.pretrain import build_parser

    required = ["--data", "x", "--out", "y", "--max-steps", "1"]
    assert build_parser().parse_args(required).precision == "auto"
    assert build_parser().parse_args([*required, "--precision", "float16"]).precision == "float16"
    assert build_parser().parse_args([*required, "--dtype", "bfloat16"]).precision == "bfloat16"


def test_resume_after_a_kill_drops_unsaved_log_lines_and_leftovers(full_run, workspace, tmp_path):
    # given a run saved at step 8 that was then killed: log lines past the save (one cut in half),
    # a temporary file of the dead writer and a half-staged next save
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 9, "loss": 1.0}) + "\n" + '{"step": 10, "lo')
    (out / ".model.safetensors.999999999.tmp").write_bytes(b"half")
    (out / "model.new.state.pt").write_bytes(b"half")

    # when it is resumed to step 10
    assert _pretrain(workspace, out, 10, *SCHEDULE, "--resume") == 0

    # then the log holds each step once, and only the run's files remain
    steps = [r["step"] for r in _log(out) if "loss" in r]
    assert steps == list(range(1, 11))
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "model.safetensors", "model.state.pt"]
    assert load_checkpoint(out, GPTModel(TINY_CFG))["step"] == 10
