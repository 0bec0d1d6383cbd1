"""Pretrain a GPT model from text files: ``python -m helpers.pretrain --data PATH --out DIR [options]``.

Runs as is on one CPU or GPU, and under ``torchrun --nproc_per_node N`` (also across nodes) with
DistributedDataParallel: gloo on CPU, nccl on CUDA. Only rank 0 writes files and logs.

Determinism. The rows of step ``s`` are drawn for the whole global batch
(``--batch-size`` x processes x ``--grad-accum``) from ``(--seed, s)``, and each process takes its
own rows, so a run's result does not depend on how many processes share it. Dropout is reseeded
from ``(--seed, s, rank)`` every step and the learning rate is a function of the step alone, so
stopping and ``--resume`` continue exactly where a single run would be.

Files. ``DIR/model.safetensors`` holds the latest weights (loadable by
``helpers.train.load_checkpoint`` and ``helpers.weights.load_gpt2``), ``DIR/model.state.pt`` the
optimizer state and step beside it, ``DIR/log.jsonl`` one line per logged step. Ctrl-C (or
SIGTERM) finishes the current step, saves, and exits.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. The achieved FLOPs per token are
``6 * N + 12 * n_layers * emb_dim * context_length`` (N: weights used in matrix products, output
head included, embeddings lookups excluded; 6 = 2 FLOPs per multiply-add x forward + 2x backward;
the second term is attention's score and value products). The peak is ``--peak-flops``, else
``$LLM_PEAK_FLOPS``, else a table of known GPUs (bf16 dense), else, on a CPU, a float32 matmul
measured at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from helpers.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from helpers.corpus import default_cache_dir, expand_data_paths, load_token_cache, token_batch
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel, init_gpt2_weights
from helpers.runtime import device as best_device
from helpers.train import calc_loss_batch, learning_rate_at

# Peak dense bf16 FLOP/s of common accelerators, by a substring of torch.cuda.get_device_name().
KNOWN_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "T4": 65e12,
                    "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="PATH",
                      help="a text file, a folder of .txt files, or a helpers.data dataset name; repeatable")
    data.add_argument("--out", required=True, type=Path, metavar="DIR", help="where weights, state and log go")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help=f"token cache folder (default $LLM_CACHE_DIR or {default_cache_dir()})")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation")
    model = parser.add_argument_group("model (a --preset, optionally overridden by the sizes)")
    model.add_argument("--preset", choices=sorted(GPT_CONFIGS), default=None)
    model.add_argument("--n-layers", type=int)
    model.add_argument("--n-heads", type=int)
    model.add_argument("--emb-dim", type=int)
    model.add_argument("--context-length", type=int)
    model.add_argument("--dropout", type=float)
    model.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
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
    system.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype via autocast (default bfloat16 on GPUs that support it, else float32)")
    system.add_argument("--compile", action="store_true", help="torch.compile the model")
    system.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (see above)")
    system.add_argument("--quiet", action="store_true", help="no log lines on stdout (log.jsonl is still written)")
    return parser


# ---------------------------------------------------------------------------------------------
# set-up


class _Dist:
    """This process's place in a torchrun job (or a lone process)."""

    def __init__(self, requested_device: str | None):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(requested_device) if requested_device else best_device()
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


def _model_config(args, saved: dict | None) -> GPTConfig:
    sizes = {"n_layers": args.n_layers, "n_heads": args.n_heads, "emb_dim": args.emb_dim,
             "context_length": args.context_length, "drop_rate": args.dropout}
    given = {key: value for key, value in sizes.items() if value is not None}
    if saved is not None:
        config = GPTConfig.from_dict(saved)
        clashes = [f"--{k.replace('_', '-')} {v} (saved: {getattr(config, k)})" for k, v in given.items()
                   if getattr(config, k) != v]
        if clashes:
            raise SystemExit(f"--resume continues the saved model, but these options differ: {', '.join(clashes)}")
        return config
    base = GPT_CONFIGS[args.preset] if args.preset else GPTConfig(emb_dim=256, n_heads=4, n_layers=4,
                                                                   context_length=256, drop_rate=0.0)
    values = {**base.to_dict(), **given}
    if args.tie_weights:
        values["tie_weights"] = True
    return GPTConfig(**values)


