"""Guidance sweep on a real local Ray cluster: a conditional digits model trained briefly here, swept
over six guidance weights with Ray Tune; the curve, the best w, w = 0 against the conditional model on
identical seeds, and bad input refused before any point is drawn."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline import storage
from pipeline.config import TrainConfig
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
N, STEPS, SEED = 200, 12, 0
NET = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Digits shards, a domain classifier (≥ 90% test accuracy) and a conditional model trained for 400
    steps with 20% label dropout (enough for its samples to be recognisable, and for guidance to act)."""
    from pipeline.data.shard import shard_dataset
    from pipeline.evaluation.classifier import load_split, save_classifier, train_classifier
    from pipeline.training import InMemoryBatches, Trainer, export_ema, fit

    root = tmp_path_factory.mktemp("guidance")
    data = str(root / "digits")
    shard_dataset("digits", data, shard_size=600, parallel="none")
    (xtr, ytr), (xte, yte) = load_split(data, "train"), load_split(data, "test")
    clf, metrics = train_classifier(xtr, ytr, xte, yte, num_classes=10, epochs=10)
    assert metrics["test_accuracy"] > 0.9
    save_classifier(clf, str(root / "classifier"), name="digits-test", metrics=metrics)
    config = TrainConfig(
        preset="tiny-digits",
        model_overrides=NET,
        lr=2e-3,
        warmup_steps=20,
        batch_size=32,
        steps=400,
        ema_halflife_kimg=2.0,
        label_dropout=0.2,
        seed=0,
    )
    trainer = Trainer.from_config(config)
    fit(trainer, InMemoryBatches(xtr, ytr, 32, seed=0), steps=config.steps, report_every=0)
    ckpt = str(root / "ema.pt")
    export_ema(ckpt, ema=trainer.ema.state_dict(), config=config.to_dict(), step=config.steps)
    return {"root": root, "data": data, "classifier": str(root / "classifier"), "checkpoint": ckpt}


@pytest.fixture(scope="module")
def sweep(ray_local, trained):  # noqa: F811
    from pipeline.tuning.guidance import sweep_guidance

    return sweep_guidance(
        checkpoint=trained["checkpoint"],
        data=trained["data"],
        classifier=trained["classifier"],
        out=str(trained["root"] / "sweep"),
        weights=WEIGHTS,
        samplers=("heun",),
        steps=(STEPS,),
        n=N,
        seed=SEED,
        batch_size=N,
        cpus_per_trial=1.0,
    )


def _by_w(sweep) -> dict[float, dict]:
    return {r["w"]: r for r in sweep["rows"]}


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_scores_every_w_and_reports_the_best(sweep):
    rows = _by_w(sweep)
    assert sweep["complete"] and sorted(rows) == list(WEIGHTS)
    for r in rows.values():
        assert r["status"] == "TERMINATED" and r["n"] == N and r["nfe"] == 2 * STEPS - 1  # Heun, EDM Alg. 1
        assert math.isfinite(r["fid"]) and 0 <= r["precision"] <= 1
    best_w = min(rows, key=lambda w: rows[w]["fid"])
    assert sweep["best"]["overall"]["w"] == best_w == sweep["best"][f"heun/{STEPS}"]["w"]
    report = storage.read_bytes(sweep["report"]["markdown"]).decode()
    assert f"heun/{STEPS}: w = {best_w:g}" in report
    from PIL import Image

    png = Image.open(io.BytesIO(storage.read_bytes(sweep["report"]["plot"])))
    assert png.format == "PNG" and png.size[0] > 200


@pytest.mark.integration
@pytest.mark.slow
def test_the_curve_has_the_shape_guidance_gives(sweep):
    """Guidance sharpens p(x | c) towards samples the classifier recognises, so precision (its accuracy on
    the conditioning labels) rises with w; beyond moderate w the samples lose diversity and drift from the
    data, so FID is lowest at a moderate w and clearly higher at the largest (Ho & Salimans 2022, Fig. 4).
    Only the robust parts are asserted: strong guidance beats none on precision, and the minimum of FID
    is not at the largest w, which is well above it."""
    rows = _by_w(sweep)
    p0 = rows[0.0]["precision"]
    assert all(rows[w]["precision"] > p0 for w in WEIGHTS if w >= 2.0)
    assert rows[WEIGHTS[-1]]["precision"] >= p0 + 0.1
    fids = [rows[w]["fid"] for w in WEIGHTS]
    assert min(fids) < fids[-1] / 1.5 and fids.index(min(fids)) < len(WEIGHTS) - 1


