"""DSM and EDM losses against score-matching theory, with exact Gaussian-mixture scores as ground truth."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from pipeline.diffusion.losses import (
    DSM_PARAMETERIZATIONS,
    LOSSES,
    WEIGHTINGS,
    DSMLoss,
    EDMLoss,
    build_loss,
    drop_labels,
)
from pipeline.diffusion.param import PARAMETERIZATIONS, edm_coeffs, make_score_fn
from pipeline.diffusion.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine-vp": CosineVPSDE}
MIXTURE = GaussianMixture.isotropic([[-1.5, 0.0], [1.0, 1.0], [1.0, -1.5]], std=0.5)


class MLP(nn.Module):
    """A small network with the project's contract net(x, noise_labels, class_labels) -> like x."""

    def __init__(self, d: int = 2, hidden: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("freq", torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=dtype))
        self.body = nn.Sequential(nn.Linear(d + 9, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d)).to(dtype)

    def forward(self, x, noise_labels, class_labels=None):
        c = noise_labels.to(x.dtype)[:, None]
        return self.body(torch.cat([x, c, torch.sin(self.freq * c), torch.cos(self.freq * c)], 1))


class Recorder:
    """Calls a network and keeps what it was given, so a test can rebuild the loss's own draws."""

    def __init__(self, net):
        self.net, self.inputs = net, []

    def __call__(self, x, noise_labels, class_labels=None):
        self.inputs.append((x.detach().clone(), noise_labels.detach().clone(), class_labels))
        return self.net(x, noise_labels, class_labels)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Vincent 2011: DSM and explicit score matching differ by a θ-independent constant ------------------

def _score_space_weight(param: str, weighting: str, sde, t, alpha, sigma) -> torch.Tensor:
    """λ(t) such that the DSM loss is λ ‖s_θ − ∇log p_0t‖² (per dimension) in score space."""
    if weighting == "sigma2":
        return sigma**2
    if weighting == "likelihood":
        return sde.sde(torch.zeros(t.shape[0], 1, dtype=t.dtype), t)[1] ** 2
    if weighting == "min_snr":  # γ = 5 (the default): σ² min(1, γ σ²/α²)
        return sigma**2 * torch.clamp(5.0 * sigma**2 / alpha**2, max=1.0)
    # "simple": the network's own target, rewritten as a score error (x0 = (x + σ²∇)/α, v = ...).
    return {"eps": sigma**2, "score": sigma**2, "x0": sigma**4 / alpha**2,
            "v": sigma**2 * (alpha**2 + sigma**2) ** 2 / alpha**2}[param]


def _dsm_minus_esm(loss, net, x0, sde, seed):
    rec = Recorder(net)
    dsm = loss(rec, x0, generator=_gen(seed))
    x_t, labels, _ = rec.inputs[-1]
    t = labels / 999.0  # noise_label_kind="time"
    alpha, sigma = sde.marginal_coeffs(t)
    with torch.no_grad():
        s_hat = make_score_fn(net, sde, loss.parameterization, noise_label_kind="time")(x_t, t)
    s_true = MIXTURE.score_t(x_t, t, sde)
    lam = _score_space_weight(loss.parameterization, loss.weighting, sde, t, alpha, sigma)
    esm = lam * ((s_hat - s_true) ** 2).mean(1)
    return (dsm - esm).detach(), esm.detach(), x_t


CASES = ([(p, w, "vp") for p in DSM_PARAMETERIZATIONS for w in WEIGHTINGS]
         + [("eps", "likelihood", s) for s in ("subvp", "ve", "cosine-vp")] + [("x0", "sigma2", "ve")])


