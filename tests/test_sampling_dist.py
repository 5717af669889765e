"""Sampling from checkpoints: Ray workers, exact counts, per-sample seeds and regeneration, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.evaluation.sampling import (
    SamplingPlan,
    generate,
    load_model_for_sampling,
    read_samples,
    regenerate,
    run_sampling,
    to_levels,
)
from pipeline.models import build_unet
from pipeline.training.checkpoint import export_ema

LEVELS = 17


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
    # A stochastic sampler: the block is re-run from the recorded seeds, here in this process.
    again = to_levels(regenerate(out, [9, 5, 0]), LEVELS)
    np.testing.assert_array_equal(again, stored[[9, 5, 0]])
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
    model = load_model_for_sampling(ckpts["cond"])
    plan = SamplingPlan(n=6, method="heun", steps=5, base_seed=3, batch_size=6, levels=LEVELS)
    assert plan.deterministic
    whole, nfe = generate(model, plan, list(range(6)), noise_seed=0)
    assert nfe == 9  # Heun: 2·steps − 1
    # Other batch compositions: sample i alone, and in a different batch with different neighbours.
    for i in (0, 4):
        alone, _ = generate(model, plan, [i], noise_seed=123)
        torch.testing.assert_close(alone[0], whole[i], rtol=0, atol=1e-4)
    mixed, _ = generate(model, plan, [5, 2], noise_seed=7)
    torch.testing.assert_close(mixed, whole[[5, 2]], rtol=0, atol=1e-4)
    other = SamplingPlan(n=6, method="heun", steps=5, base_seed=4, batch_size=6, levels=LEVELS)
    shifted, _ = generate(model, other, list(range(6)), noise_seed=0)
    # base_seed 4 makes sample i start from seed(i) = 4 + i, which is sample i+1 under base_seed 3.
    torch.testing.assert_close(shifted[:5], whole[1:], rtol=0, atol=1e-4)
    assert (shifted[0] - whole[0]).abs().max() > 0.1


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

    trainer = Trainer(_config(steps=2, batch_size=8))
    with torch.no_grad():
        for p in trainer.ema.module.parameters():
            p.add_(0.01)
    uri = str(tmp_path / "trainer.pt")
    torch.save(trainer.state_dict(), uri)
    ema = load_model_for_sampling(uri)
    raw = load_model_for_sampling(uri, weights="model")
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
    with pytest.raises(ValueError, match="sampler must be one of"):
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