def _optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    # decay matrices and embeddings, not biases and LayerNorm parameters
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **extra)


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token (forward and backward) of a ``GPTModel``; see the module docstring."""
    per_block = 4 * cfg.emb_dim * cfg.emb_dim + 8 * cfg.emb_dim * cfg.emb_dim  # attention projections + MLP
    matmul_weights = cfg.n_layers * per_block + cfg.vocab_size * cfg.emb_dim
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length


def measure_cpu_peak_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 matmul FLOP/s of this CPU (square matrices of ``size``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):  # the best of three, so a moment of contention does not lower the peak
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def _peak_flops(args, device: torch.device) -> float | None:
    if args.peak_flops:
        return args.peak_flops
    if os.environ.get("LLM_PEAK_FLOPS"):
        return float(os.environ["LLM_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in KNOWN_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return measure_cpu_peak_flops()
    return None


# ---------------------------------------------------------------------------------------------
# batches


_TRAIN_STREAM, _VAL_STREAM, _DROPOUT_STREAM = 0, 1, 2


def _rows_of_step(seed: int, step: int, n_rows: int, n_tokens: int, context_length: int,
                  stream: int = _TRAIN_STREAM) -> np.ndarray:
    """Window start offsets for one step, a pure function of (seed, stream, step)."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - context_length, size=n_rows)