@pytest.mark.parametrize(("param", "weighting", "sde_name"), CASES)
def test_dsm_equals_explicit_score_matching_up_to_a_constant(param, weighting, sde_name):
    # Vincent 2011: E[λ‖s_θ + ε/σ‖²] = E[λ‖s_θ − ∇log p_t‖²] + C with C free of θ. For two networks on
    # the same (t, x_t) draws, (DSM − ESM)_1 − (DSM − ESM)_2 = 2λ (s_1 − s_2)·(ε/σ + ∇log p_t) has mean 0;
    # its sample mean must be within 5 standard errors of 0.
    sde = SDES[sde_name]()
    n = 20000
    x0 = MIXTURE.sample(n, _gen(0)).double()
    loss = DSMLoss(sde, parameterization=param, weighting=weighting, eps=1e-3, noise_label_kind="time")
    d1, esm1, xt1 = _dsm_minus_esm(loss, MLP(seed=1, dtype=F64), x0, sde, seed=5)
    d2, esm2, xt2 = _dsm_minus_esm(loss, MLP(seed=2, dtype=F64), x0, sde, seed=5)
    assert torch.equal(xt1, xt2)  # identical draws
    diff = d1 - d2
    se = diff.std() / math.sqrt(n)
    assert diff.mean().abs() < 5 * se, (diff.mean().item(), se.item())
    # The check has power: the two networks' explicit losses differ by far more than that error, so a
    # θ-dependent term in DSM − ESM (a wrong target or weight) of even a fraction of it would show.
    assert (esm1 - esm2).mean().abs() > 10 * se


# ---- importance sampling ------------------------------------------------------------------------------

def _q(sde, t: np.ndarray) -> np.ndarray:
    tt = torch.as_tensor(np.atleast_1d(t), dtype=F64)
    _, g = sde.sde(torch.zeros(tt.shape[0], 1, dtype=F64), tt)
    _, sigma = sde.marginal_coeffs(tt)
    return (g**2 / sigma**2).numpy()


@pytest.mark.parametrize("sde_name", list(SDES))
def test_importance_sampled_t_has_density_g2_over_sigma2_and_unbiased_weights(sde_name):
    sde, eps, n = SDES[sde_name](), 1e-5, 50000
    loss = DSMLoss(sde, weighting="likelihood", importance_sampling=True, eps=eps)
    t, w = loss.sample_t(n, _gen(0))
    assert t.shape == w.shape == (n,) and t.dtype == F64
    assert (t >= eps).all() and (t <= sde.T).all()
    # Kolmogorov–Smirnov against the CDF of q = g²/σ² by adaptive quadrature (independent of the table);
    # 1.95/√n is the 0.1% critical value.
    probe = np.unique(np.concatenate([np.geomspace(eps, sde.T, 40), np.linspace(eps, sde.T, 40)]))
    pieces = [integrate.quad(lambda u: _q(sde, u)[0], a, b, epsabs=0, epsrel=1e-10)[0]
              for a, b in itertools.pairwise(probe)]
    mass = np.concatenate([[0.0], np.cumsum(pieces)])
    Z, cdf = mass[-1], mass / mass[-1]
    empirical = np.searchsorted(np.sort(t.numpy()), probe, side="right") / n
    assert np.abs(empirical - cdf).max() < 1.95 / math.sqrt(n)
    # w = 1/((T − eps) p(t)) with p ≈ q/Z: w q (T − eps)/Z is 1 up to the table's cell resolution.
    ratio = w.numpy() * _q(sde, t.numpy()) * (sde.T - eps) / Z
    assert np.abs(ratio - 1).max() < 5e-3
    # Unbiased for any h: E_p[w h(t)] = (T − eps)⁻¹ ∫ h dt. Checked for h = 1 and a smooth h.
    h = lambda u: 2 + np.cos(7 * u)  # noqa: E731
    target = integrate.quad(h, eps, sde.T)[0] / (sde.T - eps)
    for vals, exact in ((w.numpy(), 1.0), (w.numpy() * h(t.numpy()), target)):
        assert abs(vals.mean() - exact) < 5 * vals.std() / math.sqrt(n)


def test_uniform_t_without_importance_sampling():
    sde, eps, n = VPSDE(), 1e-3, 20000
    t, w = DSMLoss(sde, eps=eps).sample_t(n, _gen(1))
    assert torch.equal(w, torch.ones(n, dtype=F64))
    assert stats.kstest(t.numpy(), stats.uniform(eps, sde.T - eps).cdf).pvalue > 1e-3


@pytest.mark.parametrize("sde_name", ["vp", "cosine-vp"])
def test_importance_sampled_loss_matches_uniform_loss_in_expectation(sde_name):
    sde, n = SDES[sde_name](), 40000
    net = MLP(seed=3, dtype=F64)
    x0 = MIXTURE.sample(n, _gen(0)).double()
    means, ses = [], []
    for is_ in (False, True):
        loss = DSMLoss(sde, weighting="likelihood", importance_sampling=is_, eps=1e-2)
        with torch.no_grad():
            values = loss(net, x0, generator=_gen(7 + is_))
        means.append(values.mean().item())
        ses.append(values.std().item() / math.sqrt(n))
    assert ses[1] < ses[0]  # the point of importance sampling
    assert abs(means[0] - means[1]) < 5 * math.hypot(*ses), (means, ses)


