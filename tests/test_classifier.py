"""The domain classifier on the digits, its features, and a trained demo model's FID in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.diffusion.dequantize import snap_to_levels
from pipeline.evaluation.classifier import (
    accuracy,
    load_classifier,
    load_split,
    save_classifier,
    train_classifier,
)
from pipeline.evaluation.features import ClassifierFeatures
from pipeline.evaluation.fid import feature_stats, frechet_distance, reference_stats

LEVELS = 17


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    from pipeline.data.shard import shard_dataset

    dest = str(tmp_path_factory.mktemp("digits"))
    shard_dataset("digits", dest, shard_size=500, test_fraction=0.2, seed=0, parallel="none")
    return dest


@pytest.fixture(scope="module")
def classifier(digits_shards, tmp_path_factory):
    x_tr, y_tr = load_split(digits_shards, "train")
    x_te, y_te = load_split(digits_shards, "test")
    model, metrics = train_classifier(x_tr, y_tr, x_te, y_te, num_classes=10, seed=0)
    uri = str(tmp_path_factory.mktemp("clf"))
    meta = save_classifier(model, uri, name="digits", metrics=metrics, source={"data": digits_shards})
    return uri, model, meta, (x_te, y_te)


def test_classifier_reaches_95_percent_on_held_out_digits(classifier):
    uri, model, meta, (x_te, y_te) = classifier
    assert len(x_te) == 359  # 20 % of 1,797, never seen in training
    assert meta["test_accuracy"] >= 0.95
    loaded, meta2 = load_classifier(uri)
    # The recorded accuracy is the loaded model's accuracy, recomputed here on the test split.
    assert accuracy(loaded, x_te, y_te) == pytest.approx(meta2["test_accuracy"], abs=1e-12)
    assert meta2["weights_sha256"] == storage.sha256(storage.join(uri, "classifier.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_te[:8]), model(x_te[:8]), rtol=0, atol=0)


def test_corrupt_classifier_is_rejected(classifier, tmp_path):
    _, model, meta, _ = classifier
    copy = str(tmp_path / "copy")
    save_classifier(model, copy, name="digits", metrics={"test_accuracy": meta["test_accuracy"]})
    data = bytearray(storage.read_bytes(storage.join(copy, "classifier.pt")))
    data[-10] ^= 0xFF
    storage.write_bytes(storage.join(copy, "classifier.pt"), bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(copy)
    with pytest.raises(ValueError, match=r"classifier\.json"):
        load_classifier(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="test_accuracy"):
        save_classifier(model, copy, name="digits", metrics={})


def test_domain_features_are_the_penultimate_layer(classifier):
    uri, model, meta, (x_te, _) = classifier
    ext = ClassifierFeatures(uri)
    f = ext.extract(x_te[:20], levels=LEVELS)
    assert f.shape == (20, 64) and ext.dim == 64
    assert ext.weights_sha256 == meta["weights_sha256"] and ext.id == "domain-classifier/digits/penultimate"
    # Data on the 17-level grid pass unchanged through the extractor's quantisation.
    assert torch.equal(snap_to_levels(x_te, LEVELS), x_te)
    with torch.no_grad():
        np.testing.assert_allclose(f, model.features(x_te[:20]).double().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_trained_demo_model_fid_between_floor_and_noise(classifier, digits_shards, tmp_path):
    from pipeline.demo import demo_config, load_digits_tensor
    from pipeline.evaluation.generate import SamplingPlan
    from pipeline.evaluation.report import evaluate_samples
    from pipeline.evaluation.sampling import run_sampling
    from pipeline.training.checkpoint import export_ema
    from pipeline.training.loop import InMemoryBatches, Trainer, fit

    uri, _, meta, _ = classifier
    # The demo's recipe, briefly: 200 steps of batch 32 (CPU-cheap; the samples are rough digits).
    x, labels = load_digits_tensor()
    config = demo_config(200, 0).replace(batch_size=32, warmup_steps=50)
    trainer = Trainer.from_config(config)
    final = fit(trainer, InMemoryBatches(x, labels, 32, seed=0), steps=200, report_every=100)
    ckpt = export_ema(
        str(tmp_path / "ema.pt"), ema=trainer.ema.state_dict(), config=config.to_dict(), step=200
    )
    samples = str(tmp_path / "samples")
    n = 400
    run_sampling(ckpt, samples, SamplingPlan(n=n, method="heun", steps=12, base_seed=0, batch_size=200,
                                             levels=LEVELS))
    ext = ClassifierFeatures(uri)
    res = evaluate_samples(samples, digits_shards, ext, kid_subsets=10, kid_subset_size=200)

    # Noise on the data's grid: uniform over the 17 grey levels, per pixel.
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, LEVELS, (n, 1, 8, 8), generator=g).float() * 2 / (LEVELS - 1) - 1
    ref = reference_stats(digits_shards, ext)  # the statistics evaluate_samples cached
    s = feature_stats(ext.extract(noise, levels=LEVELS))
    fid_noise = frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
    floor = res["floor"]["fid"]
    assert floor < res["fid"] < fid_noise, (floor, res["fid"], fid_noise, final["loss"])

    # Everything needed to say how the number was made.
    assert res["n"] == n and res["extractor"]["id"] == ext.id
    assert res["extractor"]["weights_sha256"] == meta["weights_sha256"]
    assert res["reference"]["sha256"] == ref.sha256() and res["reference"]["n"] == ref.n
    assert res["sampler"] == "heun" and res["nfe"]["mean"] == 23 and res["guidance_w"] == 0.0
    assert res["seeds"]["first"] == 0 and res["seeds"]["last"] == n - 1
    assert res["checkpoint"]["sha256"] == storage.sha256(ckpt)
    assert res["kid"] is None and "KID omitted" in res["kid_note"]  # domain features: no KID
    report = storage.read_bytes(res["report_uris"][1]).decode()
    assert f"{res['fid']:.4f}" in report and "grid.png" in report and "data:image/png;base64," in report
    assert storage.read_json(res["report_uris"][0])["fid"] == res["fid"]


def test_cli_sample_then_fid_with_domain_features(classifier, digits_shards, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config import TrainConfig
    from pipeline.models import build_unet
    from pipeline.training.checkpoint import export_ema

    clf_uri, _, meta, _ = classifier
    config = TrainConfig(preset="tiny-digits", loss="edm", loss_kwargs={"sigma_data": 0.5})
    torch.manual_seed(0)
    ckpt = export_ema(
        str(tmp_path / "ema.pt"), ema=build_unet("tiny-digits").state_dict(), config=config.to_dict(), step=0
    )
    out = str(tmp_path / "samples")
    assert (
        main(
            [
                "sample",
                ckpt,
                out,
                "--n",
                "24",
                "--steps",
                "3",
                "--seed",
                "5",
                "--data",
                digits_shards,
                "--sampler",
                "ddim",
                "--option",
                "eta=1.0",
                "--batch-size",
                "10",
            ]
        )
        == 0
    )
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["levels"] == LEVELS and manifest["sampling"]["plan"]["options"] == {"eta": 1.0}
    assert (
        main(
            [
                "fid",
                out,
                "--data",
                digits_shards,
                "--extractor",
                "domain",
                "--weights",
                clf_uri,
                "--kid-subsets",
                "5",
                "--kid-subset-size",
                "10",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    res = storage.read_json(storage.join(out, "eval-domain-classifier.json"))
    assert f"{res['fid']:.4f}" in printed
    assert res["n"] == 24 and res["seeds"]["first"] == 5 and res["sampler"] == "ddim"
    assert res["extractor"]["weights_sha256"] == meta["weights_sha256"]
    assert res["reference"]["sha256"] == reference_stats(digits_shards, ClassifierFeatures(clf_uri)).sha256()


def test_cli_trains_and_saves_classifier(tmp_path):
    from pipeline.cli import main

    out = str(tmp_path / "clf")
    assert main(["classifier", "digits", out, "--epochs", "1"]) == 0
    meta = storage.read_json(storage.join(out, "classifier.json"))
    assert 0 < meta["test_accuracy"] <= 1 and meta["n_test"] == 360 and meta["epochs"] == 1
