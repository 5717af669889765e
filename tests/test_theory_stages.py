"""The theory stages on a checkpoint: PF-ODE interpolation grid and inverse problems, their pictures
embedded for the UI, their numbers, and their bad input."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.models import build_unet
from pipeline.training.checkpoint import export_ema

NET = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.data.shard import shard_dataset
    from pipeline.data.sources import digits_source

    root = tmp_path_factory.mktemp("theory")
    data = str(root / "data")
    shard_dataset(digits_source().subset(list(range(120))), data, shard_size=60, test_fraction=0.5,
                  parallel="none")
    cfg = TrainConfig(preset="tiny-digits", model_overrides=NET, loss="edm", loss_kwargs={"sigma_data": 0.5})
    torch.manual_seed(0)
    net = build_unet(cfg.preset, **cfg.model_overrides)
    ckpt = export_ema(str(root / "ema.pt"), ema=net.state_dict(), config=cfg.to_dict(), step=0)
    return root, data, ckpt


def _embedded(markdown: str) -> Image.Image:
    (b64,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_interpolation_grid_and_round_trip(setup):
    from pipeline.stages import interpolation_stage

    root, data, ckpt = setup
    res = interpolation_stage(ckpt, data, str(root / "interp"), pairs=2, n=5)
    grid = Image.open(io.BytesIO(storage.read_bytes(res["grid"])))
    assert _embedded(res["markdown"]).size == grid.size
    # 5 columns × 2 rows of 8×8 digits upscaled 8× with 1-pixel padding.
    assert grid.size == (5 * 65 + 1, 2 * 65 + 1)
    assert res["nfe"]["encode"] > 0 and res["round_trip_max_abs"]["max"] < 0.05


def test_inverse_problem_is_scored_and_its_picture_embedded(setup):
    from pipeline.stages import inverse_stage

    root, data, ckpt = setup
    seen = []
    res = inverse_stage(ckpt, data, str(root / "inverse"), n=6, steps=25, on_progress=seen.append)
    assert 0 < res["ssim"] <= 1 and res["psnr"] > 0 and res["nfe"] == 50
    assert seen == [{"step": i, "total": 25} for i in range(1, 26)]  # progress after every PC step
    assert _embedded(res["markdown"]).size == Image.open(io.BytesIO(storage.read_bytes(res["grid"]))).size
    assert storage.exists(str(root / "inverse" / "inverse.json"))


def test_several_completions_per_image_are_scored_with_a_classifier(setup):
    """k completions of each image: every one is scored against its image's truth and label, the grid
    shows one per image, and the classifier's posterior class is computed over each image's k."""
    from pipeline.evaluation.classifier import load_split, save_classifier, train_classifier
    from pipeline.stages import inverse_stage

    root, data, ckpt = setup
    (xtr, ytr), (xte, yte) = load_split(data, "train"), load_split(data, "test")
    clf, metrics = train_classifier(xtr, ytr, xte, yte, num_classes=10, epochs=2, width=8, feature_dim=32)
    save_classifier(clf, str(root / "clf"), name="digits-test", metrics=metrics)
    seen = []
    res = inverse_stage(ckpt, data, str(root / "inverse-k"), classifier=str(root / "clf"), n=4, per_image=3,
                        steps=5, method="pigdm", sigma_y=0.05, on_progress=seen.append)
    assert [p["step"] for p in seen] == [1, 2, 3, 4, 5]
    # 5 Euler–Maruyama steps and the final denoising step, one batch for all 4 × 3 completions.
    assert res["task"]["per_image"] == 3 and res["nfe"] == 6
    assert 0 <= res["class_accuracy"] <= 1 and 0 <= res["class_accuracy_posterior"] <= 1
    assert "completions per image | 3" in res["markdown"] and "p(c \\| y)" in res["markdown"]
    # Every table row has exactly two cells: the "|" in p(c | y) is escaped, not a cell boundary.
    rows = [line for line in res["markdown"].splitlines() if line.startswith("| ")]
    assert all(len(re.split(r"(?<!\\)\|", r.strip("|"))) == 2 for r in rows), rows
    assert any(re.fullmatch(r"\| class accuracy of p\(c \\\| y\) from the completions \| [0-9.]+ \|", r)
               for r in rows), rows
    assert "| task / method | inpaint-right / pigdm |" in res["markdown"]
    assert "| measurement noise σ_y / ΠGDM's v | 0.05 / 0.25 |" in res["markdown"]
    grid = Image.open(io.BytesIO(storage.read_bytes(res["grid"])))
    assert grid.size == (4 * 65 + 1, 3 * 65 + 1)  # 4 images: truth, measurement, first completion


@pytest.mark.parametrize("prior, shown", [("auto", "class mixture (1/C) Σ_c p(x \\| c)"),
                                          ("null", "unconditional (null label)")])
def test_smc_solves_with_particles_and_says_which_prior(setup, prior, shown):
    from pipeline.stages import inverse_stage

    root, data, ckpt = setup
    seen = []
    res = inverse_stage(ckpt, data, str(root / f"inverse-smc-{prior}"), n=3, steps=4, method="smc",
                        particles=3, sigma_y=0.05, prior=prior, on_progress=seen.append)
    assert [p["step"] for p in seen] == [1, 2, 3, 4]
    # The stored task is the resolved one: the method's v and the prior actually used.
    assert res["task"]["prior"] == ("classes" if prior == "auto" else "null")
    assert res["task"]["data_var"] == 1.0 and res["nfe"] == 5
    assert f"| prior p(x) | {shown} |" in res["markdown"]
    assert "| particles per completion | 3 |" in res["markdown"]
    assert "| measurement noise σ_y / ΠGDM's v | 0.05 / 1.0 |" in res["markdown"]
    assert "| NFE | 5 per particle |" in res["markdown"]
    assert -1 <= res["ssim"] <= 1  # an untrained network: only that it was scored


def test_completions_can_be_solved_in_batches(setup):
    """batch bounds the completions per sampler call (memory on large images); progress counts every call's
    steps, and one call holding everything is today's single batch exactly."""
    from pipeline.stages import inverse_stage

    root, data, ckpt = setup
    kw = dict(n=3, steps=4, method="smc", particles=2, sigma_y=0.05)
    seen = []
    split = inverse_stage(ckpt, data, str(root / "inv-b2"), batch=2, on_progress=seen.append, **kw)
    assert seen == [{"step": i, "total": 8} for i in range(1, 9)]  # 2 calls × 4 steps
    whole = inverse_stage(ckpt, data, str(root / "inv-b3"), batch=3, **kw)
    assert whole["psnr"] == inverse_stage(ckpt, data, str(root / "inv-all"), **kw)["psnr"]
    assert split["psnr"] != whole["psnr"]  # the second call is seeded on: other draws, not a repeat