def _my_offsets(offsets: np.ndarray, micro: int, env: _Dist, batch_size: int) -> np.ndarray:
    start = (micro * env.world + env.rank) * batch_size
    return offsets[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# the run


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
    if "val_loss" in record:
        print(f"step {record['step']:>6} | val loss {record['val_loss']:.4f}", flush=True)
    else:
        mfu = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        print(f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"{record['tokens_per_s']:,.0f} tok/s{mfu}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; return the process exit code."""
    env = _Dist(args.device)
    try:
        return _run(args, env)
    finally:
        env.close()


def _run(args, env: _Dist) -> int:
    out_dir: Path = args.out
    weights_path, state_path = checkpoint_paths(out_dir)
    if args.resume and not weights_path.is_file():
        raise SystemExit(f"--resume: {out_dir} holds no checkpoint ({weights_path.name}) to continue")
    if not args.resume and weights_path.exists():
        raise SystemExit(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        stale_log = out_dir / "log.jsonl"
        if not args.resume and stale_log.exists():  # left by a run that never saved: keep it aside
            os.replace(stale_log, out_dir / f"log.{int(time.time())}.jsonl")

    files = expand_data_paths(args.data)
    if env.main:
        tokens = load_token_cache(files, args.cache_dir, progress=not args.quiet)
    env.barrier()
    if not env.main:
        tokens = load_token_cache(files, args.cache_dir, progress=False)
    n_val = int(len(tokens) * args.val_fraction)
    train_tokens, val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]

    saved_config = None
    if args.resume:
        saved_config = json.loads(_safetensors_config(weights_path))
    cfg = _model_config(args, saved_config)
    for name, part in (("training", train_tokens), ("validation", val_tokens)):
        if len(part) <= cfg.context_length + 1 and (name == "training" or args.eval_every):
            raise SystemExit(f"the {name} split has {len(part)} tokens, too few for one window of "
                             f"context_length {cfg.context_length}; add data or lower --context-length/--val-fraction")

    torch.manual_seed(args.seed)
    model = init_gpt2_weights(GPTModel(cfg)).to(env.device)
    optimizer = _optimizer(model, args, env.device)
    start_step, tokens_seen = 0, 0
    if args.resume:
        state = load_checkpoint(out_dir, model, optimizer)
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
    forward_model = model
    if env.enabled:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if args.compile:
        forward_model = torch.compile(forward_model)

    dtype = args.dtype or ("bfloat16" if env.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    rows_per_step = args.batch_size * env.world * args.grad_accum
    tokens_per_step = rows_per_step * cfg.context_length
    peak = _peak_flops(args, env.device) if env.main else None
    if env.main and not args.quiet:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {n_params / 1e6:.1f}M parameters {cfg} | {len(files)} files, {len(train_tokens):,} train / "
              f"{len(val_tokens):,} val tokens | {env.world} process(es) on {env.device}, {dtype} | "
              f"{tokens_per_step:,} tokens per step", flush=True)
        if start_step:
            print(f"resuming at step {start_step}", flush=True)

    def save(step: int) -> None:
        if env.main:
            run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            save_checkpoint(out_dir, model, optimizer, step=step, tokens_seen=tokens_seen, args=run_args)
        env.barrier()

    def evaluate(step: int) -> None:
        model.eval()
        # the same rows however many processes share the global batch
        offsets = _rows_of_step(args.seed, 0, args.eval_batches * args.batch_size * env.world, len(val_tokens),
                                cfg.context_length, stream=_VAL_STREAM)
        mine = [o for i, o in enumerate(offsets) if (i // args.batch_size) % env.world == env.rank]
        total = 0.0
        with torch.no_grad(), autocast:
            for start in range(0, len(mine), args.batch_size):
                inputs, targets = token_batch(val_tokens, mine[start : start + args.batch_size], cfg.context_length)
                total += calc_loss_batch(inputs, targets, model, env.device).item() * len(inputs)
        loss = env.all_mean(total) * env.world / len(offsets)
        model.train()
        if env.main:
            _log({"step": step, "val_loss": loss}, out_dir, args.quiet)

    model.train()
    step, interrupted = start_step, False
    window_start, window_tokens, window_losses = time.perf_counter(), 0, []
    with _StopRequest() as stop:
        while step < args.max_steps:
            lr = learning_rate_at(step, args.lr, args.warmup_steps, args.decay_steps, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = _rows_of_step(args.seed, step, rows_per_step, len(train_tokens), cfg.context_length)
            # dropout masks depend on the step alone, so a resumed run draws the same ones
            torch.manual_seed(int(np.random.SeedSequence([args.seed, _DROPOUT_STREAM, step, env.rank])
                                  .generate_state(1)[0]))
            step_loss = 0.0
            for micro in range(args.grad_accum):
                inputs, targets = token_batch(train_tokens, _my_offsets(offsets, micro, env, args.batch_size),
                                              cfg.context_length)
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext() if last or not env.enabled else forward_model.no_sync()
                with sync, autocast:
                    loss = calc_loss_batch(inputs, targets, forward_model, env.device) / args.grad_accum
                with sync:
                    loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                if env.main:
                    print(f"the loss became {step_loss} at step {step}; stopping without saving these weights "
                          f"(the last checkpoint in {out_dir} is intact). Lower --lr or add --warmup-steps.",
                          file=sys.stderr, flush=True)
                return 1
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            window_losses.append(step_loss)

            if step % args.log_every == 0 or step == args.max_steps:
                loss_value = env.all_mean(sum(window_losses) / len(window_losses))  # mean since the last log
                elapsed = time.perf_counter() - window_start
                rate = window_tokens / max(elapsed, 1e-9)
                if env.main:
                    mfu = rate * flops_per_token(cfg) / peak if peak else None
                    _log({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": rate, "mfu": mfu,
                          "tokens_seen": tokens_seen}, out_dir, args.quiet)
                window_start, window_tokens, window_losses = time.perf_counter(), 0, []
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
                evaluate(step)
            if args.save_every and step % args.save_every == 0 and step != args.max_steps:
                save(step)
            if env.any(stop.requested):
                interrupted = True
                break
    save(step)
    if env.main and not args.quiet:
        reason = "interrupted" if interrupted else "done"
        print(f"{reason} at step {step}; weights in {weights_path}, resume state in {state_path.name}"
              + (" (continue with --resume)" if interrupted else ""), flush=True)
    return 0


def _safetensors_config(weights_path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as handle:
        config = (handle.metadata() or {}).get("config")
    if not config or config == "null":
        raise SystemExit(f"{weights_path} has no model config in its metadata; it was not written by this command")
    return config


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
