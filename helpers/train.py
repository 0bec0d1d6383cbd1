"""Pretraining (Part 07): losses over batches and loaders, evaluation, the training loop, checkpoints."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from helpers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from helpers.generate import generate, text_to_token_ids, token_ids_to_text
from helpers.losses import chunked_cross_entropy
from helpers.runtime import PRECISIONS, autocast, check_count, eval_mode, unwrap_model

__all__ = [
    "CheckpointError",
    "TrainingDiverged",
    "TrainingOptions",
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

    For a model (also wrapped) whose ``forward`` takes ``return_hidden`` and whose ``out_head`` is a
    bias-free ``nn.Linear`` (``GPTModel``, ``helpers.modern.ModernModel``) the output head is applied
    chunk by chunk (``chunked_cross_entropy``), so the full logits are never materialised; other
    models go through their logits and ``F.cross_entropy``. Targets of -100 are ignored.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    core = unwrap_model(model)
    if _has_plain_head(core):
        hidden = model(input_batch, return_hidden=True)
        return chunked_cross_entropy(hidden, core.out_head.weight, target_batch)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def _has_plain_head(model: nn.Module) -> bool:
    """True if ``model(x, return_hidden=True)`` gives the states a bias-free ``model.out_head`` makes logits of."""
    head = getattr(model, "out_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    try:
        return "return_hidden" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


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


# ---------------------------------------------------------------------------------------------
# train_model: the book's loop, plus the options a longer run needs


@dataclass(frozen=True)
class TrainingOptions:
    """What ``train_model`` adds to the book's loop; the defaults leave the loop exactly as the book writes it.

    ``warmup_steps``: linear warmup to the optimizer's lr. ``cosine_decay``: then down to
    ``min_lr_ratio`` x lr by the last step. ``grad_clip``: the largest gradient norm (None: no clipping).
    ``grad_accum_steps``: micro-batches per optimizer step. ``precision``: the dtype the forward pass
    computes in, ``"float32"`` (default, on every device), ``"bfloat16"``, ``"float16"`` or ``"auto"``
    (bfloat16 on a GPU that supports it). ``compile``: ``torch.compile`` the model first.
    """

    warmup_steps: int = 0
    cosine_decay: bool = False
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None
    grad_accum_steps: int = 1
    precision: str = "float32"
    compile: bool = False

    def __post_init__(self):
        check_count("warmup_steps", self.warmup_steps, minimum=0)
        check_count("grad_accum_steps", self.grad_accum_steps, minimum=1)
        if not (math.isfinite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None (no clipping), got {self.grad_clip}; "
                             "a negative norm would turn the update into gradient ascent")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class _Run:
    """The state one ``train_model`` call carries from step to step."""

    model: nn.Module  # what the forward pass calls (compiled, if asked)
    optimizer: torch.optim.Optimizer
    device: torch.device
    options: TrainingOptions
    total_steps: int
    peak_lrs: list[float]
    step: int = 0
    tokens_seen: int = 0
    history: dict[str, list] = field(default_factory=lambda: {key: [] for key in (
        "train_losses", "val_losses", "tokens_seen", "steps", "epochs", "learning_rates", "samples")})

    def set_learning_rate(self) -> None:
        """Apply warmup and cosine decay for this step (when asked) and record the rate."""
        opts = self.options
        if opts.warmup_steps or opts.cosine_decay:
            decay_steps = max(1, self.total_steps - opts.warmup_steps) if opts.cosine_decay else None
            for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                group["lr"] = learning_rate_at(self.step, peak, opts.warmup_steps, decay_steps,
                                               peak * opts.min_lr_ratio)
        self.history["learning_rates"].append(self.optimizer.param_groups[0]["lr"])


def _accumulation_groups(loader: Iterable, group_size: int):
    """Yield lists of up to ``group_size`` consecutive batches: one list per optimizer step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == group_size:
            yield group
            group = []
    if group:  # the last group of an epoch may be smaller
        yield group


def _backward_group(run: _Run, group: list, epoch: int) -> float:
    """Forward and backward every micro-batch of one optimizer step; return the last micro-batch's loss."""
    for index, (input_batch, target_batch) in enumerate(group):
        with autocast(run.device, run.options.precision):
            loss = calc_loss_batch(input_batch, target_batch, run.model, run.device)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {run.step} (epoch {epoch + 1}, micro-batch {index}); "
                "lower the learning rate, add warmup or gradient clipping", run.step, run.history)
        (loss / len(group)).backward()  # the mean over the group, as one larger batch would give
        run.tokens_seen += input_batch.numel()
    return loss.item()


def _optimizer_step(run: _Run, parameters: list[nn.Parameter]) -> None:
    if run.options.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parameters, run.options.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1


