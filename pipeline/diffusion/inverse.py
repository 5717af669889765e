"""Linear inverse problems with an unconditional score model: inpainting, colourisation, super-resolution.

Measurements. Each operator is y = A x with A = c^{1/2} S Q: an orthogonal transform Q (identity for
inpainting; Song et al. 2021, App. I's orthogonal colour matrix for colourisation; per f×f block a
Helmert matrix, whose first row is the block mean times f, for super-resolution), then S selects the
known coordinates u_K of u = Q x, scaled so that y is in natural units (the masked image, the grey image
= channel mean, the average-pooled image). Hence A Aᵀ = c I (c = 1, 1/3, 1/f²) and u_K = y / √c.

Method 1, projection/replacement (Song et al. 2021, App. I, with the predictor–corrector sampler of
Alg. 2/3): after every corrector and predictor step at time t the known coordinates of u = Q x_t are
replaced by a fresh draw of the forward process, u_K ← α(t) y/√c + σ(t) z, and the unknown ones are left
to the unconditional score. The final sample takes u_K = y/√c exactly.
  Known bias: this samples x_U from the reverse process driven by ∇log p_t(x_U, x_K) with x_K a *fresh*
  noisy copy of y at each step, not by ∇log p_t(x_U | y). It is exact when u_U and u_K are independent
  under the data (e.g. isotropic Gaussian data) and biased otherwise: in the continuous limit without
  corrector the noise of the replaced x_K averages out and x_U follows the reverse SDE with x_K = α(t) y,
  whose end point is not p(x_U | y) (tests/test_inverse.py computes that limit for a correlated Gaussian
  and checks the sampler lands on it, not on the posterior).

Method 2, ΠGDM (Song, Vahdat, Mardani & Kautz 2023, eq. 7) for noisy measurements y = A x + σ_y n:
    ∇_{x_t} log p_t(y | x_t) ≈ (∂x̂₀/∂x_t)ᵀ Aᵀ (r_t² A Aᵀ + σ_y² I)⁻¹ (y − A x̂₀),
    x̂₀ = (x_t + σ_t² s_θ(x_t, t))/α_t (Tweedie),   r_t² = v σ̃_t²/(v + σ̃_t²),  σ̃ = σ/α,
i.e. p(x₀ | x_t) ≈ N(x̂₀, r_t² I), with v the data variance (the paper's v = 1). The vector-Jacobian product
goes through the network. For Gaussian data N(μ, v I) with the exact score this is the exact
∇log p_t(y | x_t), so any sampler of `samplers.sample` run on s_θ + that gradient samples the exact
posterior up to discretisation.

Method 3, the twisted diffusion sampler (TDS; Wu, Trippe, Naesseth, Blei & Cunningham 2023, Alg. 1): P
particles per measurement, proposed by the ΠGDM-guided Euler–Maruyama step q(x_{i+1} | x_i, y) and
weighted by w_i = p_θ(x_{i+1} | x_i) p̃_{i+1}(y | x_{i+1}) / (q(x_{i+1} | x_i, y) p̃_i(y | x_i)), with ΠGDM's
p̃_t(y | x_t) as the twisting function, resampled whenever the effective sample size falls below P/2.
At t = eps, p̃ is the likelihood of y given x_eps itself (r² → σ̃² ≪ the data's scale), so the weighted
particles target the model's own posterior as P → ∞ whatever ΠGDM's approximation gets wrong at high noise,
where it is poor for multimodal data: there it sees only the mean x̂₀ of a p(x₀ | x_t) that mixes classes.
v only shapes the twisting, not the target: a large v keeps early weights flat, so one lucky class mean
does not take every particle at the first step. With a class-conditional model the prior can be the mixture
Σ_c π_c p_θ(x | c) of its conditional branches (`ClassMixture`): each particle carries a class, resampled
with it, so the classes that survive are those the measurement supports, p(c | y) in the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .samplers import (
    Callback,
    ScoreCounter,
    _langevin_alpha,
    _noise,
    _vec,
    _with_chain_length,
    allowed_options,
    check_options,
    sample,
)
from .schedules import time_grid
from .sde import SDE, ScoreFn, expand_like

# Song et al. 2021, App. I: an orthogonal 3×3 matrix whose first column spans grey (1, 1, 1)/√3.
_COLOR_Q = torch.tensor([[0.5773502691896258, -0.8164965809277261, 0.0],
                         [0.5773502691896258, 0.4082482904638631, 0.7071067811865476],
                         [0.5773502691896258, 0.4082482904638631, -0.7071067811865476]], dtype=torch.float64)


def _check_image_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4 or any(n < 1 for n in shape):
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(shape)}")


def helmert(n: int) -> Tensor:
    """n×n orthogonal Helmert matrix, float64: row 0 = 1/√n, row k: (1, …, 1, −k, 0, …)/√(k(k+1))."""
    H = torch.zeros(n, n, dtype=torch.float64)
    H[0] = 1 / math.sqrt(n)
    for k in range(1, n):
        H[k, :k] = 1 / math.sqrt(k * (k + 1))
        H[k, k] = -k / math.sqrt(k * (k + 1))
    return H


class Measurement:
    """y = A x = √c · u_K(Q x). Subclasses define Q (to_u/from_u), the known set and `measure`."""

    c: float = 1.0

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if images of `shape` [B, C, H, W] cannot be measured."""
        _check_image_shape(shape)

    def to_u(self, x: Tensor) -> Tensor:
        return x

    def from_u(self, u: Tensor) -> Tensor:
        return u

    def known(self, u: Tensor) -> Tensor:
        """Boolean mask of the known coordinates, broadcastable to u."""
        raise NotImplementedError

    def measure(self, x: Tensor) -> Tensor:
        """y = A x in natural units."""
        raise NotImplementedError

    def lift(self, y: Tensor, shape: tuple[int, ...]) -> Tensor:
        """u with u_K = y/√c and zeros elsewhere (the measured part of Q x), for images of `shape`."""
        raise NotImplementedError


