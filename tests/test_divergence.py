"""A diverged run stops with a clear error instead of ending "trained": N consecutive steps skipped for
a non-finite loss or gradient raise `TrainingDivergedError`, at once on the CPU and at the next report on
the sync-free (accelerator) path, before that report's checkpoint; fewer in a row do not."""

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.loop import Trainer, TrainingDivergedError, fit


def _config(**kw) -> TrainConfig:
    base = dict(preset="tiny-digits", model_overrides={"channels": 16, "num_res_blocks": 1}, lr=2e-3,
                warmup_steps=0, batch_size=8, steps=30, seed=0, max_consecutive_skips=4)
    return TrainConfig(**{**base, **kw})


def _batches(bad: set[int]):
    """Batches by global index; those in `bad` hold a NaN pixel (a non-finite loss)."""
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(40):
        x = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
        if i in bad:
            x[0, 0, 0, 0] = float("nan")
        data.append((x, None))
    return lambda epoch: iter(data) if epoch == 0 else iter(())


@pytest.mark.parametrize("sync_free", [False, True], ids=["host", "device"])
def test_consecutive_skips_stop_the_run(sync_free):
    t = Trainer.from_config(_config())
    t.sync_free_skip = sync_free
    checkpoints: list[int] = []
    with pytest.raises(TrainingDivergedError, match=r"\d+ consecutive steps.*max_consecutive_skips=4"):
        fit(t, _batches(set(range(5, 40))), steps=30, report_every=10, checkpoint_every=10,
            on_checkpoint=lambda tr: checkpoints.append(tr.state_dict()["position"]["step"]))
    # host: at the 4th skip (step 9); device: at the report of step 10, before its checkpoint
    assert t.position.step == (10 if sync_free else 9)
    assert checkpoints == []


@pytest.mark.parametrize("sync_free", [False, True], ids=["host", "device"])
def test_isolated_skips_do_not_stop_the_run(sync_free):
    t = Trainer.from_config(_config())
    t.sync_free_skip = sync_free
    bad = {2, 3, 4, 12, 13, 14, 21, 22, 23}  # runs of 3 < 4, one spanning no report boundary
    last = fit(t, _batches(bad), steps=30, report_every=10)
    assert last["step"] == 30 and last["skipped_steps"] == len(bad)


def test_a_run_across_a_report_counts_whole():
    """A run of skips that straddles a report boundary is still one run (device path)."""
    t = Trainer.from_config(_config())
    t.sync_free_skip = True
    with pytest.raises(TrainingDivergedError):
        fit(t, _batches({8, 9, 10, 11}), steps=20, report_every=10)


def test_a_short_run_with_every_step_skipped_does_not_end_trained():
    t = Trainer.from_config(_config(max_consecutive_skips=100))
    with pytest.raises(TrainingDivergedError, match="did not train"):
        fit(t, _batches(set(range(40))), steps=5, report_every=0)


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")),
                                         ("weight_decay", float("nan")), ("grad_clip", float("inf")),
                                         ("ema_halflife_kimg", float("nan")), ("label_dropout", float("nan")),
                                         ("adam_betas", (0.9, float("inf"))),
                                         ("ema_rampup_ratio", float("inf")),
                                         ("max_consecutive_skips", 0), ("steps", 2.5)])
def test_non_finite_hyper_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("overrides,match", [({"channels": -3}, "channels"), ({"channels": "abc"}, "abc"),
                                             ({"channel_mult": [1, 2, "x"]}, "channel_mult"),
                                             ({"nonsense": 1}, "unknown UNet override")])
def test_bad_model_overrides_are_refused_on_the_driver(overrides, match):
    from pipeline.training.ray_train import check_network

    with pytest.raises(ValueError, match=match):
        check_network(_config(model_overrides=overrides))
    check_network(_config())  # the good one builds and runs on the meta device


def test_a_batch_larger_than_a_rank_can_fill_is_refused_before_ray(tmp_path):
    import numpy as np

    from pipeline.config import RunOptions
    from pipeline.data.shard import shard_dataset
    from pipeline.training.ray_train import validate_run

    src = tmp_path / "x.npz"
    np.savez(src, x=np.zeros((40, 8, 8, 1), np.uint8), y=np.zeros(40, np.int64))
    data = str(tmp_path / "d")
    shard_dataset(str(src), data, shard_size=10, test_fraction=0.0, parallel="none")
    cfg = TrainConfig(preset="tiny-digits", batch_size=64)
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 40 images"):
        validate_run(cfg, data=data, out=str(tmp_path / "o"))
    # 4 shards of 10: over 4 workers a rank holds 10 images, enough for 32 // 4 = 8 per rank...
    out = str(tmp_path / "o")
    validate_run(cfg.replace(batch_size=32), data=data, out=out, options=RunOptions(workers=4))
    # ...over 3 workers a rank may hold a single shard of 10, too few for 36 // 3 = 12 per rank
    with pytest.raises(ValueError, match="12 images per rank, but a rank may get only 10"):
        validate_run(cfg.replace(batch_size=36), data=data, out=out, options=RunOptions(workers=3))