def _record_evaluation(run: _Run, train_loader, val_loader, eval_iter: int, epoch_progress: float) -> str:
    train_loss, val_loss = evaluate_model(run.model, train_loader, val_loader, run.device, eval_iter)
    for key, value in (("train_losses", train_loss), ("val_losses", val_loss), ("tokens_seen", run.tokens_seen),
                       ("steps", run.step), ("epochs", epoch_progress)):
        run.history[key].append(value)
    return (f"epoch {math.ceil(epoch_progress)} (step {run.step:4d}): train loss {train_loss:.3f}, "
            f"val loss {val_loss:.3f}")


def _sample(model: nn.Module, tokenizer, start_context: str, device: torch.device, max_new_tokens: int) -> str:
    core = unwrap_model(model)
    with eval_mode(core):
        idx = text_to_token_ids(start_context, tokenizer).to(device)
        return token_ids_to_text(generate(core, idx, max_new_tokens), tokenizer)


def train_model(model: nn.Module, train_loader: Iterable, val_loader: Iterable, optimizer: torch.optim.Optimizer,
                device: torch.device | str, num_epochs: int, eval_freq: int, eval_iter: int,
                start_context: str | None = None, tokenizer=None, *, options: TrainingOptions | None = None,
                sample_tokens: int = 50, verbose: bool = True, progress: bool = True, **option_values) -> dict:
    """Train for ``num_epochs`` and return the history: Part 07's loop, with ``TrainingOptions`` on top.

    The loop is the book's: for every batch zero the gradients, compute the loss, backpropagate and
    step; every ``eval_freq`` optimizer steps (and after the last) measure the train and validation
    losses over ``eval_iter`` batches; with ``start_context`` and ``tokenizer`` print a greedy sample of
    ``sample_tokens`` after each epoch. ``verbose`` prints the evaluations; ``progress`` shows a tqdm bar.

    The additions (warmup, cosine decay, clipping, accumulation, precision, compile) come as
    ``options=TrainingOptions(...)`` or as the same names in keywords (``grad_clip=1.0``). ``bf16=True``
    is an old spelling of ``precision="bfloat16"``.

    The history has ``train_losses``, ``val_losses``, ``tokens_seen``, ``steps`` and ``epochs`` (one
    entry per evaluation), ``learning_rates`` (one per step) and ``samples`` (one per epoch).
    A NaN or infinite loss raises ``TrainingDiverged`` naming the step.
    """
    options = _resolve_options(options, option_values)
    check_count("num_epochs", num_epochs, minimum=0)
    check_count("eval_freq", eval_freq, minimum=1)
    check_count("eval_iter", eval_iter, minimum=1)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError("train_loader yields no batches: use more text, a smaller batch_size or drop_last=False")
    steps_per_epoch = math.ceil(batches_per_epoch / options.grad_accum_steps)
    run = _Run(torch.compile(model) if options.compile else model, optimizer, torch.device(device), options,
               total_steps=steps_per_epoch * num_epochs, peak_lrs=[g["lr"] for g in optimizer.param_groups])
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    model.train()
    bar = tqdm(total=run.total_steps, desc="training", unit="step", disable=not progress, mininterval=1.0)
    report = bar.write if verbose else (lambda _: None)  # bar.write keeps the bar below the printed lines
    started = time.perf_counter()
    with bar:
        for epoch in range(num_epochs):
            optimizer.zero_grad(set_to_none=True)
            for index, group in enumerate(_accumulation_groups(train_loader, options.grad_accum_steps)):
                loss = _backward_group(run, group, epoch)
                run.set_learning_rate()
                _optimizer_step(run, parameters)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False,
                                tok_s=f"{run.tokens_seen / max(time.perf_counter() - started, 1e-9):,.0f}")
                if run.step % eval_freq == 0 or run.step == run.total_steps:
                    report(_record_evaluation(run, train_loader, val_loader, eval_iter,
                                              epoch + (index + 1) / steps_per_epoch))
            if start_context is not None and tokenizer is not None:
                run.history["samples"].append(_sample(model, tokenizer, start_context, run.device, sample_tokens))
                report(f"  sample after epoch {epoch + 1}: {run.history['samples'][-1]!r}")
    return run.history


def _resolve_options(options: TrainingOptions | None, values: dict) -> TrainingOptions:
    """One ``TrainingOptions`` from ``options=`` or keyword arguments (not both)."""
    if "bf16" in values:  # the older spelling
        bf16 = values.pop("bf16")
        if bf16 is not None:
            values.setdefault("precision", "bfloat16" if bf16 else "float32")
    known = set(TrainingOptions.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise TypeError(f"train_model got unexpected keyword arguments {sorted(unknown)}; "
                        f"the training options are {sorted(known)}")
    if options is not None and values:
        raise TypeError("pass the training options either as options=TrainingOptions(...) or as keywords, not both")
    return options if options is not None else TrainingOptions(**values)
