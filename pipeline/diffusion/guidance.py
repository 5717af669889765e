"""Guidance: steer a score model towards a class label, or away from a weaker version of itself.

Every guide returns an ordinary `score_fn(x, t)`, so every sampler in `samplers.py` uses them unchanged.
Since score = (α D − x)/σ² is affine in the denoiser D, a combination Σ_k c_k D_k with Σ_k c_k = 1 (CFG,
autoguidance) is the same combination of scores; the guides below combine scores.

- classifier-free guidance (Ho & Salimans 2022), optionally limited to a noise interval
  σ̃ ∈ (σ_lo, σ_hi] with σ̃ = σ/α (Kynkäänniemi et al. 2024), the conditional score outside it;
- autoguidance (Karras et al. 2024b): D_w = D_guide + w (D_main − D_guide) with a second, weaker network
  (an earlier or smaller checkpoint); works for unconditional models;
- classifier guidance (Dhariwal & Nichol 2021).
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


def check_interval(sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """Validate a guidance interval 0 ≤ σ_lo < σ_hi ≤ ∞ on EDM's noise level σ̃ = σ/α."""
    for name, v in (("sigma_lo", sigma_lo), ("sigma_hi", sigma_hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ValueError(f"{name} must be a number >= 0 (σ̃ = σ/α; sigma_hi may be inf), got {v!r}")
    if math.isinf(sigma_lo) or not sigma_lo < sigma_hi:
        raise ValueError(f"the guidance interval needs sigma_lo < sigma_hi, got sigma_lo={sigma_lo!r}, "
                         f"sigma_hi={sigma_hi!r}")
    return float(sigma_lo), float(sigma_hi)


def _in_interval(sde: SDE, t: Tensor, sigma_lo: float, sigma_hi: float) -> Tensor | bool:
    """Per-sample mask σ_lo < σ̃(t) ≤ σ_hi [B]; True when the interval is the whole half-line."""
    if sigma_lo == 0 and math.isinf(sigma_hi):
        return True
    sigma = sde.edm_sigma(t)
    return (sigma > sigma_lo) & (sigma <= sigma_hi)


def _masked(mask: Tensor | bool, inside: Callable[[], Tensor], outside: Callable[[], Tensor],
            x: Tensor) -> Tensor:
    """inside() where mask, outside() elsewhere, evaluating only what some sample needs."""
    if mask is True or bool(mask.all()):
        return inside()
    if not bool(mask.any()):
        return outside()
    return torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), inside(), outside())


def guidance_interval(guided: ScoreFn, unguided: ScoreFn, sde: SDE, sigma_lo: float = 0.0,
                      sigma_hi: float = math.inf) -> ScoreFn:
    """`guided` where σ_lo < σ̃(t) ≤ σ_hi, `unguided` elsewhere (Kynkäänniemi et al. 2024, eq. 3), per
    sample. σ_lo = 0, σ_hi = ∞ returns `guided` itself."""
    sigma_lo, sigma_hi = check_interval(sigma_lo, sigma_hi)
    if sigma_lo == 0 and math.isinf(sigma_hi):
        return guided

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        return _masked(_in_interval(sde, t, sigma_lo, sigma_hi), lambda: guided(x, t),
                       lambda: unguided(x, t), x)

    return score_fn


