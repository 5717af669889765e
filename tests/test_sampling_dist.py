"""Sampling from checkpoints: Ray workers, exact counts, per-sample seeds and regeneration, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.diffusion.dequantize import to_levels
from pipeline.evaluation.generate import SamplingPlan, generate
from pipeline.evaluation.sampling import Execution, read_samples, regenerate
from pipeline.evaluation.sampling import run_sampling as _run_sampling
from pipeline.models import build_unet
from pipeline.training.checkpoint import export_ema, load_model

LEVELS = 17


def run_sampling(ckpt, out, *, n, method="heun", steps=32, seed=0, workers=0, shard_size=10_000,
                 levels=256, **plan):
    """The plan's fields as keywords (seed is the plan's base_seed), execution apart."""
    plan = SamplingPlan(n=n, method=method, steps=steps, base_seed=seed, levels=levels, **plan)
    return _run_sampling(ckpt, out, plan, execution=Execution(workers=workers, shard_size=shard_size))


def _one(model, plan, indices):
    (blk,) = generate(model, plan, indices=indices)
    return blk.x, blk.nfe


def _config(**kw) -> TrainConfig:
    return TrainConfig(preset="tiny-digits", sde="vp", loss="edm", loss_kwargs={"sigma_data": 0.5}, **kw)


def _random_net(config: TrainConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_unet(config.preset, **config.model_overrides)
    # The preset zero-initialises its output layer; give it weight so samples depend on the network.
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cond = _config()
    uncond = _config(model_overrides={"num_classes": None})
    uris = {}
    for name, cfg in (("cond", cond), ("uncond", uncond)):
        uris[name] = export_ema(
            str(root / f"{name}.pt"), ema=_random_net(cfg).state_dict(), config=cfg.to_dict(), step=7
        )
    return uris


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_two_ray_workers_exact_n_and_regeneration(ckpts, tmp_path, ray_cluster):
    n, bs = 10, 4  # 3 blocks (4, 4, 2) over 2 workers
    out = str(tmp_path / "ray")
    m = run_sampling(
        ckpts["cond"],
        out,
        n=n,
        method="ancestral",
        steps=6,
        seed=100,
        batch_size=bs,
        levels=LEVELS,
        workers=2,
        shard_size=4,
    )
    rec = m["sampling"]
    assert m["counts"]["samples"] == n and sum(s["count"] for s in m["shards"]) == n
    assert len(m["shards"]) == 3 and rec["workers"] == 2
    x, labels, idx = read_samples(out)
    assert idx.tolist() == list(range(n))  # exactly N, each index once
    assert labels.tolist() == [i % 10 for i in range(n)]
    assert rec["seeds"]["first"] == 100 and rec["seeds"]["last"] == 100 + n - 1
    assert rec["nfe_per_sample"]["min"] == rec["nfe_per_sample"]["max"] == 7  # 6 steps + Tweedie
    assert rec["checkpoint"]["sha256"] == storage.sha256(ckpts["cond"])
    grid = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "grid.png"))))
    assert grid.size[0] > 0

    stored = to_levels(x, LEVELS)
    # A stochastic sampler: every sample has its own streams, so samples regenerate alone, here in this
    # process, in any batch composition.
    again = to_levels(regenerate(out, [9, 5, 0]), LEVELS)
    np.testing.assert_array_equal(again, stored[[9, 5, 0]])
    np.testing.assert_array_equal(to_levels(regenerate(out, [7]), LEVELS), stored[[7]])
    # The same plan in one process (no Ray) gives the same samples: the split over workers is irrelevant.
    local = str(tmp_path / "local")
    run_sampling(
        ckpts["cond"],
        local,
        n=n,
        method="ancestral",
        steps=6,
        seed=100,
        batch_size=bs,
        levels=LEVELS,
        workers=0,
    )
    np.testing.assert_array_equal(to_levels(read_samples(local)[0], LEVELS), stored)


def test_deterministic_sampler_sample_depends_on_its_seed_only(ckpts):
    model = load_model(ckpts["cond"])
    plan = SamplingPlan(n=6, method="heun", steps=5, base_seed=3, batch_size=6, levels=LEVELS)
    assert plan.deterministic
    whole, nfe = _one(model, plan, list(range(6)))
    assert nfe == 9  # Heun: 2·steps − 1
    # Other batch compositions: sample i alone, and in a different batch with different neighbours.
    for i in (0, 4):
        alone, _ = _one(model, plan, [i])
        torch.testing.assert_close(alone[0], whole[i], rtol=0, atol=1e-4)
    mixed, _ = _one(model, plan, [5, 2])
    torch.testing.assert_close(mixed, whole[[5, 2]], rtol=0, atol=1e-4)
    other = SamplingPlan(n=6, method="heun", steps=5, base_seed=4, batch_size=6, levels=LEVELS)
    shifted, _ = _one(model, other, list(range(6)))
    # base_seed 4 makes sample i start from seed(i) = 4 + i, which is sample i+1 under base_seed 3.
    torch.testing.assert_close(shifted[:5], whole[1:], rtol=0, atol=1e-4)
    assert (shifted[0] - whole[0]).abs().max() > 0.1


@pytest.mark.parametrize("method,options", [("ancestral", {}), ("euler_maruyama", {}),
                                            ("heun", {"S_churn": 5.0}), ("pc", {"snr_norm": "sample"})])
def test_stochastic_sample_regenerates_alone(ckpts, method, options):
    """Per-sample noise streams: sample k drawn alone equals row k of the batch (float round-off of
    batched versus single network calls only)."""
    model = load_model(ckpts["cond"])
    steps = 25 if method == "pc" else 4  # a pc chain needs every β_i = β(t_i)/steps < 1
    plan = SamplingPlan(n=5, method=method, steps=steps, base_seed=21, batch_size=5, options=options)
    whole, _ = _one(model, plan, list(range(5)))
    alone, _ = _one(model, plan, [3])
    torch.testing.assert_close(alone[0], whole[3], rtol=0, atol=1e-4)
    reseeded, _ = _one(model, SamplingPlan(n=5, method=method, steps=steps, base_seed=22, batch_size=5,
                                           options=options), [2])
    assert (reseeded[0] - whole[3]).abs().max() > 1e-3  # base_seed 22, index 2: same x_T, other noise


def test_regenerate_alone_for_deterministic_sampler(ckpts, tmp_path):
    out = str(tmp_path / "heun")
    m = run_sampling(
        ckpts["cond"], out, n=5, method="heun", steps=4, seed=11, batch_size=5, guidance=1.5, levels=LEVELS
    )
    assert m["sampling"]["guidance_w"] == 1.5
    x = read_samples(out)[0]
    again = regenerate(out, [3])  # alone: batch of one, from seed 11 + 3
    np.testing.assert_array_equal(to_levels(again, LEVELS), to_levels(x[3:4], LEVELS))


def test_trainer_checkpoint_and_ema_export_load_the_same_network(tmp_path):
    from pipeline.training.loop import Trainer

    trainer = Trainer.from_config(_config(steps=2, batch_size=8))
    with torch.no_grad():
        for p in trainer.ema.module.parameters():
            p.add_(0.01)
    uri = str(tmp_path / "trainer.pt")
    torch.save(trainer.state_dict(), uri)
    ema = load_model(uri)
    raw = load_model(uri, weights="model")
    sd_ema, sd_raw = ema.net.net.state_dict(), raw.net.net.state_dict()
    for k, v in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(sd_ema[k], v, rtol=0, atol=0)
    for k, v in trainer.net.state_dict().items():
        torch.testing.assert_close(sd_raw[k], v, rtol=0, atol=0)
    assert ema.parameterization == "edm" and ema.num_classes == 10 and ema.image_shape == (1, 8, 8)


def test_bad_input(ckpts, tmp_path):
    out = str(tmp_path / "bad")
    kw = dict(steps=2, levels=LEVELS)
    with pytest.raises(ValueError, match="n must be"):
        run_sampling(ckpts["cond"], out, n=0, **kw)
    with pytest.raises(ValueError, match="method must be one of"):
        run_sampling(ckpts["cond"], out, n=2, method="dpm++", **kw)
    with pytest.raises(ValueError, match="unknown sampler option"):
        run_sampling(ckpts["cond"], out, n=2, method="ddim", options={"churn": 1}, **kw)
    with pytest.raises(ValueError, match="eta"):
        run_sampling(ckpts["cond"], out, n=2, method="ddim", options={"eta": 2.0}, **kw)
    with pytest.raises(ValueError, match="unconditional"):
        run_sampling(ckpts["uncond"], out, n=2, guidance=1.0, **kw)
    with pytest.raises(ValueError, match="guidance"):
        run_sampling(ckpts["cond"], out, n=2, guidance=-1.0, **kw)
    with pytest.raises(ValueError, match="class_label"):
        run_sampling(ckpts["cond"], out, n=2, class_label=10, **kw)
    # A checkpoint whose weights do not fit its preset (config says 48 channels, weights have 32).
    cfg = _config(model_overrides={"channels": 48})
    wrong = export_ema(
        str(tmp_path / "wrong.pt"), ema=_random_net(_config()).state_dict(), config=cfg.to_dict(), step=0
    )
    with pytest.raises(ValueError, match="does not match preset 'tiny-digits'"):
        run_sampling(wrong, out, n=2, **kw)
    not_ckpt = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, not_ckpt)
    with pytest.raises(ValueError, match="EMA export"):
        run_sampling(str(not_ckpt), out, n=2, **kw)
    assert not storage.exists(storage.join(out, "manifest.json"))


def test_cli_reports_bad_input(ckpts, tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["sample", ckpts["uncond"], str(tmp_path / "o"), "--n", "2", "--guidance", "2"])
    assert rc == 2 and "unconditional" in capsys.readouterr().err
    rc = main(["sample", ckpts["cond"], str(tmp_path / "o"), "--n", "-3"])
    assert rc == 2 and "n must be" in capsys.readouterr().err


def test_unconditional_samples_carry_no_label(ckpts, tmp_path):
    out = str(tmp_path / "uncond")
    m = run_sampling(
        ckpts["uncond"], out, n=3, method="euler_maruyama", steps=3, levels=LEVELS, batch_size=1, shard_size=1
    )
    assert len(m["shards"]) == 3
    _, labels, idx = read_samples(out)
    assert labels.tolist() == [-1, -1, -1] and idx.tolist() == [0, 1, 2]
    assert m["sampling"]["labels"] is None and m["num_classes"] == 0
    # A rerun with fewer samples into the same folder leaves only its own shards behind.
    run_sampling(
        ckpts["uncond"], out, n=2, method="euler_maruyama", steps=3, levels=LEVELS, batch_size=1, shard_size=1
    )
    tars = sorted(n for n in storage.listdir(out) if n.endswith(".tar"))
    assert tars == ["samples-00000000.tar", "samples-00000001.tar"]
    assert read_samples(out)[2].tolist() == [0, 1]


def test_guidance_interval_and_autoguidance_through_generate(ckpts, tmp_path):
    """The plan's guidance options reach the sampler: an interval covering every σ̃ is plain CFG, an empty
    one no guidance; autoguidance at w = 1 draws the main model's samples and at w = 0 the guide's."""
    model = load_model(ckpts["cond"])
    base = dict(n=4, method="heun", steps=4, base_seed=5, batch_size=4)
    cfg, _ = _one(model, SamplingPlan(**base, guidance=2.0), list(range(4)))
    full, _ = _one(model, SamplingPlan(**base, guidance=2.0, sigma_lo=0.0, sigma_hi=1e9), list(range(4)))
    none, _ = _one(model, SamplingPlan(**base, guidance=2.0, sigma_lo=1e8, sigma_hi=1e9), list(range(4)))
    plain, _ = _one(model, SamplingPlan(**base), list(range(4)))
    assert torch.equal(cfg, full) and torch.equal(none, plain) and not torch.equal(cfg, plain)

    cfg_guide = _config()
    torch.manual_seed(3)
    weak = export_ema(str(tmp_path / "guide.pt"), ema=_random_net(cfg_guide, seed=3).state_dict(),
                      config=cfg_guide.to_dict(), step=1)
    main_only, _ = _one(model, SamplingPlan(**base, guidance=1.0, guide=weak), list(range(4)))
    guide_only, _ = _one(load_model(weak), SamplingPlan(**base), list(range(4)))
    via_guide, _ = _one(model, SamplingPlan(**base, guidance=0.0, guide=weak), list(range(4)))
    torch.testing.assert_close(main_only, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_guide, guide_only, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_lo"):
        _one(model, SamplingPlan(**base, guidance=1.0, sigma_lo=2.0, sigma_hi=1.0), [0])
    other = _config(model_overrides={"num_classes": None})
    mismatched = export_ema(str(tmp_path / "uncond.pt"), ema=_random_net(other).state_dict(),
                            config=other.to_dict(), step=1)
    with pytest.raises(ValueError, match="num_classes"):
        _one(model, SamplingPlan(**base, guidance=1.0, guide=mismatched), [0])
