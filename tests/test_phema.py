"""Post-hoc EMA (EDM2) against closed-form power-function averages of a toy parameter trajectory."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from pipeline.models.phema import (
    PowerEMA,
    Snapshot,
    gamma_to_sigma_rel,
    power_beta,
    reconstruct,
    sigma_rel_to_gamma,
    snapshots_from_dicts,
    solve_coefficients,
)

F64 = torch.float64
STEPS, EVERY = 2000, 100


class Toy(nn.Module):
    """A 'network' whose parameters follow a prescribed trajectory θ(i), plus an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4, dtype=F64))
        self.b = nn.Parameter(torch.zeros(5, dtype=F64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def set(self, i: int) -> None:
        # A smooth drift towards an optimum plus a slow oscillation, as in training.
        u = i / STEPS
        with torch.no_grad():
            ar = torch.arange(12, dtype=F64).reshape(3, 4)
            self.w.copy_(math.exp(-3 * u) * ar + 0.3 * torch.sin(7 * u + ar))
            self.b.copy_(torch.cos(5 * u + torch.arange(5, dtype=F64)) * (1 - u) ** 2)
            self.count.fill_(i)


def _exact_power_ema(sigma_rel: float, t: int) -> dict[str, torch.Tensor]:
    """Σ_i w_i θ(i), w_i = (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1): the kernel of EDM2 eq. 2 on a trajectory
    that is constant between steps."""
    g = sigma_rel_to_gamma(sigma_rel)
    i = torch.arange(1, t + 1, dtype=F64)
    w = (i / t) ** (g + 1) - ((i - 1) / t) ** (g + 1)
    net, out = Toy(), {"w": 0, "b": 0}
    for k in range(1, t + 1):
        net.set(k)
        out["w"] = out["w"] + w[k - 1] * net.w.detach()
        out["b"] = out["b"] + w[k - 1] * net.b.detach()
    return out


@pytest.fixture(scope="module")
def run():
    net = Toy()
    ema = PowerEMA(net, sigma_rels=(0.05, 0.10, 0.07))  # 0.07: tracked directly, for comparison only
    snaps = []
    for i in range(1, STEPS + 1):
        net.set(i)
        ema.update(net, i)
        if i % EVERY == 0:
            snaps += [s for s in ema.snapshot() if s["sigma_rel"] != 0.07]
    return ema, snaps


def test_sigma_rel_gamma_round_trip_and_paper_values():
    for s in (0.01, 0.05, 0.10, 0.2, 0.28):
        assert math.isclose(gamma_to_sigma_rel(sigma_rel_to_gamma(s)), s, rel_tol=1e-10)
    # EDM2 Sec. 3.1: its two stored profiles σ_rel = 0.05 and 0.10 are γ = 16.97 and 6.94.
    assert math.isclose(sigma_rel_to_gamma(0.05), 16.97, abs_tol=0.01)
    assert math.isclose(sigma_rel_to_gamma(0.10), 6.94, abs_tol=0.01)
    assert math.isclose(gamma_to_sigma_rel(0.0), math.sqrt(1 / 12), rel_tol=1e-12)


def test_tracker_is_the_exact_power_function_average(run):
    ema, _ = run
    for k, s in enumerate(ema.sigma_rels):
        exact = _exact_power_ema(s, STEPS)
        torch.testing.assert_close(ema.profiles[k]["w"], exact["w"], rtol=0, atol=1e-10)
        torch.testing.assert_close(ema.profiles[k]["b"], exact["b"], rtol=0, atol=1e-10)
        assert int(ema.profiles[k]["count"]) == STEPS  # integer buffers are copied, not averaged


def test_reconstruction_at_a_third_sigma_rel_matches_direct_tracking(run):
    ema, snaps = run
    got = reconstruct(snapshots_from_dicts(snaps), 0.07)
    direct = ema.profiles[2]
    for k in ("w", "b"):
        scale = direct[k].abs().max()
        err = (got[k] - direct[k]).abs().max() / scale
        assert err < 1e-3, (k, float(err))
    assert int(got["count"]) == STEPS
    # The reconstruction is not trivially close: the two stored profiles differ from it by much more.
    assert (ema.profiles[0]["w"] - direct["w"]).abs().max() / direct["w"].abs().max() > 50 * 1e-3


def test_reconstruction_at_a_stored_profile_returns_it(run):
    ema, snaps = run
    for k, s in enumerate((0.05, 0.10)):
        got = reconstruct(snapshots_from_dicts(snaps), s)
        torch.testing.assert_close(got["w"], ema.profiles[k]["w"], rtol=0, atol=1e-8)
        x = solve_coefficients([d["step"] for d in snaps], [d["sigma_rel"] for d in snaps], s)
        # The least-squares weights put (almost) everything on the last snapshot of that profile.
        assert abs(float(x[len(snaps) - 2 + k]) - 1) < 1e-6


def test_reconstruction_at_an_earlier_step(run):
    _, snaps = run
    got = reconstruct(snapshots_from_dicts(snaps), 0.07, target_step=1500)
    exact = _exact_power_ema(0.07, 1500)
    assert (got["w"] - exact["w"]).abs().max() / exact["w"].abs().max() < 5e-3


def test_memory_stays_at_two_networks_whatever_the_number_of_snapshots():
    shape = (17, 23)  # a shape no other live tensor has
    live = lambda: sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.shape == shape)  # noqa: E731
    peaks = {}
    for n in (4, 30):
        seen: list[int] = []

        def load(i: int, seen: list[int] = seen) -> dict[str, torch.Tensor]:
            seen.append(live())  # before this snapshot exists: only the accumulator (and nothing else)
            return {"p": torch.full(shape, float(i)), "q": torch.ones(3)}

        snaps = [Snapshot(step=100 * (i // 2 + 1), sigma_rel=(0.05, 0.10)[i % 2], load=lambda i=i: load(i))
                 for i in range(n)]
        out = reconstruct(snaps, 0.07)
        assert out["p"].shape == shape
        peaks[n] = max(seen) + 1  # + the snapshot being loaded
        del out
    assert peaks == {4: 2, 30: 2}


def test_power_beta_first_step_forgets_the_initialisation():
    assert power_beta(16.97, 1) == 0.0
    assert math.isclose(power_beta(2.0, 10, 9), 0.9**3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, 0.5, float("nan"), "0.1"])
def test_bad_sigma_rel_names_the_field(bad):
    with pytest.raises(ValueError, match=r"sigma_rels\[1\] must be a number in \(0.0, 0.3\)"):
        PowerEMA(Toy(), sigma_rels=(0.05, bad))
    with pytest.raises(ValueError, match="target_sigma_rel must be"):
        solve_coefficients([1, 2], [0.05, 0.1], bad)


def test_too_few_snapshots_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        solve_coefficients([100], [0.05], 0.07)
    with pytest.raises(ValueError, match="2 distinct"):
        solve_coefficients([100, 100], [0.05, 0.05], 0.07)
    with pytest.raises(ValueError, match="target_step must be"):
        solve_coefficients([100, 200], [0.05, 0.05], 0.07, target_step=300)


def test_state_dict_round_trip_and_step_order(tmp_path):
    net = Toy()
    ema = PowerEMA(net)
    for i in range(1, 6):
        net.set(i)
        ema.update(net, i)
    path = tmp_path / "phema.pt"
    torch.save(ema.state_dict(), path)
    other = PowerEMA(Toy())
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.step == 5
    torch.testing.assert_close(other.profiles[1]["w"], ema.profiles[1]["w"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="step must be an int >"):
        ema.update(net, 5)
