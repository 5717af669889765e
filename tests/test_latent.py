"""Latent diffusion (issue 18): the autoencoder, latent shards, the identity control reproducing the pixel
branch exactly, the likelihood bound against closed forms, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.data.loader import make_loader
from pipeline.data.shard import shard_dataset
from pipeline.diffusion.sde import VPSDE
from pipeline.latent.model_io import identity_autoencoder, load_autoencoder
from pipeline.latent.shards import PROGRESS_FILE, encode_dataset
from pipeline.models.autoencoder import Autoencoder, build_autoencoder, build_autoencoder_loss
from pipeline.training.checkpoint import export_ema, load_checkpoint, save_checkpoint
from pipeline.training.loop import Trainer, fit


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("px"))
    shard_dataset("digits", dest, shard_size=400, test_fraction=0.1, seed=0, parallel="threads")
    return dest


def _ae_config(**kw) -> TrainConfig:
    base = dict(
        model="autoencoder",
        preset="vae-digits",
        steps=6,
        batch_size=32,
        lr=1e-3,
        warmup_steps=2,
        loss_kwargs={"kl_weight": 1e-3},
        model_overrides={"channels": 16},
    )
    return TrainConfig(**{**base, **kw})


def _export(trainer: Trainer, uri: str) -> str:
    return export_ema(
        uri,
        ema=trainer.ema.state_dict(),
        config=trainer.config.to_dict(),
        step=trainer.position.step,
        network=trainer.net.config,
    )


def _loader(data: str, batch: int = 32, seed: int = 0):
    return lambda epoch: make_loader(data, "train", batch, seed=seed, epoch=epoch, rank=0, world_size=1)


# ---- the network and its loss -------------------------------------------------------------------------


def test_presets_give_the_documented_latent_shapes():
    assert build_autoencoder("vae-digits").latent_shape == (2, 4, 4)
    assert build_autoencoder("vae-32").latent_shape == (4, 8, 8)
    assert build_autoencoder("vae-32", channel_mult=(1, 2), z_channels=3).latent_shape == (3, 16, 16)
    net = build_autoencoder("vae-digits", channels=16)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    out = net(x, torch.randn(3, 2, 4, 4))
    x_hat, kl = Autoencoder.unpack(out, x.shape)
    assert x_hat.shape == x.shape and kl.shape == (3,)


def test_kl_term_is_the_closed_form_gaussian_kl():
    torch.manual_seed(0)
    net = build_autoencoder("vae-digits", channels=16)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    mean, logvar = net.moments(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    _, kl = Autoencoder.unpack(net(x, torch.zeros_like(mean)), x.shape)
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-5)
    # and the loss is rec + β·KL/D on the same draw
    loss_fn = build_autoencoder_loss(net, kl_weight=0.5, reconstruction="l1")
    g = torch.Generator().manual_seed(1)
    loss, sigma = loss_fn.forward_with_noise(net, x, None, generator=g)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    x_hat = net.decode(mean + torch.exp(0.5 * logvar) * eps)
    torch.testing.assert_close(
        loss, (x_hat - x).abs().flatten(1).mean(1) + 0.5 * want / 64, rtol=1e-5, atol=1e-5
    )
    assert torch.equal(sigma, torch.zeros(4))


def test_identity_autoencoder_is_exact():
    net = build_autoencoder("identity-digits")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(net.decode(net.encode(x)), x) and net.latent_shape == (1, 8, 8)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "gan"}, "kind must be one of"),
        ({"image_size": 6, "channel_mult": (1, 2, 2)}, "not divisible by the downsampling factor 4"),
        ({"z_channels": 0}, "z_channels must be an integer >= 1"),
        ({"latent": 3}, "unknown autoencoder override"),
    ],
)
def test_bad_autoencoder_options(kw, match):
    with pytest.raises(ValueError, match=match):
        build_autoencoder("vae-digits", **kw)


def test_bad_loss_options():
    net = build_autoencoder("vae-digits", channels=16)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        build_autoencoder_loss(net, reconstruction="lpips")
    with pytest.raises(ValueError, match="kl_weight must be"):
        build_autoencoder_loss(net, kl_weight=-1.0)
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="gan")


def test_autoencoder_training_resumes_bit_exact(pixels, tmp_path):
    """The autoencoder runs in the diffusion Trainer: stop at k + resume = an uninterrupted run."""
    n, k = 9, 4
    cfg = _ae_config(steps=n)
    whole = Trainer.from_config(cfg)
    fit(whole, _loader(pixels), steps=n, report_every=0)
    first = Trainer.from_config(cfg)
    fit(first, _loader(pixels), steps=k, report_every=0)
    uri = save_checkpoint(str(tmp_path / "run"), first.state_dict())
    torch.manual_seed(123)
    resumed = Trainer.from_config(cfg)
    resumed.load_state_dict(load_checkpoint(uri))
    fit(resumed, _loader(pixels), steps=n, report_every=0)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert not torch.equal(a["model"]["decoder.0.weight"], Trainer.from_config(cfg).net.decoder[0].weight)


# ---- latent shards -------------------------------------------------------------------------------------


def test_encode_reruns_skip_and_another_autoencoder_is_refused(pixels, tmp_path):
    tr = Trainer.from_config(_ae_config(steps=2))
    fit(tr, _loader(pixels), steps=2, report_every=0)
    ae1 = _export(tr, str(tmp_path / "ae1.pt"))
    rep = encode_dataset(pixels, ae1, str(tmp_path / "lat"))
    info = rep.manifest["latent"]
    assert rep.written and info["shape"] == [2, 4, 4]
    assert info["autoencoder_sha256"] == load_autoencoder(ae1).sha256
    # the loader's s·z has unit std over the train split (Rombach et al. 2022)
    z = torch.cat([x for x, _ in make_loader(str(tmp_path / "lat"), "train", 512, shuffle_buffer=0)])
    assert z.shape[1:] == (2, 4, 4) and abs(float(z.double().std()) - 1.0) < 1e-3
    again = encode_dataset(pixels, ae1, str(tmp_path / "lat"))
    assert again.skipped and not again.written
    # a lost manifest: the shards whose bytes match the progress record are kept
    storage.remove(str(tmp_path / "lat" / "manifest.json"))
    storage.remove(str(tmp_path / "lat" / "train-000001.tar"))
    partial = encode_dataset(pixels, ae1, str(tmp_path / "lat"))
    assert partial.written == ["train-000001.tar"] and len(partial.kept) == len(rep.written) - 1
    assert partial.manifest["latent"] == info
    # latents of another autoencoder: refused, unless overwritten
    ae2 = identity_autoencoder((1, 8, 8), str(tmp_path / "id.pt"))
    with pytest.raises(ValueError, match="already holds latents of autoencoder sha256"):
        encode_dataset(pixels, ae2, str(tmp_path / "lat"))
    rep2 = encode_dataset(pixels, ae2, str(tmp_path / "lat"), overwrite=True)
    assert rep2.manifest["latent"]["autoencoder_sha256"] == load_autoencoder(ae2).sha256
    assert (
        storage.read_json(str(tmp_path / "lat" / PROGRESS_FILE))["autoencoder_sha256"]
        == load_autoencoder(ae2).sha256
    )


def test_checkpoint_not_matching_its_config_writes_nothing(pixels, tmp_path):
    net = build_autoencoder("vae-digits", channels=16)
    cfg = _ae_config(model_overrides={"channels": 32})  # the config names another network
    bad = export_ema(str(tmp_path / "bad.pt"), ema=net.state_dict(), config=cfg.to_dict(), step=0)
    with pytest.raises(ValueError, match="does not match preset 'vae-digits'"):
        encode_dataset(pixels, bad, str(tmp_path / "lat"))
    assert not storage.exists(str(tmp_path / "lat"))
    unet = export_ema(str(tmp_path / "unet.pt"), ema={}, config=TrainConfig().to_dict(), step=0)
    with pytest.raises(ValueError, match="not an autoencoder"):
        load_autoencoder(unet)


# ---- the likelihood bound -----------------------------------------------------------------------------


def test_decoder_nll_is_the_discretised_gaussian_mass():
    from pipeline.latent.evaluate import decoder_nll

    levels, std = 17, 0.3
    x = torch.tensor([[-1.0, -0.5, 0.0, 1.0]])
    mu = torch.tensor([[-0.8, -0.4, 0.1, 0.7]])
    d = 1.0 / 16
    N = torch.distributions.Normal(mu, std)
    up, lo = N.cdf(x + d)[0], N.cdf(x - d)[0]
    mass = torch.stack([up[0], up[1] - lo[1], up[2] - lo[2], 1 - lo[3]])  # edge bins open to ±∞
    torch.testing.assert_close(decoder_nll(x, mu, std, levels), -mass.log().sum()[None])


def test_latent_bound_assembles_the_elbo_with_an_exact_prior():
    """With the exact score of N(0, I) (a VP marginal stays N(0, I)), the ODE's log p_s is closed-form,
    so the bound must equal rec − H − log N(s·z) − d_z·log s computed by hand."""
    from pipeline.latent.evaluate import decoder_nll, latent_bound
    from pipeline.latent.model_io import LoadedAutoencoder

    torch.manual_seed(0)
    net = build_autoencoder("vae-digits", channels=16).eval().requires_grad_(False)
    ae = LoadedAutoencoder(net=net, config=_ae_config(), uri="mem", sha256="0", step=0)
    x = torch.randint(0, 17, (3, 1, 8, 8)).float() / 8 - 1
    s = 0.7
    res = latent_bound(
        lambda z, t: -z,
        VPSDE(0.1, 20.0),
        ae,
        x,
        scale=s,
        levels=17,
        decoder_std=0.2,
        generator=torch.Generator().manual_seed(5),
        trace="exact",
        rtol=1e-7,
        atol=1e-7,
    )
    mean, logvar = net.moments(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    z = mean + torch.exp(0.5 * logvar) * eps
    H = 0.5 * (math.log(2 * math.pi * math.e) + logvar).flatten(1).sum(1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(s * z).flatten(1).sum(1) + 32 * math.log(s)
    want = (decoder_nll(x, net.decode(z), 0.2, 17) - H - log_prior) / (64 * math.log(2))
    torch.testing.assert_close(res["bpd"], want, rtol=1e-4, atol=1e-4)


# ---- the identity control --------------------------------------------------------------------------------


def test_identity_latent_branch_reproduces_the_pixel_branch(pixels, tmp_path):
    """Identity autoencoder (latent = pixels, s = 1): same batches, weights, samples, bits/dim."""
    from pipeline.evaluation.bpd import evaluate_bpd
    from pipeline.latent.stages import decoded_sample_stage, latent_config, latent_likelihood_stage
    from pipeline.stages import sample_stage
    from pipeline.training.checkpoint import load_model

    ae = identity_autoencoder((1, 8, 8), str(tmp_path / "identity.pt"))
    lat = str(tmp_path / "lat")
    assert encode_dataset(pixels, ae, lat).manifest["latent"]["scale_factor"] == 1.0
    cfg = TrainConfig(
        preset="tiny-digits", steps=4, batch_size=32, model_overrides={"channels": 16}, warmup_steps=2
    )
    px = Trainer.from_config(cfg)  # from_config seeds the global RNG (dropout draws from it): one at a time
    fit(px, _loader(pixels), steps=4, report_every=0)
    la = Trainer.from_config(latent_config(cfg, lat))
    fit(la, _loader(lat), steps=4, report_every=0)
    sa, sb = px.state_dict()["model"], la.state_dict()["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ck_px, ck_la = _export(px, str(tmp_path / "px.pt")), _export(la, str(tmp_path / "la.pt"))
    s_px = sample_stage(ck_px, str(tmp_path / "s-px"), n=12, method="ddim", steps=4, seed=7, levels=17)
    s_la = decoded_sample_stage(ck_la, ae, lat, str(tmp_path / "s-la"), n=12, method="ddim", steps=4, seed=7)
    a = torch.cat([x for x, _ in make_loader(s_px["samples"], "samples", 12, shuffle_buffer=0)])
    b = torch.cat([x for x, _ in make_loader(s_la["samples"], "samples", 12, shuffle_buffer=0)])
    assert torch.equal(a, b) and "data:image/png;base64" in s_la["markdown"]
    model = load_model(ck_px)
    want = evaluate_bpd(
        model.score_fn(None), model.sde, pixels, max_samples=16, batch_size=16, progress=False
    )
    got = latent_likelihood_stage(ck_la, ae, lat, str(tmp_path / "eval"), max_samples=16, batch_size=16)
    assert got["bpd_bound"] == want["bpd"] and "bound" in got["markdown"]


# ---- bad input --------------------------------------------------------------------------------------------


def test_latents_of_another_autoencoder_and_shapes_the_unet_cannot_take(pixels, tmp_path):
    from pipeline.latent.stages import decoded_sample_stage, latent_config

    ae = identity_autoencoder((1, 8, 8), str(tmp_path / "identity.pt"))
    tr = Trainer.from_config(_ae_config(steps=1))
    other = _export(tr, str(tmp_path / "other.pt"))
    lat = str(tmp_path / "lat")
    encode_dataset(pixels, ae, lat)
    with pytest.raises(ValueError, match=r"encoded by autoencoder sha256 .* but the checkpoint given"):
        decoded_sample_stage(str(tmp_path / "unused.pt"), other, lat, str(tmp_path / "s"), n=2)
    assert not storage.exists(str(tmp_path / "s"))
    lat2 = str(tmp_path / "lat2")
    encode_dataset(pixels, other, lat2)  # 2×4×4 latents
    with pytest.raises(
        ValueError, match=r"latent shape 2×4×4 .* U-Net preset 'ddpm-cifar10' \(made for 3×32×32"
    ):
        latent_config(TrainConfig(preset="ddpm-cifar10"), lat2)
    # a prior trained on pixels (1×8×8) cannot sample these latents (2×4×4)
    px = Trainer.from_config(TrainConfig(preset="tiny-digits", steps=1, model_overrides={"channels": 16}))
    ck = _export(px, str(tmp_path / "px.pt"))
    with pytest.raises(ValueError, match=r"takes 1×8×8 .* latents are 2×4×4"):
        decoded_sample_stage(ck, other, lat2, str(tmp_path / "s2"), n=2)


def test_float16_latents_keep_the_pixel_grid_exactly():
    v = np.arange(17, dtype=np.float32) / 8 - 1  # digits' 17 levels in [-1, 1]
    assert np.array_equal(v.astype(np.float16).astype(np.float32), v)


def test_latent_command_checks_its_presets_before_any_work():
    import argparse

    from flows.latent_cli import add_parser, flow_params

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(ValueError, match="autoencoder preset must be one of"):
        flow_params(parser.parse_args(["latent", "--autoencoder-preset", "vae-64"]))
    with pytest.raises(ValueError, match="preset must be one of"):
        flow_params(parser.parse_args(["latent", "--preset", "unet-xl"]))
    params = flow_params(parser.parse_args(["latent", "--train-steps", "7"]))
    assert params["train"]["steps"] == 7 and params["autoencoder_preset"] == "vae-digits"


def test_pixel_fid_is_read_from_the_pixel_branch_of_the_same_root(tmp_path):
    from pipeline.latent.stages import pixel_fid

    root = str(tmp_path / "run")
    assert pixel_fid(root) is None
    storage.write_json(storage.join(root, "eval", "eval-domain-classifier.json"), {"fid": 3.5})
    assert pixel_fid(root) == 3.5
