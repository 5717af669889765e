"""Gaussian mixtures with closed-form diffused scores and densities: the ground truth for tests.

If x_0 ~ Σ_k π_k N(μ_k, Σ_k) and x_t = α(t) x_0 + σ(t) ε, then
    p_t(x) = Σ_k π_k N(x; α μ_k, α² Σ_k + σ² I),
so ∇ log p_t, log p_t and the class-conditional versions are exact for every SDE in `sde.py`.
Data here is flat: x has shape [B, d].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import SDE, ScoreFn


class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k) in d dimensions; component k doubles as class label k."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = means.shape
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means, got {tuple(weights.shape)}")
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
        if (weights <= 0).any() or not math.isclose(weights.sum().item(), 1.0, rel_tol=1e-9):
            raise ValueError("weights must be positive and sum to 1")
        self.weights, self.means, self.covs = weights, means, covs
        self.K, self.d = K, d

    @classmethod
    def isotropic(cls, means, std: float | list[float], weights=None) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=torch.float64)
        K, d = means.shape
        std_t = torch.as_tensor(std, dtype=torch.float64).expand(K)
        covs = torch.eye(d, dtype=torch.float64) * std_t.reshape(K, 1, 1) ** 2
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights
        return cls(w, means, covs)

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs)[k]
        z = torch.randn(n, self.d, 1, generator=generator, dtype=torch.float64)
        x = (self.means[k] + (L @ z).squeeze(-1)).float()
        return (x, k) if return_labels else x

    # ---- diffused quantities ------------------------------------------------------------------

    def _component_logp(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """log N(x; α μ_k, α² Σ_k + σ² I) [B, K] and its gradient in x [B, K, d], in float64."""
        x = x.double().reshape(x.shape[0], -1)
        alpha, sigma = alpha.double(), sigma.double()
        if alpha.numel() > 1 and bool((alpha == alpha[0]).all() & (sigma == sigma[0]).all()):
            # Samplers call with one t for the whole batch: factorise K covariances, not B×K.
            alpha, sigma = alpha[:1], sigma[:1]
        a = alpha.reshape(-1, 1, 1, 1)
        s = sigma.reshape(-1, 1, 1, 1)
        eye = torch.eye(self.d, dtype=torch.float64)
        cov = a**2 * self.covs.unsqueeze(0) + s**2 * eye  # [B, K, d, d]
        L = torch.linalg.cholesky(cov)
        diff = (x.unsqueeze(1) - a.squeeze(-1) * self.means.unsqueeze(0)).unsqueeze(-1)  # [B, K, d, 1]
        sol = torch.cholesky_solve(diff, L).squeeze(-1)  # Σ_t⁻¹ (x - α μ)
        maha = (diff.squeeze(-1) * sol).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logp = -0.5 * (maha + logdet + self.d * math.log(2 * math.pi))
        return logp, -sol

    def log_prob_t(self, x: Tensor, t: Tensor, sde: SDE, label: Tensor | None = None) -> Tensor:
        """log p_t(x) (or log p_t(x | c) for a given component label), [B], float64."""
        alpha, sigma = sde.marginal_coeffs(t)
        comp, _ = self._component_logp(x, alpha, sigma)
        if label is not None:
            return comp.gather(1, label.reshape(-1, 1)).squeeze(1)
        return torch.logsumexp(comp + self.weights.log(), dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x) of the undiffused mixture, [B], float64."""
        B = x.shape[0]
        comp, _ = self._component_logp(x, torch.ones(B), torch.zeros(B))
        return torch.logsumexp(comp + self.weights.log(), dim=1)

    def score_t(self, x: Tensor, t: Tensor, sde: SDE, label: Tensor | None = None) -> Tensor:
        """∇_x log p_t(x) (or of p_t(x | c)), shape of x, dtype of x."""
        alpha, sigma = sde.marginal_coeffs(t)
        comp, grads = self._component_logp(x, alpha, sigma)
        if label is not None:
            g = grads.gather(1, label.reshape(-1, 1, 1).expand(-1, 1, self.d)).squeeze(1)
        else:
            resp = torch.softmax(comp + self.weights.log(), dim=1)  # posterior over components
            g = (resp.unsqueeze(-1) * grads).sum(1)
        return g.to(x.dtype).reshape(x.shape)

    def score_fn(self, sde: SDE, label: Tensor | int | None = None) -> ScoreFn:
        """The exact score as a `score_fn(x, t)`; with `label`, the class-conditional score."""

        def fn(x: Tensor, t: Tensor) -> Tensor:
            lab = label
            if isinstance(lab, int):
                lab = torch.full((x.shape[0],), lab, dtype=torch.long)
            return self.score_t(x, t, sde, lab)

        return fn

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> Tensor:
        m = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :]))
        return second.sum(0) - m[:, None] * m[None, :]
