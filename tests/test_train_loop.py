"""The plain-torch loop: the loss falls on the digits, the NaN/inf guard skips and counts a step, and a
run stopped at step k and resumed from its checkpoint ends bit-identical to an uninterrupted one."""

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.loop import InMemoryBatches, Trainer, fit


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 1,797 8×8 digits (values 0..16) as x = 2v/16 − 1 in [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) * (2 / 16) - 1
    return x, torch.as_tensor(d.target, dtype=torch.long)


def _config(**kw) -> TrainConfig:
    # tiny-digits at half width and one block per level: ~0.18M parameters, a few ms a step
    base = dict(preset="tiny-digits", model_overrides={"channels": 16, "num_res_blocks": 1}, loss="edm",
                loss_kwargs={"sigma_data": 0.5}, lr=2e-3, warmup_steps=10,
                batch_size=32, steps=100, ema_halflife_kimg=1.0, seed=0)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_on_digits(digits):
    x, labels = digits
    config = _config(batch_size=32, steps=120, lr=4e-3)
    trainer = Trainer.from_config(config)
    history = []
    fit(trainer, InMemoryBatches(x, labels, config.batch_size, seed=0), steps=config.steps, report_every=20,
        on_report=history.append)
    assert [h["step"] for h in history] == [20, 40, 60, 80, 100, 120]
    first, last = history[0]["loss"], (history[-1]["loss"] + history[-2]["loss"]) / 2
    assert last < 0.7 * first, [h["loss"] for h in history]
    assert all(h["skipped_steps"] == 0 and h["grad_norm"] > 0 for h in history)
    assert history[-1]["lr"] == pytest.approx(config.lr)
    # every σ bucket that saw samples has a finite mean loss
    buckets = [v for k, v in history[-1].items() if k.startswith("loss_sigma_") and v is not None]
    assert buckets and all(torch.isfinite(torch.tensor(buckets)))


def _snapshot(trainer: Trainer) -> dict:
    return {"model": {k: v.clone() for k, v in trainer.net.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.module.state_dict().items()},
            "adam_steps": [s["step"].clone() for s in trainer.optimizer.state.values()]}


def _same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
            and all(torch.equal(p, q) for p, q in zip(a["adam_steps"], b["adam_steps"], strict=True)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_is_skipped_and_counted(digits, bad):
    x, labels = digits
    trainer = Trainer.from_config(_config())
    for i in range(3):
        trainer.train_step(x[i * 32:(i + 1) * 32], labels[i * 32:(i + 1) * 32])
    before = _snapshot(trainer)
    poisoned = x[96:128].clone()
    poisoned[5, 0, 3, 3] = bad
    trainer.train_step(poisoned, labels[96:128])
    assert trainer.position.step == 4 and trainer.state_dict()["position"]["skipped_steps"] == 1
    assert _same(before, _snapshot(trainer))  # weights, EMA and optimiser untouched
    trainer.train_step(x[128:160], labels[128:160])
    assert not _same(before, _snapshot(trainer))  # training goes on after the skip
    metrics = trainer.pop_metrics()
    assert metrics["skipped_steps"] == 1 and metrics["step"] == 5
    assert torch.isfinite(torch.tensor(metrics["loss"]))  # the skipped step is not averaged in


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


def _full_state(trainer: Trainer) -> dict:
    s = trainer.state_dict()
    return {"model": s["model"], "ema": s["ema"]["module"], "opt": s["optimizer"]["state"],
            "position": s["position"]}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["position"] == b["position"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for i in a["opt"]:
        for k in a["opt"][i]:
            assert torch.equal(a["opt"][i][k], b["opt"][i][k]), (i, k)


def test_resume_is_bit_exact(digits, deterministic, tmp_path):
    x, labels = digits
    x, labels = x[:160], labels[:160]  # 5 batches per epoch: the stop lands mid-epoch
    n, k = 14, 8
    # dropout (global RNG), label dropout and noise (the trainer's generator) all draw random numbers
    config = _config(steps=n, model_overrides={"channels": 16, "num_res_blocks": 1, "dropout": 0.1},
                     label_dropout=0.2)
    data = InMemoryBatches(x, labels, config.batch_size, seed=3, flip=True)

    whole = Trainer.from_config(config)
    fit(whole, data, steps=n, report_every=0)

    first = Trainer.from_config(config)
    fit(first, data, steps=k, report_every=0)
    uri = save_checkpoint(str(tmp_path / "run"), first.state_dict())
    assert (first.position.epoch, first.position.batch) == (1, 3)
    del first
    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    resumed = Trainer.from_config(config)
    resumed.load_state_dict(load_checkpoint(uri))
    fit(resumed, data, steps=n, report_every=0)
    _assert_identical(_full_state(whole), _full_state(resumed))

    # The comparison is sharp: resuming without the noise generator's state gives other weights.
    other = Trainer.from_config(config)
    state = load_checkpoint(uri)
    state["rng"]["generator"] = torch.Generator().manual_seed(99).get_state()
    other.load_state_dict(state)
    fit(other, data, steps=n, report_every=0)
    with pytest.raises(AssertionError):
        _assert_identical(_full_state(whole), _full_state(other))


def test_learned_weighting_and_post_hoc_ema_profiles_train_and_resume_exactly():
    """EDM2's learned uncertainty u(σ) is optimised with the network and checkpointed; the post-hoc EMA
    profiles are updated every step and checkpointed: a resumed run ends bit-identical."""
    config = _config().replace(loss="edm", loss_kwargs={"sigma_data": 0.5, "learned_uncertainty": True},
                               phema_sigma_rels=(0.05, 0.10), phema_every=2, steps=6)
    x = torch.randn(64, 1, 8, 8).clamp(-1, 1)
    labels = torch.arange(64) % 10
    whole = Trainer.from_config(config)
    u0 = [p.clone() for p in whole.loss_fn.parameters()]
    fit(whole, InMemoryBatches(x, labels, 8, seed=3), steps=6, report_every=0)
    assert any(not torch.equal(a, b) for a, b in zip(u0, whole.loss_fn.parameters(), strict=True))
    assert whole.phema.step == 6
    first = Trainer.from_config(config)
    fit(first, InMemoryBatches(x, labels, 8, seed=3), steps=3, report_every=0)
    state = first.state_dict()
    assert {"loss", "phema"} <= set(state)
    resumed = Trainer.from_config(config)
    resumed.load_state_dict(state)
    fit(resumed, InMemoryBatches(x, labels, 8, seed=3), steps=6, report_every=0)
    for a, b in zip(whole.loss_fn.state_dict().values(), resumed.loss_fn.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(whole.phema.profiles, resumed.phema.profiles, strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    with pytest.raises(ValueError, match="phema_sigma_rels"):
        _config().replace(phema_sigma_rels=(0.05, 0.4))
