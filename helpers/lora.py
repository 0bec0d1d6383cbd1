"""Low-rank adaptation (Part 09): train two small matrices beside each frozen linear layer.

A frozen ``nn.Linear`` computes ``x W^T + b``. LoRA adds ``(alpha / rank) * x A B`` with ``A``
``(in_features, rank)`` and ``B`` ``(rank, out_features)``: only ``A`` and ``B`` train, a fraction of
the parameters. ``B`` starts at zero, so a wrapped model computes exactly what it computed before.
After training, ``merge_lora`` folds ``A B`` into the weight and the adapters disappear.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from helpers.model import is_decoder
from helpers.runtime import check_count, unwrap_model

__all__ = ["LoRALinear", "apply_lora", "merge_lora"]


class LoRALinear(nn.Module):
    """``linear(x) + (alpha / rank) * x @ A @ B``: a frozen linear layer plus a trainable low-rank update."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        _check_arguments(linear, rank, alpha)
        self.linear = linear
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        weight = linear.weight  # (out_features, in_features)
        self.A = nn.Parameter(torch.empty(linear.in_features, rank, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(rank, linear.out_features, device=weight.device, dtype=weight.dtype))
        # peft's draw for A: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(self.A, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in_features) -> (..., rank) -> (..., out_features)
        update = (x @ self.A) @ self.B
        return self.linear(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / rank) * (A B)^T`` in ``nn.Linear``'s weight layout ``(out_features, in_features)``."""
        return self.scaling * (self.A @ self.B).T

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _check_arguments(linear: nn.Module, rank: object, alpha: object) -> None:
    """Refuse a layer LoRA cannot wrap, a rank that is not a positive integer no larger than the layer, or a
    scale ``alpha`` that is not a positive finite number, naming the argument."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
    check_count("rank", rank)
    # Above min(in, out) the update A B gains no rank, only parameters; the series still gives a 2-way class
    # head the model's rank (as the book does), so only a rank beyond both of the layer's sizes is refused.
    if rank > max(linear.in_features, linear.out_features):
        raise ValueError(f"rank={rank} is larger than the layer it adapts (in_features={linear.in_features}, "
                         f"out_features={linear.out_features}), whose update A B can use a rank of at most "
                         f"{min(linear.in_features, linear.out_features)}; pass a smaller rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number (the update is scaled by alpha / rank), got {alpha!r}")


def _linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every ``nn.Linear`` in ``model`` as ``(parent, attribute name, layer)``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` (the output head included) in a ``LoRALinear``; return it.

    Afterwards only the adapters' ``A`` and ``B`` train. The model is changed in place, and only
    once ``rank`` and ``alpha`` fit every layer (a refused call leaves it as it was).
    """
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("the model already has LoRA adapters; call merge_lora(model) before applying new ones")
    layers = _linear_layers(model)
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no nn.Linear layers to adapt")
    for _, _, linear in layers:  # every check before any change
        _check_arguments(linear, rank, alpha)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parent, name, linear in layers:
        setattr(parent, name, LoRALinear(linear, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRALinear``'s update into its weight and put the plain ``nn.Linear`` back; return the model.

    The merged model computes the same outputs (up to float rounding) without the adapters' extra
    matrix products. Each merged weight is a new tensor, so a weight the layer shared (a head tied
    to the embedding) is not changed for its other user; a decoder whose head was tied gets a
    config with ``tie_weights=False``, so that saving it keeps the merged head.
    """
    wrapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LoRALinear)]
    if not wrapped:
        raise ValueError("the model has no LoRA adapters to merge; apply_lora(model, rank, alpha) adds them")
    for parent, name, lora in wrapped:
        linear = lora.linear
        old = linear.weight
        linear.weight = nn.Parameter(old + lora.delta_weight(), requires_grad=old.requires_grad)
        setattr(parent, name, linear)
    _untie_config(model)
    return model


def _untie_config(model: nn.Module) -> None:
    """Make a decoder's config say ``tie_weights=False`` once its head no longer is the embedding.

    Savers and loaders read the config, not the tensors: a config still saying "tied" would make them
    write (or restore) the embedding as the head and drop the merged update.
    """
    core = unwrap_model(model)
    if is_decoder(core) and core.cfg.tie_weights and core.out_head.weight is not core.tok_emb.weight:
        core.cfg = dataclasses.replace(core.cfg, tie_weights=False)
