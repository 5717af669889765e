"""Search spaces over noise schedules and loss weightings, checked before any trial starts.

A space is a JSON-able dict from a dimension name to one of
    a scalar                        fixed value
    [v1, v2, ...]                   grid search (every value, in order)
    {"choice": [v1, v2, ...]}       one value drawn per sample
    {"uniform": [lo, hi]}           drawn uniformly
    {"loguniform": [lo, hi]}        drawn log-uniformly
over the dimensions
    sde         vp | subvp | ve | ddpm-linear | ddpm-cosine
    beta_min, beta_max      β(t) range of vp and subvp (Song et al. 2021, eq. 11–12)
    sigma_min, sigma_max    σ(t) range of ve (eq. 9)
    cosine_s                s of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)
    weighting   simple | sigma2 | likelihood | min_snr | likelihood-is | edm
A dimension that does not apply to a trial's SDE is ignored by it (β for ve, σ for vp).

"ddpm-linear" is DDPM's discrete chain β_i ∈ [1e-4, 0.02] over N = 1000 steps (Ho et al. 2020), whose
continuous limit is VPSDE(0.1, 20) (`DDPMSchedule.linear().vp_sde()`); "ddpm-cosine" is the cosine
chain's continuous process `CosineVPSDE(s)`. Weightings map onto `losses.py`: DSM with λ = 1 on the
network's own target ("simple"), λ = σ² ("sigma2"), λ = g² ("likelihood", with importance-sampled t for
"likelihood-is"), Min-SNR-γ ("min_snr"), or EDM's loss and preconditioning ("edm").
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig
from ..diffusion.chain import CHAIN_SCHEDULES
from ..diffusion.losses import WEIGHTINGS
from ..diffusion.score_matching import SCORE_MATCHING_LOSSES
from ..diffusion.sde import SDES

# The search's process names: the processes of `sde.SDES` whose parameters are dimensions here (β range:
# vp, subvp; σ range: ve), and DDPM's named chain schedules searched through their continuous processes.
SEARCH_SDES: tuple[str, ...] = (*(n for n in SDES if n in ("vp", "subvp", "ve")),
                                *(f"ddpm-{s}" for s in CHAIN_SCHEDULES if s in ("linear", "cosine")))
# DSM's weightings, DSM's likelihood weighting with importance-sampled t, and EDM's loss.
# The objective a trial trains with: DSM under one of its weightings (importance-sampled likelihood
# weighting as "likelihood-is"), EDM's loss, EDM's loss with EDM2's learned uncertainty weighting
# ("edm-learned"), or implicit / sliced score matching (losses of their own, `score_matching.py`).
SEARCH_WEIGHTINGS: tuple[str, ...] = (*WEIGHTINGS, "likelihood-is", "edm", "edm-learned",
                                      *SCORE_MATCHING_LOSSES)
NUMERIC: dict[str, tuple[float, float]] = {  # default, and the strict lower bound
    "beta_min": (0.1, 0.0),
    "beta_max": (20.0, 0.0),
    "sigma_min": (0.01, 0.0),
    "sigma_max": (50.0, 0.0),
    "cosine_s": (0.008, 0.0),
}
CATEGORICAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "sde": ("vp", SEARCH_SDES),
    "weighting": ("simple", SEARCH_WEIGHTINGS),
}
DIMENSIONS: tuple[str, ...] = (*CATEGORICAL, *NUMERIC)
KINDS: tuple[str, ...] = ("fixed", "grid", "choice", "uniform", "loguniform")
# Validation builds every combination of the discrete values and range ends; beyond this, a sample.
_MAX_CHECKED = 4096


@dataclass(frozen=True)
class Dim:
    """One dimension of a space: how it is searched and over which values (or [lo, hi])."""

    kind: str
    values: tuple[Any, ...]

    def to_json(self) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "grid":
            return list(self.values)
        return {self.kind: list(self.values)}

    def corners(self) -> tuple[Any, ...]:
        """The values a check must try: all discrete values, or both ends of a range."""
        return self.values


def parse_space(spec: dict[str, Any] | str) -> dict[str, Dim]:
    """A validated space from a dict or JSON text; ValueError naming the dimension otherwise."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"space: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"space must be a JSON object of dimensions, got {type(spec).__name__}")
    if not spec:
        raise ValueError(f"space is empty: give at least one of the dimensions {list(DIMENSIONS)}")
    unknown = sorted(set(spec) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"space: unknown dimension(s) {unknown}; allowed: {list(DIMENSIONS)}")
    space = {name: _parse_dim(name, value) for name, value in spec.items()}
    _check_combinations(space)
    return space