@pytest.mark.parametrize("importance_sampling", [False, True])
def test_likelihood_weighted_sum_is_the_elbo_score_matching_term(importance_sampling):
    # Data N(0, c² I_d) and the exact ε-network: E‖s* − ∇log p_0t‖² = d/σ² − d/(α²c² + σ²), so
    # (T − eps)/2 · E_t[loss] must equal ½ ∫_eps^T g² d (1/σ² − 1/(α²c² + σ²)) dt (docstring of DSMLoss).
    sde, c, d, eps, n = VPSDE(), 0.7, 3, 1e-3, 40000

    def exact_eps_net(x, labels, _=None):
        t = labels / 999.0
        alpha, sigma = sde.marginal_coeffs(t)
        return sigma[:, None] * x / (alpha**2 * c**2 + sigma**2)[:, None]  # −σ ∇log p_t(x)

    loss = DSMLoss(sde, weighting="likelihood", importance_sampling=importance_sampling, eps=eps,
                   noise_label_kind="time", reduce="sum")
    x0 = c * torch.randn(n, d, generator=_gen(0), dtype=F64)
    values = loss(exact_eps_net, x0, generator=_gen(1)) * (sde.T - eps) / 2

    def integrand(u):
        tt = torch.tensor([u], dtype=F64)
        alpha, sigma = sde.marginal_coeffs(tt)
        g2 = sde.sde(torch.zeros(1, 1, dtype=F64), tt)[1] ** 2
        return (0.5 * g2 * d * (1 / sigma**2 - 1 / (alpha**2 * c**2 + sigma**2))).item()

    exact = integrate.quad(integrand, eps, sde.T, points=[1e-2, 0.1], limit=200)[0]
    assert abs(values.mean().item() - exact) < 5 * values.std().item() / math.sqrt(n), (values.mean(), exact)


def test_reduce_sum_is_dimension_times_mean():
    sde = VPSDE()
    net = MLP(d=2, seed=4, dtype=F64)
    x0 = MIXTURE.sample(64, _gen(0)).double()
    for weighting in WEIGHTINGS:
        mean = DSMLoss(sde, weighting=weighting)(net, x0, generator=_gen(2))
        total = DSMLoss(sde, weighting=weighting, reduce="sum")(net, x0, generator=_gen(2))
        torch.testing.assert_close(total, 2 * mean, rtol=1e-12, atol=0)
    edm_mean = EDMLoss()(net, x0, generator=_gen(3))
    edm_sum = EDMLoss(reduce="sum")(net, x0, generator=_gen(3))
    torch.testing.assert_close(edm_sum, 2 * edm_mean, rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["dsm", "edm"])
def test_forward_with_noise_reports_the_edm_noise_level_of_each_sample(which):
    sde = VESDE() if which == "edm" else VPSDE()
    loss = EDMLoss() if which == "edm" else DSMLoss(sde, noise_label_kind="time", weighting="sigma2")
    rec = Recorder(MLP(seed=6, dtype=F64))
    x0 = MIXTURE.sample(256, _gen(0)).double()
    value, sigma = loss.forward_with_noise(rec, x0, generator=_gen(1))
    torch.testing.assert_close(loss(rec, x0, generator=_gen(1)), value, rtol=0, atol=0)
    labels = rec.inputs[0][1]
    # σ̃ = σ/α, read back from the network's conditioning: t = label/999 (DSM) or σ = e^{4 c_noise} (EDM).
    expected = torch.exp(4 * labels) if which == "edm" else sde.edm_sigma(labels / 999.0)
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=0)


# ---- training approaches the exact score --------------------------------------------------------------

def _relative_score_error(score_fn, sde, ts, n=4000) -> float:
    """Σ_t E‖s − s*‖² / Σ_t E‖s*‖² over x_t ~ p_t of the mixture."""
    g = _gen(123)
    err = ref = 0.0
    for t0 in ts:
        x0 = MIXTURE.sample(n, g)
        t = torch.full((n,), t0)
        alpha, sigma = sde.marginal_coeffs(t)
        x_t = alpha[:, None] * x0 + sigma[:, None] * torch.randn(n, 2, generator=g)
        with torch.no_grad():
            s = score_fn(x_t, t).double()
        s_true = MIXTURE.score_t(x_t, t, sde).double()
        err += ((s - s_true) ** 2).sum(1).mean().item()
        ref += (s_true**2).sum(1).mean().item()
    return err / ref