def test_the_class_mixture_prior_needs_classes():
    from pipeline.evaluation.inverse_problems import InverseTask

    assert InverseTask(method="smc").resolved(10).prior == "classes"
    assert InverseTask(method="smc").resolved(None).prior == "null"
    assert InverseTask(method="pigdm").resolved(10).prior == "null"
    assert InverseTask(method="pigdm").resolved(10).data_var == 0.25
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        InverseTask(method="smc", prior="classes").resolved(None)


def test_posterior_class_averages_probabilities_not_votes():
    from pipeline.evaluation.inverse_problems import posterior_class

    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.0, 1.0],   # 2 of 3 votes say 0; the mean says 1
                          [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])  # the mean says 0
    assert posterior_class(probs, 3).tolist() == [1, 0]
    assert posterior_class(probs, 1).tolist() == [0, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="groups of 4"):
        posterior_class(probs, 4)


@pytest.mark.parametrize("kw, words", [
    (dict(task="colorize"), "3-channel"),
    (dict(task="superres", factor=3), "factor"),
    (dict(task="smudge"), "task must be one of"),
    (dict(method="dps"), "method must be one of"),
    (dict(per_image=0), "per_image"),
    (dict(method="pigdm", data_var=0.0), "data_var must be > 0"),
    (dict(method="smc", particles=0), "particles"),
    (dict(batch=0), "batch"),
    (dict(method="pigdm", prior="classes"), "prior 'classes' needs method 'smc'"),
    (dict(method="smc", prior="mixture"), "prior must be one of"),
])
def test_inverse_bad_input(setup, kw, words):
    from pipeline.evaluation.inverse_problems import InverseTask, run_inverse

    root, data, ckpt = setup
    with pytest.raises(ValueError, match=words):
        run_inverse(ckpt, data, str(root / "bad"), InverseTask(n=4, steps=2, **kw))
    assert not storage.exists(str(root / "bad" / "inverse.json"))


def test_likelihood_of_a_chain_model_reports_the_ddpm_bound(setup):
    """A network on an exact discrete chain gets DDPM's own variational bound beside the PF-ODE's and the
    continuous ELBO's bits/dim (the DDPM paper's NLL is that bound)."""
    from pipeline.stages import likelihood_stage

    root, data, _ = setup
    cfg = TrainConfig(preset="tiny-digits", model_overrides=NET, sde="ddpm-chain",
                      sde_kwargs={"schedule": "linear", "N": 100}, loss="dsm",
                      loss_kwargs={"parameterization": "eps", "noise_label_kind": "time"})
    torch.manual_seed(1)
    ckpt = export_ema(str(root / "chain.pt"), ema=build_unet(cfg.preset, **cfg.model_overrides).state_dict(),
                      config=cfg.to_dict(), step=0)
    res = likelihood_stage(ckpt, data, str(root / "lk"), max_samples=4, batch_size=4, elbo_samples=2,
                           rtol=1e-3, atol=1e-3)
    full = storage.read_json(res["report"])
    assert full["ddpm_elbo"]["metric"] == "elbo-ddpm" and full["ddpm_elbo"]["n"] == 4
    assert "DDPM variational bound" in res["markdown"] and "3.0000 bits/dim" in res["markdown"]