def space_to_json(space: dict[str, Dim]) -> dict[str, Any]:
    return {name: dim.to_json() for name, dim in space.items()}


def _parse_dim(name: str, value: Any) -> Dim:
    if isinstance(value, list):
        if not value:
            raise ValueError(f"space[{name!r}]: an empty grid has no values to search")
        dim = Dim("grid", tuple(value))
    elif isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in KINDS[2:]:
            raise ValueError(
                f"space[{name!r}]: a dict must be one of {{'choice': [...]}}, "
                f"{{'uniform': [lo, hi]}}, {{'loguniform': [lo, hi]}}; got {value!r}"
            )
        kind, vals = next(iter(value.items()))
        if not isinstance(vals, list) or not vals:
            raise ValueError(f"space[{name!r}]: {kind} needs a non-empty list, got {vals!r}")
        if kind != "choice" and len(vals) != 2:
            raise ValueError(f"space[{name!r}]: {kind} needs [lo, hi], got {vals!r}")
        dim = Dim(kind, tuple(vals))
    else:
        dim = Dim("fixed", (value,))
    if name in CATEGORICAL:
        if dim.kind in ("uniform", "loguniform"):
            raise ValueError(f"space[{name!r}] is categorical: use a value, a list or {{'choice': [...]}}")
        allowed = CATEGORICAL[name][1]
        bad = [v for v in dim.values if v not in allowed]
        if bad:
            raise ValueError(f"space[{name!r}]: {bad} not allowed; allowed: {list(allowed)}")
        return dim
    low = NUMERIC[name][1]
    for v in dim.values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= low:
            raise ValueError(f"space[{name!r}]: values must be finite numbers > {low:g}, got {v!r}")
    if dim.kind in ("uniform", "loguniform") and not dim.values[0] < dim.values[1]:
        raise ValueError(f"space[{name!r}]: {dim.kind} needs lo < hi, got {list(dim.values)}")
    return Dim(dim.kind, tuple(float(v) for v in dim.values))


def _check_combinations(space: dict[str, Dim]) -> None:
    """Every combination a trial can draw must build its SDE and loss (e.g. β_min < β_max): checked on
    the discrete values and both ends of every range, in all combinations (the ends suffice: each
    constraint is monotone in each dimension)."""
    for point in itertools.islice(corner_points(space), _MAX_CHECKED):
        try:
            check_point(point)
        except ValueError as e:
            raise ValueError(f"space: the combination {point} is invalid: {e}") from None


def corner_points(space: dict[str, Dim]) -> Iterator[dict[str, Any]]:
    """Every combination of the discrete values and range ends (the points a check builds)."""
    names = list(space)
    for combo in itertools.product(*(space[n].corners() for n in names)):
        yield dict(zip(names, combo, strict=True))


def num_grid_points(space: dict[str, Dim]) -> int:
    """Trials per sample: the product of the grid sizes (Tune repeats the grid `num_samples` times)."""
    return math.prod(len(d.values) for d in space.values() if d.kind == "grid")


def resolve(point: dict[str, Any]) -> dict[str, Any]:
    """A point with every dimension filled in from the defaults."""
    full = {name: default for name, (default, _) in CATEGORICAL.items()}
    full.update({name: default for name, (default, _) in NUMERIC.items()})
    full.update({k: v for k, v in point.items() if k in DIMENSIONS})
    return full