def _moment_matched_gaussian_score(sde):
    gauss = GaussianMixture(torch.ones(1, dtype=F64), MIXTURE.mean()[None], MIXTURE.cov()[None])
    return gauss.score_fn(sde)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_training_approaches_the_exact_score(param):
    # Reference: the exact diffused score of the Gaussian with the mixture's mean and covariance, i.e.
    # what a model learns from the first two moments only (relative error ≈ 0.58, 0.38, 0.08 at the
    # three times below). A network that has learnt the three modes must be at least 4× closer.
    if param == "edm":
        sde = VESDE()  # α = 1, so σ̃ = σ and the EDM denoiser is read as a score directly
        ts = [float(sde.edm_sigma_inv(torch.tensor(s))) for s in (0.52, 0.7, 1.2)]
        loss, kind = EDMLoss(sigma_data=1.0), "edm"
    else:
        sde = VPSDE()
        ts = [0.15, 0.2, 0.3]  # σ̃ = σ/α ≈ 0.52, 0.68, 1.14
        loss, kind = DSMLoss(sde, parameterization=param, eps=1e-3), param
    net = MLP(seed=1)
    score_fn = make_score_fn(net, sde, kind, sigma_data=1.0)
    steps, g = 1500, _gen(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        value = loss(net, MIXTURE.sample(256, g), generator=g).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
    reference = _relative_score_error(_moment_matched_gaussian_score(sde), sde, ts)
    trained = _relative_score_error(score_fn, sde, ts)
    assert trained < reference / 4, (trained, reference)


# ---- EDM -----------------------------------------------------------------------------------------------

def test_edm_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 31, dtype=F64)
    for sigma_data in (0.5, 1.0, 2.3):
        _, c_out, _, _ = edm_coeffs(sigma, sigma_data)
        torch.testing.assert_close(EDMLoss(sigma_data=sigma_data).weight(sigma) * c_out**2,
                                   torch.ones_like(sigma), rtol=1e-13, atol=0)


