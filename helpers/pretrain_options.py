"""The pretraining command's options (``python -m helpers.pretrain --help``) and their checks.

``build_parser`` declares them in groups (data, model, modern model, training, system);
``validate_args`` refuses, before any work, every value out of range and every option that does not
fit the architecture asked for, in one ``PretrainError`` naming them all. The presets offered are
those of every architecture in ``helpers.architectures``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from helpers.architectures import ARCHITECTURES, preset_architecture
from helpers.corpus import default_cache_dir

__all__ = ["MODERN_OPTIONS", "SIZE_OPTIONS", "PretrainError", "build_parser", "explicit_options", "given_sizes",
           "option_text", "requested_arch", "validate_args"]


class PretrainError(Exception):
    """A run cannot start or continue as asked; the message names the option or file and what to do."""


_DESCRIPTION = ("Pretrain a GPT-2 or a modern model from text files: python -m helpers.pretrain --data PATH --out DIR "
                "[options]. The module's documentation (python -m pydoc helpers.pretrain) explains each choice.")


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (``--help`` lists them with their defaults)."""
    parser = argparse.ArgumentParser(prog="python -m helpers.pretrain", description=_DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add_group in (_data_options, _model_options, _modern_options, _training_options, _system_options):
        add_group(parser)
    return parser


def _data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="PATH",
                      help="a text file, a folder of .txt files, or a helpers.data dataset name; repeatable")
    data.add_argument("--out", required=True, type=Path, metavar="DIR", help="where weights, state and log go")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help=f"token cache folder (default $LLM_CACHE_DIR or {default_cache_dir()})")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation")


def _model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (an --arch and a --preset, optionally overridden by the sizes)")
    model.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                       help="GPT-2, or the modern decoder of Part 10 (default gpt2; modern for a modern --preset; "
                            "with --resume the saved run's)")
    presets = [name for arch in ARCHITECTURES.values() for name in sorted(arch.preset_configs)]
    model.add_argument("--preset", choices=presets, default=None, help="the sizes of a published model")
    model.add_argument("--n-layers", type=int)
    model.add_argument("--n-heads", type=int)
    model.add_argument("--emb-dim", type=int)
    model.add_argument("--context-length", type=int)
    model.add_argument("--dropout", type=float)
    model.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
    model.add_argument("--init", choices=["gpt2", "pytorch"], default=None,
                       help="initialisation of a new model (default gpt2: GPT-2's scheme; pytorch: each layer's own)")


def _modern_options(parser: argparse.ArgumentParser) -> None:
    modern = parser.add_argument_group("modern model (--arch modern; unset: derived from the sizes)")
    modern.add_argument("--n-kv-heads", type=int, help="key/value heads, dividing n_heads (default n_heads / 2)")
    modern.add_argument("--head-dim", type=int, help="dimensions per head (default emb_dim / n_heads)")
    modern.add_argument("--hidden-dim", type=int, help="SwiGLU's inner width (default 8/3 x emb_dim, to 64s)")
    modern.add_argument("--rope-theta", type=float, help="RoPE's base period (default 10000)")
    modern.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="RMSNorm over each head's queries and keys, as Qwen3 (default on)")


def _training_options(parser: argparse.ArgumentParser) -> None:
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


def _system_options(parser: argparse.ArgumentParser) -> None:
    system = parser.add_argument_group("system")
    system.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    system.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="compute dtype under autocast (auto: bfloat16 on a CUDA GPU that has it, else float32)")
    system.add_argument("--dtype", dest="precision", choices=["float32", "bfloat16", "float16"],
                        help=argparse.SUPPRESS)  # the former name of --precision
    system.add_argument("--compile", action="store_true", help="torch.compile the model")
    system.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU (default $LLM_PEAK_FLOPS, a table of GPUs, or a measured CPU matmul)")
    system.add_argument("--quiet", action="store_true", help="no log lines on stdout (log.jsonl is still written)")


# config field -> option: the sizes of either architecture, then the modern model's own
SIZE_OPTIONS = {"n_layers": "n-layers", "n_heads": "n-heads", "emb_dim": "emb-dim",
                "context_length": "context-length", "drop_rate": "dropout"}
MODERN_OPTIONS = {"n_kv_heads": "n-kv-heads", "head_dim": "head-dim", "hidden_dim": "hidden-dim",
                  "rope_theta": "rope-theta", "qk_norm": "qk-norm"}


def given_sizes(args) -> dict:
    """The config fields the size options set on this command line (those left out are absent)."""
    sizes = {"n_layers": args.n_layers, "n_heads": args.n_heads, "emb_dim": args.emb_dim,
             "context_length": args.context_length, "drop_rate": args.dropout,
             **{key: getattr(args, key, None) for key in MODERN_OPTIONS}}
    return {key: value for key, value in sizes.items() if value is not None}


def option_text(key: str, value) -> str:
    """How the option that sets config field ``key`` to ``value`` is written: ``--emb-dim 64``, ``--no-qk-norm``."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{MODERN_OPTIONS[key]}"
    return f"--{({**SIZE_OPTIONS, **MODERN_OPTIONS})[key]} {value}"


def requested_arch(args) -> str | None:
    """The architecture the command line asks for: ``--arch``, else a modern ``--preset``'s; None if neither says."""
    if args.arch is not None:
        return args.arch
    preset_arch = preset_architecture(args.preset) if args.preset else None
    return None if preset_arch == "gpt2" else preset_arch  # GPT-2's sizes serve either architecture


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
    preset_arch = preset_architecture(args.preset) if args.preset else None
    if args.arch == "gpt2" and preset_arch not in (None, "gpt2"):
        problems.append(f"--preset {args.preset} is a {preset_arch} model: pass --arch {preset_arch} (or leave --arch "
                        "out)")
    modern_given = [option_text(key, value) for key, value in given_sizes(args).items() if key in MODERN_OPTIONS]
    arch = requested_arch(args)
    if modern_given and (arch == "gpt2" or (arch is None and not getattr(args, "resume", False))):
        problems.append(f"{', '.join(modern_given)} sets the modern model, which GPT-2 has no place for: add "
                        "--arch modern, or leave it out")
    return problems


def explicit_options(argv: list[str] | None) -> frozenset[str]:
    """The destinations of the options given on the command line (parsed again with every default suppressed)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))
