"""Guidance: steer a score model towards a class label.

Both guides return an ordinary `score_fn(x, t)`, so every sampler in `samplers.py` uses them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .param import Net, Parameterization, make_score_fn
from .sde import SDE, ScoreFn

Classifier = Callable[[Tensor, Tensor], Tensor]  # classifier(x_t, t) -> logits [B, num_classes]


def _check_weight(name: str, value: float) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_labels(labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"class labels must be a 1-D integer tensor [B], got {labels!r}")


def classifier_free(score_cond: ScoreFn, score_uncond: ScoreFn, w: float) -> ScoreFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 for scores): (1 + w) s(x, t, c) − w s(x, t, ∅)."""
    w = _check_weight("w", w)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        return (1 + w) * score_cond(x, t) - w * score_uncond(x, t)

    return score_fn


def cfg_score_fn(net: Net, sde: SDE, parameterization: Parameterization, class_labels: Tensor,
                 null_label: int, w: float, **make_score_fn_kwargs: Any) -> ScoreFn:
    """Classifier-free guidance of one network with a null label, both halves in one 2B forward pass.

    The network must have been trained with label dropout to `null_label` (the ∅ token). At w = 0 only
    the conditional half is evaluated.
    """
    w = _check_weight("w", w)
    _check_labels(class_labels)
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise ValueError(f"null_label must be the int label that means 'no class', got {null_label!r}")
    # Bad kwargs fail here rather than at the first score evaluation, deep inside a sampler.
    make_score_fn(net, sde, parameterization, **make_score_fn_kwargs)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        labels = class_labels.to(x.device)
        if labels.shape[0] == 1:
            labels = labels.expand(B)
        if labels.shape[0] != B:
            raise ValueError(f"class_labels has {labels.shape[0]} entries for a batch of {B}")
        kwargs = make_score_fn_kwargs
        if w == 0:
            return make_score_fn(net, sde, parameterization, class_labels=labels, **kwargs)(x, t)
        both = torch.cat([labels, torch.full_like(labels, null_label)])
        inner = make_score_fn(net, sde, parameterization, class_labels=both, **kwargs)
        cond, uncond = inner(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return (1 + w) * cond - w * uncond

    return score_fn


def classifier_guided(score_fn: ScoreFn, classifier: Classifier, labels: Tensor, scale: float) -> ScoreFn:
    """Classifier guidance: ∇log p_t(x) + scale · ∇_x log p_φ(c | x_t, t) (Dhariwal & Nichol 2021;
    Song et al. 2021, eq. 14), the gradient by autograd through `classifier(x, t) -> logits`."""
    scale = _check_weight("scale", scale)
    _check_labels(labels)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {x.shape[0]}")
        with torch.enable_grad():  # samplers run under no_grad; the classifier gradient still needs a graph
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs.gather(1, labels.to(x.device).reshape(-1, 1)).sum()
            grad = torch.autograd.grad(selected, x_in)[0]
        return score_fn(x, t) + scale * grad.to(x.dtype)

    return guided


__all__ = ["Classifier", "cfg_score_fn", "classifier_free", "classifier_guided"]