def test_edm_loss_is_the_unit_weighted_F_regression():
    # Karras et al. 2022, eq. 8: λ ‖D − y‖² = ‖F(c_in x̃, c_noise) − (y − c_skip x̃)/c_out‖² since λ c_out² = 1.
    # Rebuild σ and x̃ from what the network received: c_noise = ¼ ln σ, input = c_in x̃.
    sigma_data, n = 0.8, 4096
    net = MLP(seed=5, dtype=F64)
    rec = Recorder(net)
    y = MIXTURE.sample(n, _gen(0)).double()
    value = EDMLoss(sigma_data=sigma_data)(rec, y, generator=_gen(1))
    x_in, c_noise, _ = rec.inputs[-1]
    sigma = torch.exp(4 * c_noise)
    c_skip, c_out, c_in, c_noise_ref = edm_coeffs(sigma, sigma_data)
    torch.testing.assert_close(c_noise, c_noise_ref, rtol=1e-12, atol=1e-12)
    x_tilde = x_in / c_in[:, None]
    with torch.no_grad():
        F = net(x_in, c_noise)
    target = (y - c_skip[:, None] * x_tilde) / c_out[:, None]
    torch.testing.assert_close(value.detach(), ((F - target) ** 2).mean(1), rtol=1e-9, atol=1e-12)
    # The draws are EDM's: ln σ ~ N(P_mean, P_std²) and x̃ − y = σ n with n ~ N(0, I).
    assert stats.kstest(torch.log(sigma).numpy(), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    noise = ((x_tilde - y) / sigma[:, None]).flatten()
    assert stats.kstest(noise.numpy(), stats.norm().cdf).pvalue > 1e-3


# ---- classifier-free guidance label dropout -----------------------------------------------------------

def test_drop_labels_frequency_is_binomial():
    n, p, null = 100000, 0.3, 10
    labels = torch.randint(0, 10, (n,), generator=_gen(0))
    out = drop_labels(labels, p, null, generator=_gen(1))
    dropped = out == null
    # Binomial(n, p): 5 standard deviations.
    assert abs(dropped.sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(drop_labels(labels, 0.0, null), labels)
    assert (drop_labels(labels, 1.0, null) == null).all()


@pytest.mark.parametrize("which", ["dsm", "edm"])
def test_losses_drop_labels_before_the_network(which):
    n, p, null = 20000, 0.2, 3
    labels = torch.randint(0, 3, (n,), generator=_gen(0))
    x0 = MIXTURE.sample(n, _gen(1))
    net = Recorder(MLP(seed=0))
    kwargs = {"label_dropout": p, "null_label": null}
    loss = build_loss("dsm", VPSDE(), **kwargs) if which == "dsm" else build_loss("edm", **kwargs)
    with torch.no_grad():
        loss(net, x0, labels, generator=_gen(2))
    seen = net.inputs[-1][2]
    dropped = seen == null
    assert abs(dropped.sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(seen[~dropped], labels[~dropped])
    plain = build_loss(which, VPSDE())
    with torch.no_grad():
        plain(net, x0, labels, generator=_gen(2))
    assert torch.equal(net.inputs[-1][2], labels)


def test_build_loss_names():
    assert LOSSES[:2] == ("dsm", "edm")  # ism, ssm, ssm-vr follow: tests/test_score_matching.py
    dsm = build_loss("dsm", VESDE(), parameterization="v", weighting="sigma2")
    assert isinstance(dsm, DSMLoss) and (dsm.parameterization, dsm.weighting) == ("v", "sigma2")
    assert isinstance(build_loss("edm", sigma_data=0.7), EDMLoss)


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DSMLoss(VPSDE(), parameterization="edm"), r"parameterization.*'edm'"),
        (lambda: DSMLoss(VPSDE(), weighting="snr"), r"weighting.*'snr'"),
        (lambda: DSMLoss(VPSDE(), reduce="max"), r"reduce.*'max'"),
        (lambda: DSMLoss(VPSDE(), noise_label_kind="sigma"), r"noise_label_kind.*'sigma'"),
        (lambda: DSMLoss(VPSDE(), importance_sampling=True), r"importance_sampling.*likelihood.*'simple'"),
        (lambda: DSMLoss(VPSDE(), weighting="sigma2", importance_sampling=True),
         r"importance_sampling.*sigma2"),
        (lambda: DSMLoss(VPSDE(), eps=0.0), r"eps.*\(0, T=1.0\).*0.0"),
        (lambda: DSMLoss(VPSDE(), eps=1.0), r"eps.*1.0"),
        (lambda: DSMLoss(CosineVPSDE(), eps=0.9995), r"eps.*T=0.999.*0.9995"),
        (lambda: DSMLoss(VPSDE(), label_dropout=1.0, null_label=0), r"label_dropout.*\[0, 1\).*1.0"),
        (lambda: DSMLoss(VPSDE(), label_dropout=-0.1, null_label=0), r"label_dropout.*-0.1"),
        (lambda: DSMLoss(VPSDE(), label_dropout=0.1), r"label_dropout.*null_label"),
        (lambda: EDMLoss(label_dropout=0.1), r"label_dropout.*null_label"),
        (lambda: EDMLoss(label_dropout=1.5, null_label=0), r"label_dropout.*1.5"),
        (lambda: EDMLoss(reduce="none"), r"reduce.*'none'"),
        (lambda: EDMLoss(P_std=0.0), r"P_std.*0.0"),
        (lambda: EDMLoss(sigma_data=-1.0), r"sigma_data.*-1.0"),
        (lambda: build_loss("sm", VPSDE()), r"loss name.*'sm'"),
        (lambda: build_loss("dsm"), r"sde"),
        (lambda: drop_labels(torch.zeros(3, dtype=torch.long), 1.5, 0), r"\bp\b.*1.5"),
    ],
)
def test_bad_loss_configuration_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("loss", [DSMLoss(VPSDE()), EDMLoss()], ids=["dsm", "edm"])
def test_bad_class_labels_raise_before_calling_the_network(loss):
    net = Recorder(MLP(seed=0))
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"class_labels.*\[4\].*\(3,\)"):
        loss(net, x0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class_labels.*\(4, 1\)"):
        loss(net, x0, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x0.*\(4,\)"):
        loss(net, torch.zeros(4))
    assert net.inputs == []