def cfg_score_fn(net: Net, sde: SDE, parameterization: Parameterization, class_labels: Tensor,
                 null_label: int, w: float, *, sigma_lo: float = 0.0, sigma_hi: float = math.inf,
                 **make_score_fn_kwargs: Any) -> ScoreFn:
    """Classifier-free guidance of one network with a null label, both halves in one 2B forward pass.

    The network must have been trained with label dropout to `null_label` (the ∅ token). At w = 0, and
    for times whose σ̃ = σ/α lies outside the guidance interval (σ_lo, σ_hi] (Kynkäänniemi et al. 2024),
    only the conditional half is evaluated. The default interval (0, ∞] is plain CFG.
    """
    w = _check_weight("w", w)
    sigma_lo, sigma_hi = check_interval(sigma_lo, sigma_hi)
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

        def conditional() -> Tensor:
            return make_score_fn(net, sde, parameterization, class_labels=labels, **kwargs)(x, t)

        def guided() -> Tensor:
            both = torch.cat([labels, torch.full_like(labels, null_label)])
            inner = make_score_fn(net, sde, parameterization, class_labels=both, **kwargs)
            cond, uncond = inner(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
            return (1 + w) * cond - w * uncond

        if w == 0:
            return conditional()
        return _masked(_in_interval(sde, t, sigma_lo, sigma_hi), guided, conditional, x)

    return score_fn


# ---- autoguidance ---------------------------------------------------------------------------------------

# What must agree between a network and its autoguide: the data they see and the labels they take.
_NET_FIELDS: tuple[str, ...] = ("in_channels", "out_channels", "image_size", "num_classes")


def check_autoguide(net: Net, guide_net: Net, *, image_shape: tuple[int, ...] | None = None,
                    guide_image_shape: tuple[int, ...] | None = None) -> None:
    """Raise unless the guide sees the same images and conditioning as the main network: the U-Net's
    in/out channels, image size and number of classes (None: unconditional), and the given image shapes."""
    for field in _NET_FIELDS:
        a, b = getattr(net, field, None), getattr(guide_net, field, None)
        if a != b:
            what = "conditioning (num_classes)" if field == "num_classes" else f"image shape ({field})"
            raise ValueError(f"the autoguidance network must match the main network's {what}: "
                             f"main has {field}={a!r}, guide has {field}={b!r}")
    if image_shape is not None and guide_image_shape is not None and \
            tuple(image_shape) != tuple(guide_image_shape):
        raise ValueError(f"the autoguidance network must match the main network's image shape: main "
                         f"{tuple(image_shape)}, guide {tuple(guide_image_shape)}")


def autoguided(score_main: ScoreFn, score_guide: ScoreFn, w: float) -> ScoreFn:
    """Autoguidance (Karras et al. 2024b, eq. 1) in score form: w s_main + (1 − w) s_guide, which is
    D_guide + w (D_main − D_guide) read as a score. w = 1 is the main model and w = 0 the guide, exactly
    (the other network is then not evaluated)."""
    w = _check_weight("w", w)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        if w == 1:
            return score_main(x, t)
        if w == 0:
            return score_guide(x, t)
        return w * score_main(x, t) + (1 - w) * score_guide(x, t)

    return score_fn


def autoguidance_score_fn(net: Net, guide_net: Net, sde: SDE, parameterization: Parameterization, w: float,
                          *, class_labels: Tensor | None = None, sigma_lo: float = 0.0,
                          sigma_hi: float = math.inf, guide_parameterization: Parameterization | None = None,
                          **make_score_fn_kwargs: Any) -> ScoreFn:
    """Autoguidance of `net` by `guide_net` (same labels; None for unconditional models), applied where
    σ̃ = σ/α lies in (σ_lo, σ_hi] and the main model alone elsewhere. The two networks are checked for
    the same image shape and conditioning here, before any sampling; `guide_parameterization` defaults
    to the main one."""
    w = _check_weight("w", w)
    sigma_lo, sigma_hi = check_interval(sigma_lo, sigma_hi)
    if class_labels is not None:
        _check_labels(class_labels)
    check_autoguide(net, guide_net)
    main = make_score_fn(net, sde, parameterization, class_labels=class_labels, **make_score_fn_kwargs)
    guide = make_score_fn(guide_net, sde, guide_parameterization or parameterization,
                          class_labels=class_labels, **make_score_fn_kwargs)
    return guidance_interval(autoguided(main, guide, w), main, sde, sigma_lo, sigma_hi)


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


__all__ = ["Classifier", "autoguidance_score_fn", "autoguided", "cfg_score_fn", "check_autoguide",
           "check_interval", "classifier_free", "classifier_guided", "guidance_interval"]
