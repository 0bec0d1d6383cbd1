"""Cross-entropy for the output layer without materialising all the logits (Part 07).

For a small GPT most of a training step is the output head: ``(batch * n_tokens) x vocab_size``
logits, a softmax over 50,257 entries and its gradient. ``chunked_cross_entropy`` takes the
final hidden states and the head's weight instead, and works through a few rows at a time:
logits, log-sum-exp, loss and, while training, both gradients, so the full logits tensor (and
its gradient) never exists. The result equals ``F.cross_entropy(hidden @ weight.T, targets)``.
"""

from __future__ import annotations

import torch

__all__ = ["chunked_cross_entropy"]

# Rows per chunk are chosen so that one chunk's logits hold about this many floats (~32 MB):
# small enough to stay cheap to allocate and reuse, large enough to keep matmuls efficient.
_CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _chunks(n_rows: int, vocab_size: int, chunk_rows: int | None):
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // vocab_size)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T``; gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows):
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(dtype)
            valid = targets != ignore_index
            n_valid = valid.sum().clamp(min=1)
            loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for start, end in _chunks(hidden.shape[0], weight.shape[0], chunk_rows):
                hidden_c = hidden[start:end].to(dtype)
                rows_valid = valid[start:end]
                safe_targets = targets[start:end].clamp(min=0)[:, None]
                logits = (hidden_c @ weight_c.T).float()  # (rows, vocab)
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                target_logits = logits.gather(1, safe_targets)
                loss_sum += ((log_norm - target_logits).squeeze(1) * rows_valid).sum()
                # d(loss)/d(logits) = softmax - one_hot(target), zero on ignored rows (scaled below)
                grad_logits = logits.sub_(log_norm).exp_()
                grad_logits.scatter_add_(1, safe_targets, -torch.ones_like(target_logits))
                grad_logits.mul_(rows_valid[:, None])
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = grad_logits @ weight_c
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ hidden_c).float()
        scale = 1.0 / n_valid
        ctx.save_for_backward(
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(weight.dtype) if grad_weight is not None else None,
        )
        return loss_sum / n_valid if bool(valid.any()) else loss_sum * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None,
            None, None, None,
        )


@torch.no_grad()
def _loss_only(hidden, weight, targets, ignore_index, chunk_rows):
    dtype = _compute_dtype(hidden)
    weight_c = weight.to(dtype)
    valid = targets != ignore_index
    loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start, end in _chunks(hidden.shape[0], weight.shape[0], chunk_rows):
        logits = (hidden[start:end].to(dtype) @ weight_c.T).float()
        safe_targets = targets[start:end].clamp(min=0)[:, None]
        losses = torch.logsumexp(logits, dim=-1) - logits.gather(1, safe_targets).squeeze(1)
        loss_sum += (losses * valid[start:end]).sum()
    n_valid = valid.sum()
    return loss_sum / n_valid if bool(n_valid) else loss_sum * float("nan")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, computed in chunks.

    ``hidden`` is ``(..., emb_dim)``, ``weight`` the output head's ``(vocab_size, emb_dim)`` and
    ``targets`` token ids of shape ``(...)``; targets equal to ``ignore_index`` do not count.
    Equal to ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`` (a float32
    scalar), differentiable with respect to ``hidden`` and ``weight``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} must agree "
                         "on every dimension but the last")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the weight {tuple(weight.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    outside = ((targets < 0) & (targets != ignore_index)) | (targets >= weight.shape[0])
    if bool(outside.any()):
        bad = targets[outside][0].item()
        raise IndexError(f"target {bad} is out of bounds for a vocabulary of {weight.shape[0]} "
                         f"(ignore_index is {ignore_index})")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
    return _loss_only(hidden, weight, targets, ignore_index, chunk_rows)