class Inpainting(Measurement):
    """y = m ⊙ x for a 0/1 mask m (1 = known pixel), of shape [C, H, W] or [B, C, H, W]."""

    def __init__(self, mask: Tensor) -> None:
        mask = torch.as_tensor(mask)
        if mask.ndim not in (3, 4):
            raise ValueError(f"mask must have shape [C, H, W] or [B, C, H, W], got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (unknown) and 1 (known) values")
        self.mask = mask.bool()
        per_image = self.mask.reshape(-1, *self.mask.shape[-3:]).flatten(1)
        if bool(per_image.all(1).any()):
            raise ValueError("mask is all known (every pixel 1) for at least one image: nothing to inpaint")
        if bool((~per_image).all(1).any()):
            raise ValueError("mask is all unknown (every pixel 0) for at least one image: that is "
                             "unconditional sampling, use samplers.sample")

    def check(self, shape):
        super().check(shape)
        ok = tuple(self.mask.shape) == tuple(shape[1:]) or tuple(self.mask.shape) == tuple(shape)
        if not ok:
            raise ValueError(f"mask shape {tuple(self.mask.shape)} does not match the image shape "
                             f"{tuple(shape[1:])} (or the batch shape {tuple(shape)})")

    def known(self, u):
        return self.mask.to(u.device)

    def measure(self, x):
        return x * self.known(x).to(x.dtype)

    def lift(self, y, shape):
        return y * self.mask.to(y.device, y.dtype)