@pytest.mark.integration
@pytest.mark.slow
def test_w0_draws_exactly_what_the_conditional_model_draws(sweep, trained):
    """At w = 0 the guided score (1 + w) s(x, c) − w s(x, ∅) is the conditional score: the sweep's w = 0
    samples must equal Heun's samples of the plain conditional model from the same x_T and labels."""
    from pipeline.diffusion.param import make_score_fn
    from pipeline.diffusion.samplers import sample_heun
    from pipeline.evaluation.generate import SamplingPlan, initial_noise
    from pipeline.training.checkpoint import load_model

    saved = torch.load(io.BytesIO(storage.read_bytes(_by_w(sweep)[0.0]["samples"])), weights_only=True)
    model = load_model(trained["checkpoint"])
    plan = SamplingPlan(n=N, method="heun", steps=STEPS, base_seed=SEED, batch_size=N)
    labels = torch.arange(N) % 10
    score = make_score_fn(
        model.net,
        model.sde,
        model.parameterization,
        class_labels=labels,
        noise_label_kind=model.noise_label_kind,
        sigma_data=model.sigma_data,
    )
    with torch.no_grad():
        x = sample_heun(score, model.sde, initial_noise(model, plan, range(N)), steps=STEPS, generator=None)
    assert torch.equal(saved["labels"], labels)
    torch.testing.assert_close(saved["x"], x, rtol=0, atol=1e-5)
    guided = torch.load(io.BytesIO(storage.read_bytes(_by_w(sweep)[2.0]["samples"])), weights_only=True)
    assert (guided["x"] - x).abs().max() > 0.1  # and guidance does change the samples


@pytest.mark.integration
def test_bad_input_is_refused_before_any_point_is_drawn(ray_local, trained, tmp_path):  # noqa: F811
    from pipeline.training import Trainer, export_ema
    from pipeline.tuning.guidance import sweep_guidance

    uncond = TrainConfig(preset="tiny-digits", model_overrides={**NET, "num_classes": None}, steps=1)
    export_ema(
        str(tmp_path / "uncond.pt"), ema=Trainer.from_config(uncond).ema.state_dict(),
        config=uncond.to_dict(), step=0
    )
    out = str(tmp_path / "sweep")
    common = dict(
        checkpoint=trained["checkpoint"], data=trained["data"], classifier=trained["classifier"], out=out
    )
    cases = [
        (dict(weights=(0.0, -1.0)), "finite number >= 0"),
        (dict(weights=()), "at least one"),
        (dict(samplers=("leapfrog",)), "leapfrog"),
        (dict(n=1), "n must be"),
        (dict(checkpoint=str(tmp_path / "uncond.pt")), "unconditional"),
        (dict(max_concurrent=3), "max_concurrent=3"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            sweep_guidance(**{**common, **kw})
    assert not storage.exists(f"{out}/sweep.json") and not storage.exists(f"{out}/points")


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_over_w_and_guidance_interval_and_autoguidance(ray_local, trained, tmp_path):  # noqa: F811
    """The sweep's grid is w × interval × guide: an interval that covers no σ̃ is the unguided model at
    every w (the same samples), the full interval is plain CFG, and autoguidance by a weaker checkpoint
    at w = 1 is the main model."""
    from pipeline.training import Trainer, export_ema
    from pipeline.tuning.guidance import sweep_guidance

    weak_cfg = TrainConfig(preset="tiny-digits", model_overrides=NET, steps=1, label_dropout=0.2)
    weak = export_ema(str(tmp_path / "weak.pt"), ema=Trainer.from_config(weak_cfg).ema.state_dict(),
                      config=weak_cfg.to_dict(), step=0)
    res = sweep_guidance(checkpoint=trained["checkpoint"], data=trained["data"],
                         classifier=trained["classifier"], out=str(tmp_path / "sweep"), weights=(1.0, 3.0),
                         steps=(6,), n=40,
                         intervals=((0.0, None), (1e6, None)), guides=(None, weak))
    rows = res["rows"]
    assert res["complete"] and len(rows) == 2 * 2 * 2
    cfg = {(r["w"], tuple(r["interval"])): r for r in rows if r["guide"] is None}
    empty = [cfg[(w, (1e6, None))]["fid"] for w in (1.0, 3.0)]
    assert empty[0] == pytest.approx(empty[1], rel=1e-9)  # guidance never acts: w does not matter
    assert cfg[(3.0, (0.0, None))]["fid"] != pytest.approx(empty[1], rel=1e-6)
    auto = {(r["w"], tuple(r["interval"])): r for r in rows if r["guide"] == weak}
    # Autoguidance at w = 1 is the main model, which is what the never-acting interval draws too.
    assert auto[(1.0, (0.0, None))]["fid"] == pytest.approx(empty[0], rel=1e-6)
    assert res["best"]["overall"]["fid"] == min(r["fid"] for r in rows)
