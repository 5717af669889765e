"""Bits/dim evaluation at scale: summaries, exact merging, datasets on storage, and a real local Ray."""

import functools
import json
import math

import pytest
import torch

from pipeline.diffusion.elbo import eps_fn_from_score
from pipeline.diffusion.likelihood import Integration, ode_likelihood
from pipeline.diffusion.schedules import DDPMSchedule
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.toy import GaussianMixture
from pipeline.evaluation.bpd import (
    Part,
    evaluate_bpd,
    evaluate_bpd_ray,
    evaluate_ddpm_elbo,
    evaluate_elbo,
    iter_batches,
    merge_summaries,
)

F64 = torch.float64
FAST = dict(rtol=1e-5, atol=1e-5)


def mixture(d: int = 3) -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = 0.3 * torch.randn(2, d, generator=g, dtype=F64)
    return GaussianMixture.isotropic(means, [0.2, 0.3])


def data(n: int = 10, d: int = 3) -> torch.Tensor:
    return mixture(d).sample(n, generator=torch.Generator().manual_seed(1)).double()


def test_an_integration_option_is_used_and_recorded_as_json():
    gm, sde, x = mixture(), VPSDE(), data(4)
    vp = Integration(variable="vp")
    summary = evaluate_bpd(gm.score_fn(sde), sde, x, trace="exact", integration=vp, progress=False, **FAST)
    direct = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", integration=vp, **FAST)
    assert summary["bpd"] == pytest.approx(float(direct.bpd.mean()), rel=1e-12)
    recorded = json.loads(json.dumps(summary["settings"]))["integration"]
    assert recorded == {"method": "dopri5", "variable": "vp"}


def test_summary_matches_per_batch_likelihoods_and_the_true_density():
    gm, sde, x = mixture(), VPSDE(), data()
    summary = evaluate_bpd(gm.score_fn(sde), sde, x, batch_size=4, trace="exact", progress=False, **FAST)
    per_batch = [ode_likelihood(gm.score_fn(sde), sde, xb, trace="exact", **FAST) for xb in x.split(4)]
    bpd = torch.cat([r.bpd for r in per_batch])
    assert summary["n"] == 10 and summary["n_batches"] == 3
    assert summary["bpd"] == pytest.approx(float(bpd.mean()), rel=1e-12)
    assert summary["bpd_stderr"] == pytest.approx(float(bpd.std() / math.sqrt(10)), rel=1e-10)
    assert summary["nfe_mean"] == pytest.approx(sum(r.nfe for r in per_batch) / 3)
    true_bpd = -gm.log_prob(x) / (3 * math.log(2))
    assert summary["bpd"] == pytest.approx(float(true_bpd.mean()), abs=3e-3)
    assert summary["settings"]["trace"] == "exact" and summary["settings"]["sde"]["name"] == "vp"


def test_merging_parts_equals_the_whole_with_random_probes():
    gm, sde, x = mixture(), VPSDE(), data(12)
    opts = dict(batch_size=3, n_probes=2, seed=7, progress=False, **FAST)
    whole = evaluate_bpd(gm.score_fn(sde), sde, x, **opts)
    parts = [evaluate_bpd(gm.score_fn(sde), sde, x[:6], part=Part(batch_offset=0), **opts),
             evaluate_bpd(gm.score_fn(sde), sde, x[6:], part=Part(batch_offset=2), **opts)]
    merged = merge_summaries(parts)
    for key in ("bpd", "bpd_stderr", "bpd_m2", "nfe_mean", "mc_stderr_mean"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-10, abs=1e-14), key
    assert merged["n"] == whole["n"] and merged["nfe_total"] == whole["nfe_total"]


def test_iterables_are_rebatched_and_capped():
    x = torch.arange(22, dtype=F64).reshape(11, 2)
    batches = list(iter_batches([(x[:3], None), (x[3:4], None), {"image": x[4:11]}], 4, max_samples=10))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), x[:10])