class Colorization(Measurement):
    """y = grey image = the mean of the 3 channels, [B, 1, H, W]; u = Qᵀ over channels, u_0 = √3 · grey."""

    c = 1.0 / 3.0

    def check(self, shape):
        super().check(shape)
        if shape[1] != 3:
            raise ValueError(f"colorization needs 3 colour channels, got {shape[1]} "
                             f"(image shape {tuple(shape)})")

    def to_u(self, x):
        return torch.einsum("kc,bkhw->bchw", _COLOR_Q.to(x.device, x.dtype), x)

    def from_u(self, u):
        return torch.einsum("kc,bchw->bkhw", _COLOR_Q.to(u.device, u.dtype), u)

    def known(self, u):
        k = torch.zeros(1, 3, 1, 1, dtype=torch.bool, device=u.device)
        k[:, 0] = True
        return k

    def measure(self, x):
        return x.mean(1, keepdim=True)

    def lift(self, y, shape):
        u = torch.zeros(shape, dtype=y.dtype, device=y.device)
        u[:, :1] = y * math.sqrt(3.0)
        return u


class SuperResolution(Measurement):
    """y = f×f average pooling, [B, C, H/f, W/f]. u: per block the Helmert transform (u_0 = f · mean)."""

    def __init__(self, factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor (super-resolution) must be an integer >= 2, got {factor!r}")
        self.factor, self.c = factor, 1.0 / factor**2
        self._H = helmert(factor * factor)

    def check(self, shape):
        super().check(shape)
        f = self.factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"super-resolution factor {f} must divide the image size, got H×W = "
                             f"{shape[2]}×{shape[3]}")

    def _blocks(self, x: Tensor) -> Tensor:  # [B, C, H, W] → [B, C, H/f, W/f, f²]
        B, C, H, W = x.shape
        f = self.factor
        blocks = x.reshape(B, C, H // f, f, W // f, f).permute(0, 1, 2, 4, 3, 5)
        return blocks.reshape(B, C, H // f, W // f, f * f)

    def to_u(self, x):
        return self._blocks(x) @ self._H.to(x.device, x.dtype).T

    def from_u(self, u):
        B, C, h, w, _ = u.shape
        f = self.factor
        blocks = u @ self._H.to(u.device, u.dtype)
        return blocks.reshape(B, C, h, w, f, f).permute(0, 1, 2, 4, 3, 5).reshape(B, C, h * f, w * f)

    def known(self, u):
        k = torch.zeros(self.factor**2, dtype=torch.bool, device=u.device)
        k[0] = True
        return k

    def measure(self, x):
        return torch.nn.functional.avg_pool2d(x, self.factor)

    def lift(self, y, shape):
        B, C, H, W = shape
        f = self.factor
        u = torch.zeros(B, C, H // f, W // f, f * f, dtype=y.dtype, device=y.device)
        u[..., 0] = y * f
        return u


def _check_measurement(op: Measurement, y: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if not isinstance(op, Measurement):
        raise ValueError(f"operator must be an Inpainting, Colorization or SuperResolution, "
                         f"got {type(op).__name__}")
    op.check(shape)
    expected = tuple(op.measure(torch.zeros(shape, dtype=y.dtype)).shape)
    if tuple(y.shape) not in (expected, (1, *expected[1:])):
        raise ValueError(f"y has shape {tuple(y.shape)}; {type(op).__name__} of images {shape} measures "
                         f"shape {expected} (or {(1, *expected[1:])}, one measurement for the whole batch)")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or inf values")
    return shape


def _check_run(seed: int, **counts: int) -> None:
    """seed an int and every count (steps, particles) an int >= 1: the inverse samplers' common checks."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _replace(op: Measurement, x: Tensor, u_y: Tensor, alpha: float, sigma: float,
             generator: torch.Generator | None) -> Tensor:
    """u_K ← α u_y + σ z (a draw of the forward process from the measurement), u_U kept."""
    u = op.to_u(x)
    fresh = alpha * u_y + sigma * _noise(u, generator) if sigma > 0 else alpha * u_y
    return op.from_u(torch.where(op.known(u), fresh, u))


def sample_replacement(score_fn: ScoreFn, sde: SDE, op: Measurement, y: Tensor, shape: tuple[int, ...], *,
                       steps: int, seed: int, eps: float = 1e-3, snr: float = 0.16, n_corrector: int = 1,
                       dtype: torch.dtype = torch.float32,
                       callback: Callback | None = None) -> tuple[Tensor, int]:
    """Noiseless inverse problem by projection/replacement inside the PC sampler (Song et al. 2021,
    App. I; predictor, corrector and grid as `samplers.sample_pc`). Returns (x, NFE); x agrees with y
    exactly on the measured coordinates. Biased unless the unknown and known parts of Q x are independent
    (module docstring). Runs on y's device. `callback` gets the samplers' event {i, t, x, denoised=None}
    after each step."""
    shape = _check_measurement(op, y, shape)
    _check_run(seed, steps=steps)
    check_options("pc", sde, steps, {**allowed_options("pc"), "dtype": dtype, "eps": eps, "snr": snr,
                                     "n_corrector": n_corrector})
    device = y.device  # the samples are drawn where the measurement lives
    generator = torch.Generator(device=device).manual_seed(seed)
    x = sde.prior_sampling(shape, generator=generator, device=device).to(dtype)
    u_y = op.lift(y.to(device, dtype), shape)
    counter = ScoreCounter(score_fn)
    chain = _with_chain_length(sde, steps)
    rsde = chain.reverse(counter)
    ts = time_grid(sde, steps - 1, eps=eps).tolist() if steps > 1 else [sde.T]

    def coeffs(t: float) -> tuple[float, float]:
        alpha, sigma = sde.marginal_coeffs(torch.tensor([t], dtype=torch.float64))
        return float(alpha[0]), float(sigma[0])

    with torch.no_grad():
        x = _replace(op, x, u_y, *coeffs(ts[0]), generator)
        for i, t_i in enumerate(ts):
            t = _vec(t_i, x)
            for _ in range(n_corrector):  # Langevin corrector (Song et al. 2021, Alg. 4/5), then project
                grad = counter(x, t)
                z = _noise(x, generator)
                grad_norm = grad.reshape(x.shape[0], -1).norm(dim=-1).mean()
                noise_norm = z.reshape(x.shape[0], -1).norm(dim=-1).mean()
                step = 2 * expand_like(_langevin_alpha(chain, t), x) * (snr * noise_norm / grad_norm) ** 2
                x = _replace(op, x + step * grad + torch.sqrt(2 * step) * z, u_y, *coeffs(t_i), generator)
            f, G = rsde.discretize(x, t)  # reverse-diffusion predictor (eq. 46): x now at the next time
            x_mean = x - f
            if i + 1 < len(ts):
                x = _replace(op, x_mean + expand_like(G, x) * _noise(x, generator), u_y, *coeffs(ts[i + 1]),
                             generator)
            if callback is not None:
                callback({"i": i, "t": t_i, "x": x, "denoised": None})
        # Final: the denoised mean on the unknown part, the measurement itself on the known part.
        x = _replace(op, x_mean, u_y, 1.0, 0.0, generator)
    return x, counter.nfe


def _check_pigdm(sigma_y: float, data_var: float) -> None:
    if not (sigma_y >= 0):
        raise ValueError(f"sigma_y (measurement noise std) must be >= 0, got {sigma_y!r}")
    if not (data_var > 0):
        raise ValueError(f"data_var must be > 0, got {data_var!r}")


def _pigdm_terms(score_fn: ScoreFn, sde: SDE, op: Measurement, y: Tensor, x: Tensor, t: Tensor,
                 sigma_y: float, data_var: float) -> tuple[Tensor, Tensor, Tensor]:
    """s_θ(x_t, t), ∇_{x_t} ℓ_t and ℓ_t = log p̃_t(y | x_t) + const [B], with ΠGDM's
    p̃_t(y | x_t) = N(y; A x̂₀, (r_t² c + σ_y²) I) (module docstring); the constant is the same for every
    sample at one t."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        s = score_fn(x_in, t)
        alpha, sigma = sde.marginal_coeffs(t)
        a, sg = expand_like(alpha.to(x.dtype), x), expand_like(sigma.to(x.dtype), x)
        x0_hat = (x_in + sg**2 * s) / a
        st2 = (sigma / alpha).to(x.dtype) ** 2
        r2 = data_var * st2 / (data_var + st2)  # Var[x0 | x_t] of N(μ, v I) data, per sample [B]
        resid = (y.to(x.dtype) - op.measure(x0_hat)).flatten(1)
        loglik = -0.5 * (resid**2).sum(1) / (r2 * op.c + sigma_y**2)
        guide = torch.autograd.grad(loglik.sum(), x_in)[0]
    return s.detach(), guide, loglik.detach()


def pigdm_score(score_fn: ScoreFn, sde: SDE, op: Measurement, y: Tensor, *, sigma_y: float,
                data_var: float = 1.0) -> ScoreFn:
    """s_θ(x_t, t) + ΠGDM's ∇_{x_t} log p_t(y | x_t) (Song, Vahdat, Mardani & Kautz 2023, eq. 7; module
    docstring). One call = one score evaluation plus one vector-Jacobian product through it."""
    _check_pigdm(sigma_y, data_var)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        s, guide, _ = _pigdm_terms(score_fn, sde, op, y, x, t, sigma_y, data_var)
        return s + guide

    return fn


def sample_posterior(method: str, score_fn: ScoreFn, sde: SDE, op: Measurement, y: Tensor,
                     shape: tuple[int, ...], *, sigma_y: float, steps: int, seed: int, data_var: float = 1.0,
                     device: torch.device | str | None = None, **options: Any) -> tuple[Tensor, int]:
    """Posterior samples of x given y = A x + σ_y n by ΠGDM guidance inside any `samplers.sample` method
    (ancestral, ddim, euler_maruyama, pc, ode, heun; same options). Returns (x, NFE)."""
    shape = _check_measurement(op, y, shape)
    guided = pigdm_score(score_fn, sde, op, y.to(device) if device is not None else y, sigma_y=sigma_y,
                         data_var=data_var)
    return sample(method, guided, sde, shape, steps=steps, seed=seed, device=device, **options)


@dataclass(frozen=True)
class ClassMixture:
    """The prior p(x) = Σ_c π_c p_θ(x | c) of a class-conditional model, for `sample_smc`: `score_for(labels)`
    is the score function of particles with these class labels [N], `weights` the class probabilities π [C].
    (A conditional model's null label is trained on a fraction of the batches only; the mixture of its
    conditional branches can be the better p(x): benchmarks/RESULTS.md measures both on digits.)"""

    score_for: Callable[[Tensor], ScoreFn]
    weights: Tensor


def _systematic(W: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """n indices per row [G, n] by systematic resampling of the normalised weights W [G, K]: index k
    appears ⌊n W_k⌋ or ⌈n W_k⌉ times (Kitagawa 1996), less variance than n multinomial draws."""
    G, K = W.shape
    u = (torch.rand(G, 1, generator=generator, device=W.device, dtype=W.dtype)
         + torch.arange(n, device=W.device, dtype=W.dtype)) / n
    cdf = W.cumsum(1)
    cdf[:, -1] = 1.0  # rounding must not leave u beyond the last bin
    return torch.searchsorted(cdf.contiguous(), u).clamp(max=K - 1)


def sample_smc(prior: ScoreFn | ClassMixture, sde: SDE, op: Measurement, y: Tensor, shape: tuple[int, ...], *,
               sigma_y: float, steps: int, seed: int, particles: int = 10, data_var: float = 1.0,
               eps: float = 1e-3, callback: Callback | None = None) -> tuple[Tensor, int]:
    """One posterior sample of x | y = A x + σ_y n per row of y by the twisted diffusion sampler (module
    docstring, Method 3) with `particles` particles per row; the prior is `prior`'s unconditional score or a
    `ClassMixture`, whose particles carry classes that are resampled with them. Returns (x, NFE per particle:
    steps + 1 evaluations, each with a vector-Jacobian product). Runs on y's device."""
    shape = _check_measurement(op, y, shape)
    _check_pigdm(sigma_y, data_var)
    _check_run(seed, steps=steps, particles=particles)
    check_options("euler_maruyama", sde, steps, {**allowed_options("euler_maruyama"), "eps": eps})
    B, P, device = shape[0], particles, y.device
    generator = torch.Generator(device=device).manual_seed(seed)
    x = sde.prior_sampling((B * P, *shape[1:]), generator=generator, device=device)
    y_p = y.to(device, x.dtype).expand(shape[0], *y.shape[1:]).repeat_interleave(P, 0)
    labels = None
    if isinstance(prior, ClassMixture):  # classes in proportion to π, by one systematic draw per row
        pi = prior.weights.to(device, torch.float64)
        labels = _systematic((pi / pi.sum()).expand(B, -1), P, generator)
    ts = time_grid(sde, steps, eps=eps).tolist()
    logw = log_pq = ell_prev = torch.zeros(B * P, dtype=torch.float64, device=device)
    rows = torch.arange(B, device=device)[:, None] * P
    for i, t_i in enumerate(ts):
        t = _vec(t_i, x)
        score_fn = prior if labels is None else prior.score_for(labels.flatten())
        s, guide, ell = _pigdm_terms(score_fn, sde, op, y_p, x, t, sigma_y, data_var)
        # w_i = p(x_i | x_{i-1}) p̃_i(y | x_i) / (q(x_i | x_{i-1}, y) p̃_{i-1}(y | x_{i-1})); w_0 = p̃_0(y | x_T)
        logw = logw + ell.double() + log_pq - ell_prev
        W = torch.softmax(logw.view(B, P), 1)
        ess = 1.0 / (W**2).sum(1)
        if i + 1 == len(ts):
            break
        resample = ess < P / 2  # resample the rows whose effective sample size fell below half
        if bool(resample.any()):  # one host sync per step, beside a network call with its VJP
            keep = torch.arange(P, device=device).expand(B, P)
            idx = (torch.where(resample[:, None], _systematic(W, P, generator), keep) + rows).flatten()
            x, s, guide, ell = x[idx], s[idx], guide[idx], ell[idx]
            labels = None if labels is None else labels.flatten()[idx].view(B, P)
            logw = torch.where(resample.repeat_interleave(P), torch.zeros_like(logw), logw[idx])
        # Proposal: Euler–Maruyama on the reverse SDE with the twisted score s + ∇ℓ (ΠGDM's guided step).
        dt = ts[i + 1] - t_i
        drift, diffusion = sde.sde(x, t)
        g2 = expand_like(diffusion, x) ** 2
        mean_p = x + (drift - g2 * s) * dt
        mean_q = mean_p - g2 * guide * dt
        x_new = mean_q + torch.sqrt(-g2 * dt) * _noise(x, generator)
        log_pq = ((x_new - mean_q) ** 2 - (x_new - mean_p) ** 2) / (2 * -g2 * dt)  # log p_θ − log q
        log_pq = log_pq.flatten(1).sum(1).double()
        x, ell_prev = x_new, ell.double()
        if callback is not None:
            callback({"i": i, "t": t_i, "x": x, "denoised": None})
    # One particle per row drawn by its final weight, denoised (Tweedie at eps, as the other samplers end).
    pick = torch.multinomial(W.float(), 1, generator=generator).flatten() + rows.flatten()
    x, s = x[pick], s[pick]
    alpha, sigma = sde.marginal_coeffs(t[pick])
    return (x + expand_like(sigma.to(x.dtype), x) ** 2 * s) / expand_like(alpha.to(x.dtype), x), len(ts)


def linear_matrix(op: Measurement, shape: tuple[int, ...]) -> Tensor:
    """A as a dense [m, D] float64 matrix for one image of `shape` [1, C, H, W] (for tests and checks)."""
    op.check(shape)
    D = math.prod(shape[1:])
    basis = torch.eye(D, dtype=torch.float64).reshape(D, *shape[1:])
    return op.measure(basis).reshape(D, -1).T


__all__ = ["ClassMixture", "Colorization", "Inpainting", "Measurement", "SuperResolution", "helmert",
           "linear_matrix", "pigdm_score", "sample_posterior", "sample_replacement", "sample_smc"]
