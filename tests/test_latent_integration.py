"""The latent branch with the real components: the digits VAE reconstructs well enough for the domain
classifier, its Ray Train run survives a killed worker with the same weights, and the Prefect flow runs
end to end, reporting the decoded samples' FID."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from ray import cloudpickle

from pipeline import storage
from pipeline.config import RunOptions
from pipeline.data.shard import shard_dataset
from pipeline.latent.layout import autoencoder_recipe

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the kill hook travels to the workers
pytest_plugins = ("tests.fixtures_s3",)


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("px"))
    shard_dataset("digits", dest, shard_size=400, test_fraction=0.1, seed=0, parallel="threads")
    return dest


@pytest.mark.slow
def test_digits_vae_reconstructions_keep_their_class(pixels):
    """Domain-classifier accuracy on reconstructions of the test digits ≥ 0.95 (~0.98 on the originals)."""
    from pipeline.data.loader import make_loader
    from pipeline.evaluation.classifier import accuracy, load_split, train_classifier
    from pipeline.training.loop import Trainer, fit

    x_tr, y_tr = load_split(pixels, "train")
    x_te, y_te = load_split(pixels, "test")
    clf, metrics = train_classifier(x_tr, y_tr, x_te, y_te, num_classes=10, epochs=20, seed=0)
    assert metrics["test_accuracy"] >= 0.95
    trainer = Trainer.from_config(autoencoder_recipe("vae-digits", steps=500, batch_size=64))
    fit(trainer, lambda e: make_loader(pixels, "train", 64, epoch=e, rank=0, world_size=1), steps=500,
        report_every=0)
    ae = trainer.net.eval()
    with torch.no_grad():
        rec = ae.decode(ae.encode(x_te)).clamp(-1, 1)
        blank = torch.zeros_like(x_te)
    assert accuracy(clf, rec, y_te) >= 0.95
    assert accuracy(clf, blank, y_te) < 0.5  # the bar is sharp: a useless reconstruction fails it


class KillOnce:
    """Kills the worker process at `step`, once (a marker file remembers)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def __call__(self, trainer, x, labels) -> None:
        if trainer.position.step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_autoencoder_on_ray_train_resumes_after_a_kill_with_the_same_weights(pixels, tmp_path, ray_local):
    from pipeline.training.checkpoint import load_checkpoint
    from pipeline.training.ray_train import train

    cfg = autoencoder_recipe("vae-digits", steps=12, batch_size=32).replace(model_overrides={"channels": 16})
    opts = RunOptions(checkpoint_every=4, report_every=4, max_failures=2, progress=False)
    whole = train(cfg, data=pixels, out=str(tmp_path / "whole"), options=opts)
    marker = str(tmp_path / "killed")
    killed = train(cfg, data=pixels, out=str(tmp_path / "killed-run"), options=opts,
                   on_step=KillOnce(6, marker))
    assert os.path.exists(marker) and whole.step == killed.step == 12
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(killed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])


@pytest.mark.slow
@pytest.mark.integration
def test_latent_flow_end_to_end(tmp_path, ray_local):
    from prefect.testing.utilities import prefect_test_harness

    from flows.latent import latent_pipeline

    root = str(tmp_path / "run")
    with prefect_test_harness(server_startup_timeout=120):
        state = latent_pipeline(root=root, autoencoder_steps=40, train={"steps": 40, "batch_size": 64},
                                evaluate={"n_samples": 40, "sample_steps": 6, "likelihood_samples": 8},
                                pixel_fid=1.0, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    for rel in ("autoencoder/ema-final.pt", "autoencoder/reconstructions.png", "latents/manifest.json",
                "latent-train/ema-final.pt", "latent-samples/grid.png", "latent-eval/latent-likelihood.json"):
        assert storage.exists(storage.join(root, rel)), rel
    assert s["latents"]["latent_shape"] == [2, 4, 4] and s["samples"]["n"] == 40
    assert s["fid"]["fid"] > 0 and s["likelihood_bound"]["bpd_bound"] > 0
