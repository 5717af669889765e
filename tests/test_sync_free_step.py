"""The sync-free non-finite skip in `Trainer.train_step` leaves weights, EMA and optimiser state
bit-identical to the host-decided skip it replaced (kept here as the reference), on CPU."""

import math

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.loop import Trainer


def _config(**kw) -> TrainConfig:
    base = dict(preset="tiny-digits", model_overrides={"channels": 16, "num_res_blocks": 1}, loss="edm",
                loss_kwargs={"sigma_data": 0.5}, lr=2e-3, warmup_steps=3, grad_clip=1.0,
                batch_size=16, steps=10, ema_halflife_kimg=0.05, ema_rampup_ratio=0.05, seed=0)
    return TrainConfig(**{**base, **kw})


def reference_step(t: Trainer, x: torch.Tensor, labels: torch.Tensor | None) -> None:
    """`Trainer.train_step` as it was before the sync-free skip: the host reads `finite` and branches."""
    labels = labels if t.null_label is not None else None
    lr = t.lr_at(t.position.step)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    per_sample, _ = t.loss_fn.forward_with_noise(t.model, x, labels, generator=t.generator)
    loss = per_sample.mean()
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = t.config.grad_clip if t.config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(t.net.parameters(), clip)
    if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        t.optimizer.step()
        t.ema.update(t.net, batch_size=t.config.batch_size)
    else:
        t.optimizer.zero_grad(set_to_none=True)
        t.position.skipped_steps += 1
    t.position.step += 1


def _batches(n: int, bad_at: set[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
        if i in bad_at:
            x[3, 0, 2, 2] = float("nan") if i % 2 else float("inf")
        out.append((x, torch.randint(0, 10, (16,), generator=g)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for part in ("model", "ema"):
        ka, kb = (s[part] if part == "model" else s[part]["module"] for s in (sa, sb))
        assert ka.keys() == kb.keys()
        for k in ka:
            assert torch.equal(_bits(ka[k]), _bits(kb[k])), f"{part}.{k} differs"
    assert sa["ema"]["nimg"] == sb["ema"]["nimg"]
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(_bits(oa[i][k]), _bits(ob[i][k])), f"optimizer state {i}.{k} differs"
    assert sa["position"] == sb["position"]
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])


@pytest.mark.parametrize("fused", [False, True], ids=["snapshot", "fused-found_inf"])
def test_sync_free_skip_matches_the_host_decided_skip(fused):
    config = _config()
    new, ref = Trainer.from_config(config), Trainer.from_config(config)
    new.sync_free_skip = True  # the accelerator path, on the CPU
    if fused:  # the CUDA path (fused Adam's found_inf), exercised with PyTorch's fused CPU kernel
        for t in (new, ref):
            t.optimizer = torch.optim.Adam(t.net.parameters(), lr=config.lr, betas=config.adam_betas,
                                           fused=True)
    batches = _batches(9, bad_at={2, 5, 6})
    for trainer, step in ((new, Trainer.train_step), (ref, reference_step)):
        torch.manual_seed(7)  # dropout and label dropout draw from the global generator
        for x, labels in batches:
            step(trainer, x, labels)
    assert ref.position.skipped_steps == 3
    assert new.pop_metrics()["skipped_steps"] == 3
    _assert_same_state(new, ref)
    # The run went on: the EMA moved and the ramp-up (which depends on images seen) was exercised.
    assert new.ema.nimg == 16 * 6


@pytest.mark.parametrize("sync_free", [True, False], ids=["on-device", "cpu-default"])
def test_skipped_step_is_not_averaged_into_metrics(sync_free):
    new = Trainer.from_config(_config())
    new.sync_free_skip = sync_free
    for x, labels in _batches(4, bad_at={1}):
        new.train_step(x, labels)
    m = new.pop_metrics()
    assert m["skipped_steps"] == 1 and m["step"] == 4
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert all(v is None or math.isfinite(v) for k, v in m.items() if k.startswith("loss_sigma"))


def test_cpu_default_path_matches_the_reference_too():
    config = _config()
    new, ref = Trainer.from_config(config), Trainer.from_config(config)
    assert not new._skip_on_device()
    for trainer, step in ((new, Trainer.train_step), (ref, reference_step)):
        torch.manual_seed(7)
        for x, labels in _batches(6, bad_at={2}):
            step(trainer, x, labels)
    _assert_same_state(new, ref)
