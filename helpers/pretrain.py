"""Pretrain a GPT-2 or a modern model from text files: ``python -m helpers.pretrain --data PATH --out DIR [options]``.

Runs as is on one CPU or GPU, and under ``torchrun --nproc_per_node N`` (also across nodes) with
DistributedDataParallel: gloo on CPU, nccl on CUDA. Only rank 0 writes files and logs.

Determinism. The rows of step ``s`` are drawn for the whole global batch
(``--batch-size`` x processes x ``--grad-accum``) from ``(--seed, s)``, and each process takes its
own rows, so a run's result does not depend on how many processes share it. Dropout is reseeded
from ``(--seed, s, rank)`` every step and the learning rate is a function of the step alone, so
stopping and ``--resume`` continue exactly where a single run would be.

Architecture. ``--arch gpt2`` (the default) trains Part 06's ``GPTModel``; ``--arch modern`` trains
Part 10's ``helpers.modern.ModernModel`` (RMSNorm, SwiGLU, rotary positions, grouped-query attention,
QK-norm, no biases) from the same size options. Its own sizes default to a model of about the same
parameter count as the GPT-2 of the same width and depth: ``--head-dim`` emb_dim / n_heads,
``--n-kv-heads`` n_heads / 2 (n_heads when it is odd), ``--hidden-dim`` 8/3 x emb_dim rounded to a
multiple of 64 (SwiGLU's three matrices hold about as many weights as GPT-2's two of 4 x emb_dim),
``--rope-theta`` 10000, QK-norm on (``--no-qk-norm``: off). ``--preset`` takes GPT-2's sizes
(``gpt2``... also with ``--arch modern``: its width, depth, heads and context) or a modern model's
(``qwen3-0.6b``, ``llama3.2-1b``: all their sizes, tied head included; ``--arch modern`` is then implied). Either
architecture uses GPT-2's vocabulary (50,257), the tokenizer the data is cached with.

Initialisation. A new model gets GPT-2's scheme (``--init gpt2``, the default: normal(0, 0.02)
weights and residual projections scaled by 1/sqrt(2 x n_layers); ``helpers.model.init_gpt2_weights``,
for a modern model ``helpers.modern.init_modern_weights``, which also sets every RMSNorm to 1) or
PyTorch's default initialisation of each layer (``--init pytorch``: nn.Linear's Kaiming-uniform,
nn.Embedding's N(0, 1), a tied head keeping the embedding's). A resumed model keeps its weights, so
``--resume`` refuses ``--init``.

Resuming. ``--resume`` continues the saved model (of the saved architecture), optimizer state and step.
Options that would change the saved model (``--arch``, the sizes, ``--preset``, ``--tie-weights``,
``--init``) or the held-out split (``--val-fraction``) are refused. The data and training options
(``--data``, ``--lr`` and its schedule, ``--weight-decay``, ``--grad-clip``, ``--batch-size``,
``--grad-accum``, ``--seed``, ``--precision``) keep the saved run's values unless given again; given
ones are applied (also over the loaded optimizer state), and one line (``resume: weight_decay 0.1 -> 0.5``,
also in ``log.jsonl``) names those that differ from the saved run's.

Precision. ``--precision auto`` (the default) computes in bfloat16 under autocast on a CUDA GPU
that supports it and in float32 elsewhere; ``float32``, ``bfloat16`` and ``float16`` force one
(``helpers.runtime.autocast``). Weights and optimizer state stay float32.

Files. ``DIR/model.safetensors`` holds the latest weights and, in its metadata, the model's config
and architecture (loadable by ``helpers.train.load_checkpoint`` into
``helpers.checkpoint.model_from_config(read_config(DIR), read_arch(DIR))``, and a GPT-2 also by
``helpers.weights.load_gpt2``), ``DIR/model.state.pt`` the
optimizer state and step beside it, ``DIR/log.jsonl`` one line per logged step. Ctrl-C (or
SIGTERM) finishes the current step, saves, and exits. A run killed at any moment (even during a
save) leaves a checkpoint that ``--resume`` continues from. While a run lives, ``DIR/model.lock``
names it (process id, host, start time), so a second run into the same ``--out`` is refused; a lock
left by a killed run is taken over (``helpers.checkpoint.checkpoint_lock``).

Errors. Every option is checked, and every problem that can be known before training (an
unwritable ``--out`` or ``--cache-dir``, a missing ``--data``, ``--val-fraction 0`` with evaluation on,
options that ``--resume`` cannot honour) is reported
before the first step, as one line on stderr: exit status 2. A loss that becomes NaN or infinite
stops the run without saving (the last checkpoint stays intact): exit status 1.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. The achieved FLOPs per token are
``6 * N + 12 * n_layers * n_heads * head_dim * context_length`` (N: weights used in matrix products,
output head included, embeddings lookups excluded: for a modern model the query, key, value and output
projections and SwiGLU's three matrices; 6 = 2 FLOPs per multiply-add x forward + 2x backward;
the second term is attention's score and value products; GPT-2's n_heads * head_dim is emb_dim).
The peak is ``--peak-flops``, else
``$LLM_PEAK_FLOPS``, else a table of known GPUs (bf16 dense), else, on a CPU, a float32 matmul
measured at start-up (``helpers.runtime.peak_flops``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from helpers import runtime
from helpers.checkpoint import (
    CheckpointError,
    checkpoint_lock,
    checkpoint_paths,
    load_checkpoint,
    read_arch,
    read_config,
    recover_interrupted_save,
    save_checkpoint,
)
from helpers.corpus import default_cache_dir, expand_data_paths, load_token_cache, token_batch
from helpers.data import DataError
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel, init_gpt2_weights
from helpers.modern import MODERN_CONFIGS, ModernConfig, ModernModel
from helpers.train import TrainingDiverged, calc_loss_batch, learning_rate_at

__all__ = ["PretrainError", "build_parser", "default_hidden_dim", "flops_per_token", "main", "run", "validate_args"]


class PretrainError(Exception):
    """A run cannot start or continue as asked; the message names the option or file and what to do."""


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (``--help`` lists them with their defaults)."""
    parser = argparse.ArgumentParser(prog="python -m helpers.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="PATH",
                      help="a text file, a folder of .txt files, or a helpers.data dataset name; repeatable")
    data.add_argument("--out", required=True, type=Path, metavar="DIR", help="where weights, state and log go")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help=f"token cache folder (default $LLM_CACHE_DIR or {default_cache_dir()})")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation")
    model = parser.add_argument_group("model (an --arch and a --preset, optionally overridden by the sizes)")
    model.add_argument("--arch", choices=["gpt2", "modern"], default=None,
                       help="GPT-2, or the modern decoder of Part 10 (default gpt2; modern for a modern --preset; "
                            "with --resume the saved run's)")
    model.add_argument("--preset", choices=sorted(GPT_CONFIGS) + sorted(MODERN_CONFIGS), default=None,
                       help="the sizes of a published model (see above)")
    model.add_argument("--n-layers", type=int)
    model.add_argument("--n-heads", type=int)
    model.add_argument("--emb-dim", type=int)
    model.add_argument("--context-length", type=int)
    model.add_argument("--dropout", type=float)
    model.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
    model.add_argument("--init", choices=["gpt2", "pytorch"], default=None,
                       help="initialisation of a new model (default gpt2; see above)")
    modern = parser.add_argument_group("modern model (--arch modern; unset: derived from the sizes, see above)")
    modern.add_argument("--n-kv-heads", type=int, help="key/value heads, dividing n_heads (default n_heads / 2)")
    modern.add_argument("--head-dim", type=int, help="dimensions per head (default emb_dim / n_heads)")
    modern.add_argument("--hidden-dim", type=int, help="SwiGLU's inner width (default 8/3 x emb_dim, to 64s)")
    modern.add_argument("--rope-theta", type=float, help="RoPE's base period (default 10000)")
    modern.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="RMSNorm over each head's queries and keys, as Qwen3 (default on)")
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    train.add_argument("--max-steps", type=int, required=True, help="the step this invocation stops at")
    train.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    train.add_argument("--min-lr", type=float, default=None, help="learning rate after the decay (default lr/10)")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--decay-steps", type=int, default=None, help="cosine decay length; unset: constant")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (0: never)")
    train.add_argument("--eval-batches", type=int, default=20)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    system = parser.add_argument_group("system")
    system.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    system.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="compute dtype under autocast (see above)")
    system.add_argument("--dtype", dest="precision", choices=["float32", "bfloat16", "float16"],
                        help=argparse.SUPPRESS)  # the former name of --precision
    system.add_argument("--compile", action="store_true", help="torch.compile the model")
    system.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (see above)")
    system.add_argument("--quiet", action="store_true", help="no log lines on stdout (log.jsonl is still written)")
    return parser