def sde_of(point: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """`build_sde` name and keyword arguments of a point."""
    p = resolve(point)
    if p["sde"] in ("vp", "subvp"):
        return p["sde"], {"beta_min": float(p["beta_min"]), "beta_max": float(p["beta_max"])}
    if p["sde"] == "ve":
        return "ve", {"sigma_min": float(p["sigma_min"]), "sigma_max": float(p["sigma_max"])}
    if p["sde"] == "ddpm-linear":
        from ..diffusion.schedules import DDPMSchedule

        sde = DDPMSchedule.linear().vp_sde()
        return "vp", {"beta_min": sde.beta_0, "beta_max": sde.beta_1, "N": sde.N}
    if p["sde"] == "ddpm-cosine":
        return "cosine-vp", {"s": float(p["cosine_s"])}
    raise ValueError(f"sde must be one of {list(SEARCH_SDES)}, got {p['sde']!r}")


def loss_of(point: dict[str, Any], base: TrainConfig) -> tuple[str, dict[str, Any]]:
    """Loss name and keyword arguments of a point; the base config's other loss options are kept."""
    w = resolve(point)["weighting"]
    kw = {
        k: v
        for k, v in base.loss_kwargs.items()
        if k not in ("weighting", "importance_sampling", "sigma_data", "P_mean", "P_std")
    }
    if w in ("edm", "edm-learned"):
        edm = {k: v for k, v in base.loss_kwargs.items() if k in ("sigma_data", "P_mean", "P_std")}
        return "edm", {**edm, **({"learned_uncertainty": True} if w == "edm-learned" else {})}
    if w in SCORE_MATCHING_LOSSES:  # trained at NCSN-style noise levels; the parameterisation is kept
        return w, {k: v for k, v in kw.items() if k in ("parameterization", "noise_label_kind")}
    if w not in SEARCH_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(SEARCH_WEIGHTINGS)}, got {w!r}")
    if base.loss == "edm":
        kw = {}  # EDM options mean nothing to DSM
    kw["weighting"] = "likelihood" if w == "likelihood-is" else w
    if w == "likelihood-is":
        kw["importance_sampling"] = True
    return "dsm", kw


def trial_config(point: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """The TrainConfig of one trial: `base` with the point's SDE and loss weighting."""
    sde, sde_kwargs = sde_of(point)
    loss, loss_kwargs = loss_of(point, base)
    return base.replace(sde=sde, sde_kwargs=sde_kwargs, loss=loss, loss_kwargs=loss_kwargs)


def check_point(point: dict[str, Any], base: TrainConfig | None = None) -> None:
    """Build the point's SDE and loss (their constructors raise ValueError on bad values)."""
    from ..diffusion.losses import build_loss
    from ..diffusion.sde import build_sde

    cfg = trial_config(point, base or TrainConfig())
    sde = build_sde(cfg.sde, **cfg.sde_kwargs)
    build_loss(cfg.loss, sde, **cfg.loss_kwargs)


def check_space_with(space: dict[str, Dim], base: TrainConfig) -> None:
    """Every corner of the space combined with the base config (its parameterisation, ...) builds."""
    for point in itertools.islice(corner_points(space), _MAX_CHECKED):
        try:
            check_point(point, base)
        except ValueError as e:
            raise ValueError(f"space: the combination {point} with the base config is invalid: {e}") from None


def draw_point(space: dict[str, Dim], grid: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One point as Tune would draw it: `grid` gives the grid dimensions, the others are drawn from
    their distributions (a restore adds the trials an interrupted search never started)."""
    point: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.kind == "grid":
            point[name] = grid[name]
        elif dim.kind == "fixed":
            point[name] = dim.values[0]
        elif dim.kind == "choice":
            point[name] = rng.choice(dim.values)
        elif dim.kind == "uniform":
            point[name] = rng.uniform(*dim.values)
        else:  # loguniform
            point[name] = math.exp(rng.uniform(math.log(dim.values[0]), math.log(dim.values[1])))
    return point


def to_param_space(space: dict[str, Dim]) -> dict[str, Any]:
    """The Ray Tune param_space of a space."""
    from .. import raykit

    return {name: dim.values[0] if dim.kind == "fixed" else raykit.search_dim(dim.kind, dim.values)
            for name, dim in space.items()}


__all__ = [
    "DIMENSIONS",
    "SEARCH_SDES",
    "SEARCH_WEIGHTINGS",
    "Dim",
    "check_point",
    "check_space_with",
    "corner_points",
    "draw_point",
    "loss_of",
    "num_grid_points",
    "parse_space",
    "resolve",
    "sde_of",
    "space_to_json",
    "to_param_space",
    "trial_config",
]
