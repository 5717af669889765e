"""The post-hoc EMA search (`tune ema`) on a real local Ray cluster: a short digits run that kept two
power-function EMA profiles, searched over σ_rel with no retraining; reruns score only missing points;
bad input is refused before any trial."""

from __future__ import annotations

import pytest
import torch

from pipeline import storage
from pipeline.config import TrainConfig
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

NET = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 120-step conditional run whose PowerEMA (σ_rel 0.05, 0.10) is snapshotted every 40 steps."""
    from pipeline.data.shard import shard_dataset
    from pipeline.evaluation.classifier import load_split, save_classifier, train_classifier
    from pipeline.models.phema import PowerEMA
    from pipeline.training import InMemoryBatches, Trainer, export_ema, fit
    from pipeline.training.phema_store import write_snapshots

    root = tmp_path_factory.mktemp("ema")
    data = str(root / "digits")
    shard_dataset("digits", data, shard_size=600, parallel="none")
    (xtr, ytr), (xte, yte) = load_split(data, "train"), load_split(data, "test")
    clf, metrics = train_classifier(xtr, ytr, xte, yte, num_classes=10, epochs=3, width=8, feature_dim=32)
    save_classifier(clf, str(root / "classifier"), name="digits-test", metrics=metrics)
    config = TrainConfig(preset="tiny-digits", model_overrides=NET, lr=2e-3, warmup_steps=10, batch_size=32,
                         steps=120, seed=0, phema_sigma_rels=(0.05, 0.10), phema_every=40)
    trainer = Trainer.from_config(config)  # keeps the PowerEMA profiles itself
    assert isinstance(trainer.phema, PowerEMA)
    out = str(root / "run")

    def on_step(tr, x, labels):  # what the Ray Train worker does at rank 0
        if tr.position.step % config.phema_every == 0:
            write_snapshots(out, tr.phema)

    fit(trainer, InMemoryBatches(xtr, ytr, 32, seed=0), steps=config.steps, report_every=0, on_step=on_step)
    export_ema(storage.join(out, "ema-final.pt"), ema=trainer.ema.state_dict(), config=config.to_dict(),
               step=config.steps)
    return {"root": root, "data": data, "classifier": str(root / "classifier"), "run": out}


def test_reconstruction_from_storage_at_a_stored_profile_returns_it(run):
    from pipeline.training.checkpoint import load_checkpoint
    from pipeline.training.phema_store import list_snapshots, reconstruct_export

    snaps = list_snapshots(run["run"])
    assert [(s.step, s.sigma_rel) for s in snaps] == [(40, 0.05), (40, 0.1), (80, 0.05), (80, 0.1),
                                                      (120, 0.05), (120, 0.1)]
    res = reconstruct_export(run["run"], 0.10, str(run["root"] / "rebuilt.pt"))
    rebuilt = load_checkpoint(res["uri"])["ema"]
    stored = snaps[-1].load()
    for k, v in stored.items():
        torch.testing.assert_close(rebuilt[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_tune_ema_reports_a_best_sigma_rel_and_reruns_only_missing_points(ray_local, run):  # noqa: F811
    from pipeline.tuning.ema import point_uri, sweep_ema

    out = str(run["root"] / "search")
    kw = dict(run=run["run"], data=run["data"], classifier=run["classifier"], out=out, n=40, steps=6)
    first = sweep_ema(**kw, sigma_rels=(0.05, 0.12))
    assert first["complete"] and first["best"]["sigma_rel"] in (0.05, 0.12)
    assert all(r["fid"] > r["floor"] > 0 for r in first["rows"])
    assert storage.exists(first["report"]["plot"]) and storage.exists(first["report"]["markdown"])
    stamp = storage.read_json(storage.join(point_uri(out, 0.05), "score.json"))
    second = sweep_ema(**kw, sigma_rels=(0.05, 0.12, 0.2))
    assert second["complete"] and len(second["rows"]) == 3
    assert storage.read_json(storage.join(point_uri(out, 0.05), "score.json")) == stamp  # not redrawn


@pytest.mark.parametrize("kw, words", [
    (dict(sigma_rels=(0.05, 0.31)), r"sigma_rels\[1\] must be a number in \(0.0, 0.3\)"),
    (dict(sigma_rels=()), "at least one"),
    (dict(n=1), "n must be"),
    (dict(sampler="leapfrog"), "leapfrog"),
])
def test_bad_input_is_refused_before_any_trial(run, kw, words):
    from pipeline.tuning.ema import sweep_ema

    with pytest.raises(ValueError, match=words):
        sweep_ema(run=run["run"], data=run["data"], classifier=run["classifier"],
                  out=str(run["root"] / "bad"), **kw)


def test_too_few_snapshots_name_what_is_missing(run, tmp_path):
    from pipeline.tuning.ema import sweep_ema

    with pytest.raises(ValueError, match=r"0 post-hoc EMA snapshot.*phema_every"):
        sweep_ema(run=str(tmp_path), data=run["data"], classifier=run["classifier"], out=str(tmp_path / "o"))
