"""Pretraining (Part 07): losses over batches and loaders, evaluation, the training loop, checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from helpers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from helpers.generate import generate, text_to_token_ids, token_ids_to_text
from helpers.losses import chunked_cross_entropy
from helpers.model import GPTModel
from helpers.runtime import eval_mode, unwrap_model

__all__ = [
    "CheckpointError",
    "TrainingDiverged",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "learning_rate_at",
    "load_checkpoint",
    "save_checkpoint",
    "train_model",
    "unwrap_model",
]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; ``step`` says when and ``history`` holds what was recorded."""

    def __init__(self, message: str, step: int, history: dict):
        super().__init__(message)
        self.step = step
        self.history = history


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (a scalar tensor that can be backpropagated).

    For a ``GPTModel`` (also wrapped) the output head is applied chunk by chunk
    (``chunked_cross_entropy``), so the full logits are never materialised; other models go
    through their logits and ``F.cross_entropy``. Targets of -100 are ignored.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    core = unwrap_model(model)
    if isinstance(core, GPTModel):
        hidden = model(input_batch, return_hidden=True)
        return chunked_cross_entropy(hidden, core.out_head.weight, target_batch)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Average batch loss over the first ``num_batches`` batches (all by default); NaN if there are none."""
    total, count = 0.0, 0
    limit = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if limit == 0:
        warnings.warn("calc_loss_loader got an empty loader (too little data for one batch?); returning NaN",
                      stacklevel=2)
        return float("nan")
    with torch.no_grad():
        for index, (input_batch, target_batch) in enumerate(data_loader):
            if index >= limit:
                break
            total += calc_loss_batch(input_batch, target_batch, model, device).item()
            count += 1
    return total / count


def evaluate_model(model: nn.Module, train_loader: Iterable, val_loader: Iterable, device: torch.device | str,
                   eval_iter: int) -> tuple[float, float]:
    """Return ``(train_loss, val_loss)`` over ``eval_iter`` batches each, in eval mode (restored after)."""
    with eval_mode(model):
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    return train_loss, val_loss


def learning_rate_at(step: int, peak_lr: float, warmup_steps: int = 0, decay_steps: int | None = None,
                     min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``.

    Warmup rises to ``peak_lr`` over ``warmup_steps``; the cosine then falls over ``decay_steps``
    and stays at ``min_lr``. Without ``decay_steps`` the rate stays at ``peak_lr`` after warmup.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if not decay_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device, bf16: bool | None):
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sample(model: nn.Module, tokenizer, start_context: str, device: torch.device, max_new_tokens: int) -> str:
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    try:
        idx = text_to_token_ids(start_context, tokenizer).to(device)
        return token_ids_to_text(generate(core, idx, max_new_tokens), tokenizer)
    finally:
        core.train(was_training)


def train_model(model: nn.Module, train_loader: Iterable, val_loader: Iterable, optimizer: torch.optim.Optimizer,
                device: torch.device | str, num_epochs: int, eval_freq: int, eval_iter: int,
                start_context: str | None = None, tokenizer=None, *, warmup_steps: int = 0,
                cosine_decay: bool = False, min_lr_ratio: float = 0.1, grad_clip: float | None = None,
                grad_accum_steps: int = 1, bf16: bool | None = None, compile: bool = False,
                sample_tokens: int = 50, verbose: bool = True, progress: bool = True) -> dict:
    """Train for ``num_epochs`` and return the history.

    Every ``eval_freq`` optimizer steps the train and validation losses are measured over
    ``eval_iter`` batches; with ``start_context`` and ``tokenizer`` a greedy sample follows each
    epoch. Options: ``warmup_steps`` (linear warmup to the optimizer's lr), ``cosine_decay`` (then
    down to ``min_lr_ratio`` x lr by the last step), ``grad_clip`` (max gradient norm),
    ``grad_accum_steps`` (micro-batches per optimizer step), ``bf16`` (autocast; default on for
    CUDA with bf16), ``compile`` (``torch.compile`` the model). ``verbose`` prints the evaluations;
    ``progress`` shows a tqdm bar with the loss and tokens/s.

    The history has ``train_losses``, ``val_losses``, ``tokens_seen``, ``steps`` and ``epochs`` (one
    entry per evaluation), ``learning_rates`` (one per step) and ``samples`` (one per epoch).
    A NaN or infinite loss raises ``TrainingDiverged`` naming the step.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if eval_freq < 1:
        raise ValueError(f"eval_freq must be >= 1, got {eval_freq}")
    device = torch.device(device)
    history: dict[str, list] = {key: [] for key in
                                ("train_losses", "val_losses", "tokens_seen", "steps", "epochs", "learning_rates",
                                 "samples")}
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError("train_loader yields no batches: use more text, a smaller batch_size or drop_last=False")
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum_steps)
    total_steps = steps_per_epoch * num_epochs
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    schedule = warmup_steps > 0 or cosine_decay
    decay_steps = max(1, total_steps - warmup_steps) if cosine_decay else None

    forward_model = torch.compile(model) if compile else model
    model.train()
    tokens_seen, step = 0, 0
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not progress, mininterval=1.0)
    started = time.perf_counter()
    try:
        for epoch in range(num_epochs):
            optimizer.zero_grad(set_to_none=True)
            for batch_index, (input_batch, target_batch) in enumerate(train_loader):
                with _autocast(device, bf16):
                    loss = calc_loss_batch(input_batch, target_batch, forward_model, device)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch + 1}, batch {batch_index}); "
                        "lower the learning rate, add warmup or gradient clipping", step, history)
                # the last group of an epoch may hold fewer micro-batches than grad_accum_steps
                group_start = (batch_index // grad_accum_steps) * grad_accum_steps
                group_size = min(grad_accum_steps, batches_per_epoch - group_start)
                (loss / group_size).backward()
                tokens_seen += input_batch.numel()
                if (batch_index + 1) % grad_accum_steps != 0 and batch_index + 1 != batches_per_epoch:
                    continue
                if schedule:
                    for group, peak in zip(optimizer.param_groups, peak_lrs):
                        group["lr"] = learning_rate_at(step, peak, warmup_steps, decay_steps, peak * min_lr_ratio)
                history["learning_rates"].append(optimizer.param_groups[0]["lr"])
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}",
                                refresh=False)

                if step % eval_freq == 0 or step == total_steps:
                    train_loss, val_loss = evaluate_model(forward_model, train_loader, val_loader, device, eval_iter)
                    history["train_losses"].append(train_loss)
                    history["val_losses"].append(val_loss)
                    history["tokens_seen"].append(tokens_seen)
                    history["steps"].append(step)
                    history["epochs"].append(epoch + (batch_index + 1) / batches_per_epoch)
                    if verbose:
                        bar.write(f"epoch {epoch + 1} (step {step:4d}): train loss {train_loss:.3f}, "
                                  f"val loss {val_loss:.3f}")
            if start_context is not None and tokenizer is not None:
                sample = _sample(model, tokenizer, start_context, device, sample_tokens)
                history["samples"].append(sample)
                if verbose:
                    bar.write(f"  sample after epoch {epoch + 1}: {sample!r}")
    finally:
        bar.close()
    return history
