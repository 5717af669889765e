"""Schedule search: the held-out metric against closed forms, the space and the concurrency rules, and
real ASHA searches of Ray Train trials on a local 2-CPU Ray cluster with storage on a real S3 server
(moto): one that stops a trial early and returns the best, one that is interrupted and restored."""

from __future__ import annotations

import io
import math
import os
import signal

import pytest
import torch
from ray.tune import Callback

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.diffusion.losses import DSMLoss, EDMLoss, build_loss
from pipeline.diffusion.schedules import DDPMSchedule
from pipeline.diffusion.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE, build_sde
from pipeline.diffusion.toy import GaussianMixture
from pipeline.evaluation.scoring import edm_levels, edm_weight, heldout_denoising_loss
from pipeline.raykit import concurrent_trials
from pipeline.tuning import spaces
from pipeline.tuning.report import pareto_front
from pipeline.tuning.search import ScheduleSearch, max_concurrent_trials
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

# ---- the held-out metric ---------------------------------------------------------------------------


def _gaussian_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu, s = torch.tensor([[0.3, -0.7, 1.1]], dtype=torch.float64), 0.6
    gm = GaussianMixture.isotropic(mu, s)
    x0 = gm.sample(32, g).double()
    sigmas = edm_levels(8)
    noise = torch.randn((8, *x0.shape), generator=g, dtype=torch.float64)
    return gm, mu[0], s, x0, sigmas, noise


@pytest.mark.parametrize(
    "sde", [VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0), VESDE(0.01, 50.0), CosineVPSDE()], ids=lambda s: s.name
)
def test_heldout_loss_of_the_exact_score_is_the_bayes_denoiser_error(sde):
    """For data N(μ, s²I) the exact score of any SDE read through Tweedie gives the posterior mean
    E[x0 | x0 + σ̃ε] = μ + s²/(s² + σ̃²)(x0 + σ̃ε − μ), whatever the process: the metric must equal
    λ(σ̃)·‖that − x0‖²/d averaged over the levels, on the same noise draws."""
    gm, mu, s, x0, sigmas, noise = _gaussian_case()
    got = heldout_denoising_loss(gm.score_fn(sde), sde, x0, noise, sigmas)
    want = torch.zeros(x0.shape[0], dtype=torch.float64)
    for j, sig in enumerate(sigmas.tolist()):
        x_tilde = x0 + sig * noise[j]
        posterior_mean = mu + s**2 / (s**2 + sig**2) * (x_tilde - mu)
        want += edm_weight(torch.tensor(sig, dtype=torch.float64)) * (posterior_mean - x0).pow(2).mean(1)
    want /= len(sigmas)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_heldout_loss_charges_a_schedule_for_levels_it_never_sees():
    """VE with σ ∈ [0.01, 1] scores the Bayes error at every level it covers, but it cannot denoise at
    the top EDM level σ̃ ≈ 1.9: queried at its σ_max instead, even the exact score does clearly worse
    there than a VP process that covers the level."""
    gm, _, _, x0, sigmas, noise = _gaussian_case(1)
    narrow, wide = VESDE(0.01, 1.0), VPSDE(0.1, 20.0)
    for j, sig in enumerate(sigmas.tolist()):
        got, ref = (
            heldout_denoising_loss(gm.score_fn(sde), sde, x0, noise[j : j + 1], sigmas[j : j + 1]).mean()
            for sde in (narrow, wide)
        )
        if sig <= narrow.sigma_max:
            assert float(got) == pytest.approx(float(ref), rel=1e-9)
        else:
            assert float(got) > 1.1 * float(ref)


# ---- spaces ----------------------------------------------------------------------------------------