# ---------------------------------------------------------------------------------------------
# validation: every number is checked before any work starts


def _finite(value: float) -> bool:
    return math.isfinite(value)


# option -> (what it must be, the test); None (an unset option) is always allowed
_RULES = {
    "batch_size": ("an integer >= 1", lambda v: v >= 1),
    "grad_accum": ("an integer >= 1", lambda v: v >= 1),
    "max_steps": ("an integer >= 1", lambda v: v >= 1),
    "log_every": ("an integer >= 1", lambda v: v >= 1),
    "eval_batches": ("an integer >= 1", lambda v: v >= 1),
    "n_layers": ("an integer >= 1", lambda v: v >= 1),
    "n_heads": ("an integer >= 1", lambda v: v >= 1),
    "emb_dim": ("an integer >= 1", lambda v: v >= 1),
    "context_length": ("an integer >= 1", lambda v: v >= 1),
    "n_kv_heads": ("an integer >= 1", lambda v: v >= 1),
    "head_dim": ("an even integer >= 2 (RoPE rotates pairs of dimensions)", lambda v: v >= 2 and v % 2 == 0),
    "hidden_dim": ("an integer >= 1", lambda v: v >= 1),
    "rope_theta": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "decay_steps": ("an integer >= 1 (leave it out for a constant rate)", lambda v: v >= 1),
    "warmup_steps": ("an integer >= 0", lambda v: v >= 0),
    "eval_every": ("an integer >= 0 (0: never)", lambda v: v >= 0),
    "save_every": ("an integer >= 0 (0: only at the end)", lambda v: v >= 0),
    "seed": ("an integer from 0 to 2**64 - 1", lambda v: 0 <= v < 2**64),  # what torch.manual_seed takes
    "lr": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "min_lr": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "weight_decay": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "grad_clip": ("a finite number >= 0 (0: off)", lambda v: _finite(v) and v >= 0),
    "dropout": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "val_fraction": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "peak_flops": ("a finite number of FLOP/s > 0", lambda v: _finite(v) and v > 0),
}


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``PretrainError`` naming every option whose value is out of range (NaN, inf, negative, zero)."""
    problems = []
    for name, (requirement, ok) in _RULES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            problems.append(f"--{name.replace('_', '-')} must be {requirement}, got {value}")
    if not problems and args.min_lr is not None and args.min_lr > args.lr:
        problems.append(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if not problems and args.val_fraction == 0 and args.eval_every:
        problems.append(f"--val-fraction 0 leaves no validation split, which evaluation (--eval-every "
                        f"{args.eval_every}) needs: raise --val-fraction (e.g. 0.1), or pass --eval-every 0 to train "
                        "without evaluation")
    problems += _arch_problems(args)
    if problems:
        raise PretrainError("; ".join(problems))


def _arch_problems(args: argparse.Namespace) -> list[str]:
    """Options that do not fit the architecture asked for (a resumed run's is checked against its file later)."""
    problems = []
    if args.arch == "gpt2" and args.preset in MODERN_CONFIGS:
        problems.append(f"--preset {args.preset} is a modern model: pass --arch modern (or leave --arch out)")
    modern_given = [_option_text(key, value) for key, value in _given_sizes(args).items() if key in _MODERN_OPTIONS]
    arch = _requested_arch(args)
    if modern_given and (arch == "gpt2" or (arch is None and not getattr(args, "resume", False))):
        problems.append(f"{', '.join(modern_given)} sets the modern model, which GPT-2 has no place for: add "
                        "--arch modern, or leave it out")
    return problems


# ---------------------------------------------------------------------------------------------
# set-up


class _Dist:
    """This process's place in a torchrun job (or a lone process)."""

    def __init__(self, requested_device: str | None):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(requested_device) if requested_device else runtime.device()
        if device.type == "cuda" and self.enabled:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            if device.type == "cpu":  # processes on one machine share its cores
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the model: its config (new or saved), optimizer and FLOPs


# config field -> option: the sizes of either architecture, then the modern model's own
_SIZE_OPTIONS = {"n_layers": "n-layers", "n_heads": "n-heads", "emb_dim": "emb-dim",
                 "context_length": "context-length", "drop_rate": "dropout"}
_MODERN_OPTIONS = {"n_kv_heads": "n-kv-heads", "head_dim": "head-dim", "hidden_dim": "hidden-dim",
                   "rope_theta": "rope-theta", "qk_norm": "qk-norm"}
_DEFAULT_SIZES = GPTConfig(emb_dim=256, n_heads=4, n_layers=4, context_length=256, drop_rate=0.0)
_MODERN_ROPE_THETA = 10_000.0
_GPT2_PRESET_KEYS = ("vocab_size", "n_layers", "n_heads", "emb_dim", "context_length")


def _given_sizes(args) -> dict:
    sizes = {"n_layers": args.n_layers, "n_heads": args.n_heads, "emb_dim": args.emb_dim,
             "context_length": args.context_length, "drop_rate": args.dropout,
             **{key: getattr(args, key, None) for key in _MODERN_OPTIONS}}
    return {key: value for key, value in sizes.items() if value is not None}


def _option_text(key: str, value) -> str:
    """How the option that sets config field ``key`` to ``value`` is written: ``--emb-dim 64``, ``--no-qk-norm``."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{_MODERN_OPTIONS[key]}"
    return f"--{({**_SIZE_OPTIONS, **_MODERN_OPTIONS})[key]} {value}"


def _requested_arch(args) -> str | None:
    """The architecture the command line asks for: ``--arch``, else a modern ``--preset``'s; None if neither says."""
    if args.arch is not None:
        return args.arch
    return "modern" if args.preset in MODERN_CONFIGS else None


def _preset_values(preset: str) -> dict:
    """The config fields a ``--preset`` sets: a GPT-2's sizes, or all of a modern model's but its vocabulary."""
    if preset in MODERN_CONFIGS:
        values = MODERN_CONFIGS[preset].to_dict()
        del values["vocab_size"], values["drop_rate"], values["tie_weights"]  # the data's tokenizer; flags decide
        return values
    return {key: getattr(GPT_CONFIGS[preset], key) for key in _GPT2_PRESET_KEYS}


def _resume_clashes(args, saved: GPTConfig | ModernConfig, saved_arch: str) -> list[str]:
    """The options that ``--resume`` would ignore because the saved model decides them."""
    requested = _requested_arch(args)
    if requested is not None and requested != saved_arch:
        asked = f"--arch {args.arch}" if args.arch else f"--preset {args.preset} (a {requested} model)"
        return [f"{asked} (saved: {saved_arch})"]
    saved_values, given = saved.to_dict(), _given_sizes(args)
    clashes = [f"{_option_text(k, v)} (saved: " + (f"{saved_values[k]})" if k in saved_values else
                                                   f"a {saved_arch} model, which has no {k})")
               for k, v in given.items() if saved_values.get(k, object()) != v]
    if args.preset:
        clashes += [f"--preset {args.preset} sets {k} {v} (saved: {saved_values.get(k)})"
                    for k, v in _preset_values(args.preset).items() if k not in given and saved_values.get(k) != v]
    if args.tie_weights and not saved.tie_weights:
        clashes.append("--tie-weights (saved: untied)")
    if args.init is not None:
        clashes.append(f"--init {args.init} (a resumed model keeps its trained weights)")
    return clashes


# options a resumed run applies in place of the saved ones (the log says which changed), and those it refuses
_HONOURED_ON_RESUME = ("data", "lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip",
                       "batch_size", "grad_accum", "seed", "precision")
_REFUSED_ON_RESUME = {"val_fraction": "the validation split would no longer be the tokens held out so far"}


def _keep_saved_options(args, saved_args: dict) -> None:
    """Give the honoured options this command line left out their saved values, so a bare ``--resume`` continues
    the run as it was (``args.explicit``, set by ``main``, names the options given; without it all count as given)."""
    explicit = getattr(args, "explicit", None)
    if explicit is None:
        return
    for name in _HONOURED_ON_RESUME:
        if name not in explicit and name in saved_args:
            setattr(args, name, saved_args[name])


def _resume_changes(saved_args: dict, args) -> str:
    """The honoured options that differ from the saved run's (``"weight_decay 0.1 -> 0.5"``); refuse the others."""
    def differs(name: str) -> bool:
        return name in saved_args and saved_args[name] != getattr(args, name)

    refused = [f"--{name.replace('_', '-')} {getattr(args, name)} (saved: {saved_args[name]}; {why})"
               for name, why in _REFUSED_ON_RESUME.items() if differs(name)]
    if refused:
        raise PretrainError(f"--resume cannot honour {', '.join(refused)}; leave it out to continue, "
                            "or start a new run in another --out")
    return ", ".join(f"{name} {saved_args[name]} -> {getattr(args, name)}" for name in _HONOURED_ON_RESUME
                     if differs(name))


def _model_config(args, saved: dict | None, saved_arch: str | None = None) -> tuple[str, GPTConfig | ModernConfig]:
    """The architecture and config of a new model (preset, then the sizes given), or the saved ones when resuming."""
    if saved is not None:
        config = (ModernConfig if saved_arch == "modern" else GPTConfig).from_dict(saved)
        clashes = _resume_clashes(args, config, saved_arch or "gpt2")
        if clashes:
            raise PretrainError(f"--resume continues the saved model, but these options differ: {', '.join(clashes)}; "
                                "leave them out to continue, or start a new run in another --out")
        return saved_arch or "gpt2", config
    if (_requested_arch(args) or "gpt2") == "modern":
        return "modern", _modern_config(args)
    base = GPT_CONFIGS[args.preset] if args.preset else _DEFAULT_SIZES
    values = {**base.to_dict(), **_given_sizes(args)}
    if args.tie_weights:
        values["tie_weights"] = True
    return "gpt2", GPTConfig(**values)


def _modern_config(args) -> ModernConfig:
    """A new modern model's config: a modern preset's sizes, or GPT-2's (preset or default) with derived extras."""
    if args.preset in MODERN_CONFIGS:
        values = {**MODERN_CONFIGS[args.preset].to_dict(), "vocab_size": _DEFAULT_SIZES.vocab_size,
                  "drop_rate": _DEFAULT_SIZES.drop_rate, **_given_sizes(args)}
    else:
        base = GPT_CONFIGS[args.preset] if args.preset else _DEFAULT_SIZES
        values = {key: getattr(base, key) for key in (*_GPT2_PRESET_KEYS, "drop_rate")} | _given_sizes(args)
        values.setdefault("head_dim", values["emb_dim"] // values["n_heads"])
        values.setdefault("n_kv_heads", values["n_heads"] // 2 if values["n_heads"] % 2 == 0 else values["n_heads"])
        values.setdefault("hidden_dim", default_hidden_dim(values["emb_dim"]))
        values.setdefault("rope_theta", _MODERN_ROPE_THETA)
        values.setdefault("qk_norm", True)
        values["tie_weights"] = False
    if args.tie_weights:
        values["tie_weights"] = True
    return ModernConfig(**values)


def default_hidden_dim(emb_dim: int) -> int:
    """SwiGLU's inner width for a width of ``emb_dim``: 8/3 x emb_dim to the nearest multiple of 64 (at least 64).

    Its three matrices then hold about as many weights as GPT-2's feed-forward (two of 4 x emb_dim).
    """
    return max(64, 64 * round(8 * emb_dim / 3 / 64))


def _optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    # decay matrices and embeddings, not biases and LayerNorm parameters
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **extra)


def flops_per_token(cfg: GPTConfig | ModernConfig) -> float:
    """Training FLOPs per token (forward and backward) of a ``GPTModel`` or ``ModernModel``; see the module doc."""
    if isinstance(cfg, ModernConfig):
        attention_width = cfg.n_heads * cfg.head_dim
        per_block = (2 * cfg.emb_dim * attention_width  # queries and output projection
                     + 2 * cfg.emb_dim * cfg.n_kv_heads * cfg.head_dim  # keys and values (grouped)
                     + 3 * cfg.emb_dim * cfg.hidden_dim)  # SwiGLU: gate, up and down
    else:
        attention_width = cfg.emb_dim
        per_block = 4 * cfg.emb_dim * cfg.emb_dim + 8 * cfg.emb_dim * cfg.emb_dim  # attention projections + MLP
    matmul_weights = cfg.n_layers * per_block + cfg.vocab_size * cfg.emb_dim
    return 6 * matmul_weights + 12 * cfg.n_layers * attention_width * cfg.context_length


# ---------------------------------------------------------------------------------------------
# batches: one rule for which rows a process takes, in training and in evaluation


_TRAIN_STREAM, _VAL_STREAM, _DROPOUT_STREAM = 0, 1, 2


def _rows_of_step(seed: int, step: int, n_rows: int, n_tokens: int, context_length: int,
                  stream: int = _TRAIN_STREAM) -> np.ndarray:
    """Window start offsets for one step, a pure function of (seed, stream, step)."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - context_length, size=n_rows)


def _my_offsets(offsets: np.ndarray, micro: int, env: _Dist, batch_size: int) -> np.ndarray:
    """This process's rows of micro-batch ``micro``: the global rows are laid out micro-batch by micro-batch."""
    start = (micro * env.world + env.rank) * batch_size
    return offsets[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# the state of a run, and its steps


@dataclasses.dataclass
class _Run:
    """Everything a run's steps share: options, process, data, model, optimizer and progress."""

    args: argparse.Namespace
    env: _Dist
    cfg: GPTConfig | ModernConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens_seen: int = 0
    resume_changes: str = ""  # the options this resumed run changed, "weight_decay 0.1 -> 0.5, ..."
    forward_model: nn.Module | None = None  # the model wrapped by DDP and torch.compile
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None

    @property
    def rows_per_step(self) -> int:
        return self.args.batch_size * self.env.world * self.args.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.cfg.context_length


def _prepare_out_dir(args, env: _Dist, locks: contextlib.ExitStack) -> Path:
    """Check ``--out`` against ``--resume`` and that it can be written; finish a save a kill interrupted.

    Rank 0 holds the folder's checkpoint lock (entered into ``locks``) from here to the end of the run,
    so a second run into the same ``--out`` is refused before it changes anything.
    """
    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        raise PretrainError(f"--out {out_dir} is a file, not a folder; choose a folder")
    locked = env.main and out_dir.is_dir()
    if locked:
        locks.enter_context(checkpoint_lock(out_dir))
        recover_interrupted_save(out_dir)  # a run killed while saving: keep the newest whole checkpoint
    env.barrier()
    weights_path, _ = checkpoint_paths(out_dir)
    if args.resume and not weights_path.is_file():
        raise PretrainError(f"--resume: {out_dir} holds no checkpoint ({weights_path.name}) to continue")
    if not args.resume and weights_path.exists():
        raise PretrainError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if env.main:
        _check_writable(out_dir)
        if not locked:  # a new folder: lock it now that it exists
            locks.enter_context(checkpoint_lock(out_dir))
        stale_log = out_dir / "log.jsonl"
        if not args.resume and stale_log.exists():  # left by a run that never saved: keep it aside
            os.replace(stale_log, out_dir / f"log.{int(time.time())}.jsonl")
    return out_dir


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PretrainError(f"--out {out_dir} cannot be written ({error.strerror or error}); "
                            "choose a folder you can write to") from error


def _build_model(args, env: _Dist) -> _Run:
    """A new model (initialised as ``--init`` says) or the saved one, with its optimizer and progress."""
    saved = read_config(args.out) if args.resume else None
    if args.resume and saved is None:
        raise PretrainError(f"{checkpoint_paths(args.out)[0]} has no model config in its metadata; "
                            "it was not written by this command")
    args.arch, cfg = _model_config(args, saved, read_arch(args.out) if args.resume else None)
    torch.manual_seed(args.seed)
    model = _new_model(args.arch, cfg, None if args.resume else args.init or "gpt2")
    model.to(env.device)
    run = _Run(args, env, cfg, model, _optimizer(model, args, env.device))
    if args.resume:
        state = load_checkpoint(args.out, model, run.optimizer)
        _keep_saved_options(args, state.get("args") or {})
        for group, wanted in zip(run.optimizer.param_groups, _optimizer(model, args, env.device).param_groups):
            # loading restored the saved settings (weight decay...): this run's options win
            group.update({key: value for key, value in wanted.items() if key != "params"})
        run.resume_changes = _resume_changes(state.get("args") or {}, args)
        run.step, run.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        if args.max_steps <= run.step:
            raise PretrainError(f"--max-steps {args.max_steps} is not beyond the saved step {run.step}; "
                                "pass a larger --max-steps to continue training")
        if env.main:
            _trim_log(args.out / "log.jsonl", run.step)
    run.forward_model = _wrap(model, env, args.compile)
    return run


def _new_model(arch: str, cfg: GPTConfig | ModernConfig, init: str | None) -> nn.Module:
    """A model of ``arch`` initialised as ``init`` says (``"gpt2"``, ``"pytorch"``; None: a resumed model's weights
    are about to be loaded, so any initialisation will do)."""
    if arch == "gpt2":
        model = GPTModel(cfg)
        if init == "gpt2":
            init_gpt2_weights(model)
        return model
    model = ModernModel(cfg)  # starts with init_modern_weights: GPT-2's scheme
    if init == "pytorch":
        for module in model.modules():  # each layer's own default; a tied head keeps the embedding's draw
            if isinstance(module, (nn.Linear, nn.Embedding)) and not (
                    module is model.out_head and model.out_head.weight is model.tok_emb.weight):
                module.reset_parameters()
    return model


def _wrap(model: nn.Module, env: _Dist, compile_model: bool) -> nn.Module:
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def _trim_log(log_path: Path, saved_step: int) -> None:
    """Keep the log lines a resumed run stands on: whole JSON records up to the saved step."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half line of a killed write
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= saved_step:
            kept.append(line)
    runtime.write_atomically(log_path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))


def _load_splits(run: _Run, files: list[Path]) -> None:
    """Tokenize (rank 0 first, the others then read its cache) and split into training and validation tokens."""
    args, env = run.args, run.env
    if env.main:
        tokens = load_token_cache(files, args.cache_dir, progress=not args.quiet)
    env.barrier()
    if not env.main:
        tokens = load_token_cache(files, args.cache_dir, progress=False)
    n_val = int(len(tokens) * args.val_fraction)
    run.train_tokens, run.val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    advice = {"training": "add data, or lower --context-length or --val-fraction",
              "validation": "add data, lower --context-length or raise --val-fraction; or pass --eval-every 0"}
    for name, part in (("training", run.train_tokens), ("validation", run.val_tokens)):
        if len(part) <= run.cfg.context_length + 1 and (name == "training" or args.eval_every):
            raise PretrainError(f"the {name} split has {len(part)} tokens, too few for one window of context_length "
                                f"{run.cfg.context_length}: {advice[name]}")


def _train_step(run: _Run) -> tuple[float, float]:
    """One optimizer step: learning rate, micro-batches, divergence check, clipping, update; return (loss, lr)."""
    args, env = run.args, run.env
    lr = learning_rate_at(run.step, args.lr, args.warmup_steps, args.decay_steps,
                          args.min_lr if args.min_lr is not None else args.lr / 10)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    offsets = _rows_of_step(args.seed, run.step, run.rows_per_step, len(run.train_tokens), run.cfg.context_length)
    # dropout masks depend on the step alone, so a resumed run draws the same ones
    torch.manual_seed(int(np.random.SeedSequence([args.seed, _DROPOUT_STREAM, run.step, env.rank])
                          .generate_state(1)[0]))
    step_loss = 0.0
    for micro in range(args.grad_accum):
        inputs, targets = token_batch(run.train_tokens, _my_offsets(offsets, micro, env, args.batch_size),
                                      run.cfg.context_length)
        last = micro == args.grad_accum - 1
        sync = contextlib.nullcontext() if last or not env.enabled else run.forward_model.no_sync()
        with sync, runtime.autocast(env.device, args.precision):
            loss = calc_loss_batch(inputs, targets, run.forward_model, env.device) / args.grad_accum
        with sync:
            loss.backward()
        step_loss += loss.item()
    if env.any(not math.isfinite(step_loss)):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the loss became {step_loss} at step {run.step}; stopped without saving these "
                               f"weights (the last checkpoint in {args.out} is intact). Lower --lr or add "
                               "--warmup-steps.", run.step, {"loss": step_loss, "lr": lr})
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    return step_loss, lr


def _evaluate(run: _Run) -> float:
    """The mean validation loss over ``--eval-batches`` global batches, the same however many processes share them."""
    args, env = run.args, run.env
    offsets = _rows_of_step(args.seed, 0, args.eval_batches * args.batch_size * env.world, len(run.val_tokens),
                            run.cfg.context_length, stream=_VAL_STREAM)
    total = 0.0
    with runtime.eval_mode(run.model), torch.no_grad(), runtime.autocast(env.device, args.precision):
        for batch in range(args.eval_batches):
            rows = _my_offsets(offsets, batch, env, args.batch_size)
            inputs, targets = token_batch(run.val_tokens, rows, run.cfg.context_length)
            total += calc_loss_batch(inputs, targets, run.model, env.device).item() * len(inputs)
    return env.all_mean(total) * env.world / len(offsets)


def _save(run: _Run) -> None:
    if run.env.main:
        run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items() if k != "explicit"}
        save_checkpoint(run.args.out, run.model, run.optimizer, step=run.step, tokens_seen=run.tokens_seen,
                        args=run_args)
    run.env.barrier()


# ---------------------------------------------------------------------------------------------
# logging


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _log(record: dict, out_dir: Path, quiet: bool) -> None:
    with open(out_dir / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if quiet:
        return
    if "note" in record:
        print(record["note"], flush=True)
    elif "val_loss" in record:
        print(f"step {record['step']:>6} | val loss {record['val_loss']:.4f}", flush=True)
    else:
        mfu = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        print(f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"{record['tokens_per_s']:,.0f} tok/s{mfu}", flush=True)


@dataclasses.dataclass
class _Window:
    """Training losses and tokens since the last log line, for its mean loss and tokens per second."""

    peak_flops: float | None
    start: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0
    losses: list = dataclasses.field(default_factory=list)

    def log(self, run: _Run, lr: float) -> None:
        loss = run.env.all_mean(sum(self.losses) / len(self.losses))
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if run.env.main:
            mfu = rate * flops_per_token(run.cfg) / self.peak_flops if self.peak_flops else None
            _log({"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": rate, "mfu": mfu,
                  "tokens_seen": run.tokens_seen}, run.args.out, run.args.quiet)
        self.start, self.tokens, self.losses = time.perf_counter(), 0, []


def _announce(run: _Run, files: list[Path]) -> None:
    if not run.env.main or run.args.quiet:
        return
    n_params = sum(p.numel() for p in run.model.parameters())
    dtype = str(runtime.compute_dtype(run.env.device, run.args.precision)).removeprefix("torch.")
    print(f"model {n_params / 1e6:.1f}M parameters {run.cfg} | {len(files)} files, {len(run.train_tokens):,} train / "
          f"{len(run.val_tokens):,} val tokens | {run.env.world} process(es) on {run.env.device}, {dtype} | "
          f"{run.tokens_per_step:,} tokens per step", flush=True)
    if run.step:
        print(f"resuming at step {run.step}", flush=True)


# ---------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; return 0 (finished or stopped by Ctrl-C, saved).

    Raises ``PretrainError`` (and ``CheckpointError``, ``DataError``, ``OSError``) for a run that
    cannot start, before the first step, and ``TrainingDiverged`` when the loss stops being finite.
    """
    validate_args(args)
    env = _Dist(args.device)
    try:
        return _run(args, env)
    finally:
        env.close()


def _check_cache_dir(args) -> None:
    """Refuse a token cache folder that is a file, or lies below one, before any work."""
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    named = f"--cache-dir {cache_dir}" if args.cache_dir is not None else f"the token cache folder {cache_dir}"
    for folder in (cache_dir, *cache_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == cache_dir else f"lies below the file {folder}"
                raise PretrainError(f"{named} {where}, not a folder; choose a folder for the token cache")
            return


def _run(args, env: _Dist) -> int:
    _check_cache_dir(args)
    with contextlib.ExitStack() as locks:
        _prepare_out_dir(args, env, locks)
        return _run_locked(args, env)


def _run_locked(args, env: _Dist) -> int:
    files = expand_data_paths(args.data)
    run = _build_model(args, env)
    _load_splits(run, files)
    _announce(run, files)
    if run.resume_changes and env.main:
        _log({"step": run.step, "note": f"resume: {run.resume_changes}"}, args.out, args.quiet)
    interrupted = _train(run)
    _save(run)
    if env.main and not args.quiet:
        weights_path, state_path = checkpoint_paths(args.out)
        reason = "interrupted" if interrupted else "done"
        print(f"{reason} at step {run.step}; weights in {weights_path}, resume state in {state_path.name}"
              + (" (continue with --resume)" if interrupted else ""), flush=True)
    return 0


def _train(run: _Run) -> bool:
    """Step until ``--max-steps``, logging, evaluating and saving on schedule; True if Ctrl-C stopped it."""
    args = run.args
    window = _Window(runtime.peak_flops(run.env.device, args.peak_flops)[0] if run.env.main else None)
    run.model.train()
    with _StopRequest() as stop:
        while run.step < args.max_steps:
            loss, lr = _train_step(run)
            window.tokens += run.tokens_per_step
            window.losses.append(loss)
            last = run.step == args.max_steps
            if run.step % args.log_every == 0 or last:
                window.log(run, lr)
            if args.eval_every and (run.step % args.eval_every == 0 or last):
                val_loss = _evaluate(run)
                if run.env.main:
                    _log({"step": run.step, "val_loss": val_loss}, args.out, args.quiet)
            if args.save_every and run.step % args.save_every == 0 and not last:
                _save(run)
            if run.env.any(stop.requested):
                return True
    return False


def _explicit_options(argv: list[str] | None) -> frozenset[str]:
    """The destinations of the options given on the command line (parsed again with every default suppressed)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: run, and turn a failure into one line on stderr and an exit status.

    0: finished or stopped by Ctrl-C (saved); 1: the loss diverged; 2: bad options, data or folders.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = _explicit_options(argv)
    try:
        return run(args)
    except TrainingDiverged as error:
        print(f"{parser.prog}: {error}", file=sys.stderr, flush=True)
        return 1
    except (PretrainError, CheckpointError, DataError, ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