def test_elbo_summaries_bound_the_true_bits_per_dim():
    gm, sde, x = mixture(), VPSDE(), data(40)
    true_bpd = float((-gm.log_prob(x) / (3 * math.log(2))).mean())
    cont = evaluate_elbo(gm.score_fn(sde), sde, x, batch_size=20, n_samples=32, progress=False)
    assert cont["metric"] == "elbo-continuous" and cont["nfe_mean"] == 32
    assert cont["bpd"] > true_bpd - 3 * cont["bpd_stderr"]
    assert cont["bpd"] < true_bpd + 3 * cont["bpd_stderr"] + 0.02
    sched = DDPMSchedule.linear(200)
    ddpm = evaluate_ddpm_elbo(eps_fn_from_score(gm.score_fn(sched.vp_sde()), sched), sched, x, batch_size=20,
                              decoder="gaussian", progress=False)
    assert ddpm["bpd"] > true_bpd - 3 * ddpm["bpd_stderr"]
    assert sum(ddpm["terms"].values()) == pytest.approx(ddpm["bpd"], rel=1e-10)
    assert ddpm["settings"]["schedule"]["N"] == 200


def test_dataset_uri_is_read_from_shards_with_its_levels(tmp_path):
    pytest.importorskip("webdataset")
    from pipeline.data.loader import make_loader
    from pipeline.data.shard import shard_dataset
    from pipeline.data.sources import digits_source

    dest = str(tmp_path / "digits")
    shard_dataset(digits_source().subset(list(range(24))), dest, shard_size=6, test_fraction=0.5,
                  parallel="none")
    gm = GaussianMixture.isotropic(torch.zeros(1, 64), 0.5)
    sde = VPSDE()
    score_fn = gm.score_fn(sde)
    opts = dict(batch_size=4, max_samples=6, seed=3, progress=False, rtol=1e-4, atol=1e-4)
    from_uri = evaluate_bpd(score_fn, sde, dest, **opts)
    assert from_uri["settings"]["dequantize"] == {"levels": 17} and from_uri["n"] == 6
    x = torch.cat([b[0] for b in make_loader(dest, "test", 4, shuffle_buffer=0)])[:6]
    from_tensor = evaluate_bpd(score_fn, sde, x, dequantize={"levels": 17}, **opts)
    assert from_uri["bpd"] == pytest.approx(from_tensor["bpd"], rel=1e-12)


@pytest.mark.integration
@pytest.mark.slow  # ~20 s, mostly Ray start-up
def test_ray_split_equals_the_single_process_result(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    gm, sde, x = mixture(), VPSDE(), data(10)
    opts = dict(batch_size=3, n_probes=2, seed=11, **FAST)
    single = evaluate_bpd(gm.score_fn(sde), sde, x, progress=False, **opts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # A bound method of a picklable object: the worker rebuilds the exact score there.
        make_score_fn = functools.partial(gm.score_fn, sde)
        split = evaluate_bpd_ray(make_score_fn, sde.config(), x, num_workers=2, **opts)
    finally:
        ray.shutdown()
    assert len(split["workers"]) == 2 and sum(w["n"] for w in split["workers"]) == 10
    for key in ("bpd", "bpd_stderr", "nfe_mean", "mc_stderr_mean"):
        assert split[key] == pytest.approx(single[key], rel=1e-10), key
    assert split["n"] == single["n"] and split["nfe_total"] == single["nfe_total"]


def test_bad_input_is_rejected():
    gm, sde, x = mixture(), VPSDE(), data(4)
    f = gm.score_fn(sde)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_bpd(f, sde, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_bpd(f, sde, x[:0], progress=False)
    with pytest.raises(ValueError, match="seed"):
        evaluate_bpd(f, sde, x, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="trace"):
        evaluate_bpd(f, sde, x, trace="none", progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate_elbo(f, sde, x, n_samples=0, progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        evaluate_bpd_ray(functools.partial(gm.score_fn, sde), sde.config(), x, num_workers=0)