def test_space_points_map_onto_the_pipelines_processes_and_losses():
    base = TrainConfig(loss_kwargs={"parameterization": "v"})
    t = torch.linspace(1e-3, 1.0, 7, dtype=torch.float64)
    cfg = spaces.trial_config({"sde": "ddpm-linear"}, base)
    ref = DDPMSchedule.linear().vp_sde()
    for got, want in zip(
        build_sde(cfg.sde, **cfg.sde_kwargs).marginal_coeffs(t), ref.marginal_coeffs(t), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    cfg = spaces.trial_config({"sde": "ddpm-cosine", "cosine_s": 0.02}, base)
    sde = build_sde(cfg.sde, **cfg.sde_kwargs)
    assert isinstance(sde, CosineVPSDE) and sde.s == 0.02
    cfg = spaces.trial_config({"sde": "ve", "sigma_min": 0.02, "sigma_max": 30, "beta_max": 7}, base)
    assert (cfg.sde, cfg.sde_kwargs) == ("ve", {"sigma_min": 0.02, "sigma_max": 30.0})
    cfg = spaces.trial_config({"weighting": "likelihood-is"}, base)
    loss = build_loss(cfg.loss, build_sde(cfg.sde, **cfg.sde_kwargs), **cfg.loss_kwargs)
    assert isinstance(loss, DSMLoss) and loss.weighting == "likelihood" and loss.importance_sampling
    assert loss.parameterization == "v"  # the base config's parameterisation is kept
    cfg = spaces.trial_config({"weighting": "edm"}, base)
    assert isinstance(build_loss(cfg.loss, None, **cfg.loss_kwargs), EDMLoss)


@pytest.mark.parametrize(
    "spec, words",
    [
        ({}, "empty"),
        ({"schedule": ["vp"]}, "unknown dimension"),
        ({"sde": ["vp", "vesde"]}, "'vesde'"),
        ({"sde": []}, "empty grid"),
        ({"weighting": {"uniform": [0, 1]}}, "categorical"),
        ({"beta_min": {"loguniform": [0.5, 0.1]}}, "lo < hi"),
        ({"sigma_max": -3.0}, "> 0"),
        ({"sde": "vp", "beta_min": {"uniform": [0.1, 25.0]}}, "beta_max must be > beta_min"),
        ('{"sde": ', "not valid JSON"),
    ],
)
def test_invalid_spaces_are_refused(spec, words):
    with pytest.raises(ValueError, match="space") as e:
        spaces.parse_space(spec)
    assert words in str(e.value)


def test_a_range_irrelevant_to_every_sde_of_the_space_is_not_a_conflict():
    # β_min up to 25 > β_max = 20 would break vp, but the space only holds ve.
    space = spaces.parse_space({"sde": "ve", "beta_min": {"uniform": [0.1, 25.0]}})
    assert spaces.num_grid_points(space) == 1


# ---- concurrency and reports -----------------------------------------------------------------------


def _sized(workers, gpus_per_worker, cpus_per_worker, trial_cpus, requested=None) -> ScheduleSearch:
    return ScheduleSearch(space={}, base={}, data="", out="", workers=workers,
                          gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                          trial_cpus=trial_cpus, max_concurrent=requested)


def test_concurrent_trials_follow_the_cluster_resources():
    gpu_cluster = {"CPU": 64.0, "GPU": 8.0}
    assert max_concurrent_trials(_sized(2, 1, 4, 1), gpu_cluster) == 4  # GPUs bound it: 8 / 2
    assert max_concurrent_trials(_sized(1, 0, 0.9, 0.1), {"CPU": 2.0}) == 2
    assert max_concurrent_trials(_sized(1, 0, 1, 0.1), {"CPU": 2.0}) == 1  # 1.1 CPU per trial
    with pytest.raises(ValueError, match="max_concurrent=5"):
        max_concurrent_trials(_sized(2, 1, 4, 1, requested=5), gpu_cluster)
    with pytest.raises(ValueError, match="one trial needs"):
        max_concurrent_trials(_sized(1, 1, 1, 1), {"CPU": 8.0})
    assert concurrent_trials({"CPU": 1, "GPU": 1}, resources=gpu_cluster) == 8


def test_pareto_front_is_the_set_of_undominated_points():
    g = torch.Generator().manual_seed(3)
    pts = [tuple(p) for p in torch.rand(40, 2, generator=g).tolist()]
    front = set(pareto_front(pts))
    for i, (x, y) in enumerate(pts):
        dominated = any(a <= x and b <= y and (a, b) != (x, y) for a, b in pts)
        assert (i in front) == (not dominated)


# ---- real searches -----------------------------------------------------------------------------------

STEPS, REPORT_EVERY = 20, 5
TINY = {"channels": 16, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": []}


def _base(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            **dict(
                preset="tiny-digits",
                model_overrides=TINY,
                lr=4e-3,
                warmup_steps=5,
                batch_size=32,
                steps=STEPS,
                ema_halflife_kimg=0.5,
                seed=0,
            ),
            **kw,
        }
    )


def _options(**kw) -> dict:
    # 0.9 CPU per Train worker + 0.1 per trial function: two trials at a time on the 2-CPU cluster.
    return {
        **dict(
            report_every=REPORT_EVERY,
            cpus_per_worker=0.9,
            trial_cpus=0.1,
            shuffle_buffer=64,
            heldout_n=64,
        ),
        **kw,
    }


@pytest.fixture(scope="module")
def bucket(s3_server):  # noqa: F811
    name = "tune-schedules-test"
    fs, _ = storage.get_fs(f"s3://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def digits(bucket):
    from pipeline.data.shard import shard_dataset

    uri = f"{bucket}/digits"
    shard_dataset("digits", uri, shard_size=600, parallel="none")
    return uri


@pytest.fixture(scope="module")
def classifier(bucket, digits):
    from pipeline.evaluation.classifier import load_split, save_classifier, train_classifier

    (xtr, ytr), (xte, yte) = load_split(digits, "train"), load_split(digits, "test")
    model, metrics = train_classifier(xtr, ytr, xte, yte, num_classes=10, epochs=3, width=8, feature_dim=32)
    uri = f"{bucket}/classifier"
    save_classifier(model, uri, name="digits-test", metrics=metrics)
    return uri


def _history(out: str, trial_id: str) -> list[dict]:
    return storage.read_json(f"{out}/trials/{trial_id}/history.json")


def test_bad_input_fails_before_any_trial_starts(bucket, digits):
    import ray

    from pipeline.tuning.schedules import search_schedules

    out = f"{bucket}/bad-input"
    cases = [
        ({}, {}, "space is empty"),
        ({"sde": ["vp", "nope"]}, {}, "not allowed"),
        ({"sde": ["vp"]}, {"metric": "fid"}, "metric 'fid' is reported by no trial"),
        ({"sde": ["vp"]}, {"metric": "sharpness"}, "reported by no trial"),
        ({"sde": ["vp"]}, {"evaluations": ("heldout_loss", "fid")}, "pass classifier"),
    ]
    started = ray.is_initialized()
    for space, kw, words in cases:
        with pytest.raises(ValueError, match=words):
            search_schedules(space, base=_base(), data=digits, out=out, **_options(**kw))
    assert ray.is_initialized() == started  # refused before Ray was even needed
    assert not storage.exists(f"{out}/search.json") and not storage.exists(f"{out}/trials")


@pytest.mark.integration
def test_more_concurrent_trials_than_the_cluster_holds_is_refused(ray_local, bucket, digits):  # noqa: F811
    from pipeline.tuning.schedules import search_schedules

    out = f"{bucket}/too-many"
    with pytest.raises(ValueError, match="max_concurrent=3 trials"):
        search_schedules(
            {"sde": ["vp", "ve"]}, base=_base(), data=digits, out=out, **_options(max_concurrent=3)
        )
    with pytest.raises(ValueError, match="one trial needs"):
        search_schedules(
            {"sde": ["vp"]}, base=_base(), data=digits, out=out, **_options(workers=2, cpus_per_worker=1.0)
        )
    assert not storage.exists(f"{out}/search.json") and not storage.exists(f"{out}/trials")


@pytest.mark.integration
@pytest.mark.slow
def test_asha_stops_a_trial_early_and_returns_the_best(ray_local, bucket, digits, classifier):  # noqa: F811
    """4 trials, 2 at a time. vp and cosine run first and pass the first rung (step 5) long before the
    third trial starts; the third, VE with σ ≤ 1 (it never sees the higher noise levels the held-out
    metric asks for), is worse than both at that rung, so ASHA must stop it (or, should cosine trail vp
    at the rung, cosine): at least one trial ends before `steps` whatever the timing."""
    from pipeline.tuning.schedules import search_schedules

    out = f"{bucket}/asha"
    res = search_schedules(
        {"sde": ["vp", "ddpm-cosine", "ve", "subvp"], "sigma_max": 1.0},
        base=_base(),
        data=digits,
        out=out,
        evaluations=("heldout_loss", "fid", "bpd"),
        classifier=classifier,
        fid_n=32,
        fid_steps=4,
        bpd_samples=1,
        **_options(),
    )
    assert res.complete and len(res.rows) == 4
    stopped = [r for r in res.rows if r["stopped_early"]]
    assert stopped, [(r["sde"], r["step"], r["heldout_loss"]) for r in res.rows]
    for r in res.rows:
        steps_run = [h["step"] for h in _history(out, r["trial_id"])]
        # Tune saw the run's own reports (a stopped run may get a few steps further before it is killed).
        assert r["step"] in steps_run and (r["stopped_early"] or steps_run[-1] == STEPS)
        assert (r["step"] < STEPS) == r["stopped_early"]
        for k in ("heldout_loss", "fid", "bpd", "precision"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
    # The best trial, recomputed from the runs' own histories on storage.
    finals = {r["trial_id"]: _history(out, r["trial_id"])[-1] for r in res.rows if not r["stopped_early"]}
    best_id = min(finals, key=lambda k: finals[k]["heldout_loss"])
    assert res.best["trial_id"] == best_id
    assert res.best["heldout_loss"] == pytest.approx(finals[best_id]["heldout_loss"], rel=1e-12)
    assert storage.read_json(f"{out}/best.json")["trial_id"] == best_id
    report = storage.read_bytes(f"{out}/report.md").decode()
    assert all(r["trial_id"] in report for r in res.rows) and f"Best trial: `{best_id}`" in report
    from PIL import Image

    png = Image.open(io.BytesIO(storage.read_bytes(res.report["pareto"])))
    assert png.format == "PNG" and png.size[0] > 200


class InterruptAfter(Callback):
    """Tune callback that interrupts the search as Ctrl-C would (SIGUSR1 to the driver, which Tune
    handles by saving its state and returning) once `n` trials have finished, and only the first time:
    a marker on storage, since Tune restores its callbacks with the experiment."""

    def __init__(self, n: int, marker: str) -> None:
        self.n, self.marker, self.done = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        if self.done >= self.n and not storage.exists(self.marker):
            storage.write_bytes(self.marker, b"interrupted")
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.integration
@pytest.mark.slow
def test_an_interrupted_search_restores_without_rerunning_finished_trials(ray_local, bucket, digits):  # noqa: F811
    from pipeline.tuning.schedules import restore_schedules, search_schedules

    out = f"{bucket}/restore"
    steps = 10
    first = search_schedules(
        {"sde": ["vp", "subvp", "ddpm-cosine", "ddpm-linear"]},
        base=_base(steps=steps),
        data=digits,
        out=out,
        callbacks=[InterruptAfter(2, f"{out}/interrupted")],
        **_options(grace_period=steps),
    )
    assert storage.exists(f"{out}/interrupted") and not first.complete
    done_before = {r["trial_id"] for r in first.rows if r["status"] in ("TERMINATED", "STOPPED")}
    assert 2 <= len(done_before) < 4
    assert storage.exists(f"{out}/tune/schedules/tuner.pkl")  # Tune's experiment lives on S3

    second = restore_schedules(out)
    assert second.complete and len(second.rows) == 4
    assert {r["trial_id"] for r in first.rows} <= {r["trial_id"] for r in second.rows}
    for r in second.rows:
        assert r["status"] in ("TERMINATED", "STOPPED")
        if r["trial_id"] in done_before:
            assert r["attempts"] == 1, r  # finished trials were not run again
        else:
            assert r["attempts"] >= 1 and r["step"] is not None
    resumed = [r for r in second.rows if r["trial_id"] not in done_before]
    assert resumed and all(r["step"] == steps or r["stopped_early"] for r in resumed)
    assert second.best is not None and second.best["step"] == steps


def test_cli_tune_refuses_bad_input_with_one_line(bucket, digits, capsys):
    from pipeline.cli import main

    assert main(["tune", "schedules", "--data", digits, "--out", f"{bucket}/cli", "--space", "{}"]) == 2
    assert "space is empty" in capsys.readouterr().err
    space = '{"sde": ["vp"]}'
    assert (
        main(
            [
                "tune",
                "schedules",
                "--data",
                digits,
                "--out",
                f"{bucket}/cli",
                "--space",
                space,
                "--metric",
                "fid",
            ]
        )
        == 2
    )
    assert "reported by no trial" in capsys.readouterr().err
    assert main(["tune", "schedules", "--out", f"{bucket}/cli-nothing", "--restore"]) == 2
    assert "no search.json" in capsys.readouterr().err
    assert main(["tune", "guidance", "--out", f"{bucket}/cli-g", "--w", "0,1"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not storage.exists(f"{bucket}/cli/search.json")


def test_the_search_chooses_among_modern_weightings_and_score_matching():
    """min-SNR-γ, EDM2's learned uncertainty and implicit/sliced score matching are weighting choices of
    the search, each building its own loss."""
    from pipeline.diffusion.losses import UncertaintyWeightedLoss, build_loss
    from pipeline.diffusion.score_matching import ScoreMatchingLoss
    from pipeline.diffusion.sde import build_sde
    from pipeline.tuning import spaces

    base = _base(loss="edm", loss_kwargs={"sigma_data": 0.5})
    space = spaces.parse_space({"weighting": ["min_snr", "edm-learned", "ssm", "ism"]})
    spaces.check_space_with(space, base)
    built = {}
    for w in ("min_snr", "edm-learned", "ssm", "ism"):
        cfg = spaces.trial_config({"weighting": w}, base)
        built[w] = build_loss(cfg.loss, build_sde(cfg.sde, **cfg.sde_kwargs), **cfg.loss_kwargs)
    assert isinstance(built["edm-learned"], UncertaintyWeightedLoss)
    assert isinstance(built["ssm"], ScoreMatchingLoss) and isinstance(built["ism"], ScoreMatchingLoss)
    assert built["min_snr"].weighting == "min_snr"
