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
from helpers.distributed import DistributedProcess as _Dist
from helpers.pretrain_config import (
    default_hidden_dim,
    flops_per_token,
    keep_saved_options,
    model_config,
    new_model,
    resume_changes,
)
from helpers.pretrain_options import PretrainError, build_parser, explicit_options, validate_args
from helpers.train import TrainingDiverged, calc_loss_batch, learning_rate_at

__all__ = ["PretrainError", "build_parser", "default_hidden_dim", "flops_per_token", "main", "run", "validate_args"]


# ---------------------------------------------------------------------------------------------
# the optimizer


def _optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    # decay matrices and embeddings, not biases and LayerNorm parameters
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **extra)


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
    cfg: object  # a GPTConfig or ModernConfig (helpers.architectures)
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
    args.arch, cfg = model_config(args, saved, read_arch(args.out) if args.resume else None)
    torch.manual_seed(args.seed)
    model = new_model(args.arch, cfg, None if args.resume else args.init or "gpt2")
    model.to(env.device)
    run = _Run(args, env, cfg, model, _optimizer(model, args, env.device))
    if args.resume:
        state = load_checkpoint(args.out, model, run.optimizer)
        keep_saved_options(args, state.get("args") or {})
        for group, wanted in zip(run.optimizer.param_groups, _optimizer(model, args, env.device).param_groups):
            # loading restored the saved settings (weight decay...): this run's options win
            group.update({key: value for key, value in wanted.items() if key != "params"})
        run.resume_changes = resume_changes(state.get("args") or {}, args)
        run.step, run.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        if args.max_steps <= run.step:
            raise PretrainError(f"--max-steps {args.max_steps} is not beyond the saved step {run.step}; "
                                "pass a larger --max-steps to continue training")
        if env.main:
            _trim_log(args.out / "log.jsonl", run.step)
    run.forward_model = _wrap(model, env, args.compile)
    return run


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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: run, and turn a failure into one line on stderr and an exit status.

    0: finished or stopped by Ctrl-C (saved); 1: the loss diverged; 2: bad options, data or folders.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_options(argv)
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
