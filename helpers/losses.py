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

# Rows per chunk are chosen so that one chunk's logits hold about this many floats (~128 MB in float32):
# small enough to stay cheap to allocate and reuse, large enough to keep matmuls efficient.
_CHUNK_ELEMENTS = 1 << 25


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
            n_valid = valid.sum()
            scale = 1.0 / n_valid.clamp(min=1).float()  # the mean's 1/N, applied to each chunk's gradient
            loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden, dtype=dtype) if ctx.needs_input_grad[0] else None
            # the weight's gradient sums over every chunk: accumulate it in float32 even under autocast
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            rows = next(_chunks(hidden.shape[0], weight.shape[0], chunk_rows))[1]
            logits_buffer = hidden.new_empty((rows, weight.shape[0]), dtype=dtype)  # reused by every chunk
            for start, end in _chunks(hidden.shape[0], weight.shape[0], chunk_rows):
                hidden_c = hidden[start:end].to(dtype)
                rows_valid = valid[start:end]
                safe_targets = targets[start:end].clamp(min=0)[:, None]
                logits = torch.mm(hidden_c, weight_c.T, out=logits_buffer[: end - start]).float()  # (rows, vocab)
                target_logits = logits.gather(1, safe_targets)
                row_max = logits.amax(dim=-1, keepdim=True)
                # one pass of exp serves both the loss and the gradient: exp(logits - max), in place
                exps = logits.sub_(row_max).exp_()
                sums = exps.sum(dim=-1, keepdim=True)
                loss_sum += ((sums.log() + row_max - target_logits).squeeze(1) * rows_valid).sum()
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / N, zero on ignored rows
                row_weight = rows_valid[:, None] * scale
                grad_logits = exps.mul_(row_weight / sums)
                grad_logits.scatter_add_(1, safe_targets, -row_weight.expand_as(target_logits))
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    torch.mm(grad_logits, weight_c, out=grad_hidden[start:end])
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, hidden_c)  # in place: no (vocab, emb_dim) temporary
                elif grad_weight is not None:
                    grad_weight += (grad_logits.T @ hidden_c).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        loss = loss_sum * scale
        return loss if bool(valid.any()) else loss * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # the gradients were computed for d(loss) = 1; scale them in place by the incoming gradient
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


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
