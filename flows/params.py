"""The end-to-end flow's parameters, in groups that travel together. Prefect renders each group as a
nested form in the UI and validates a deployment's parameters against it before a run starts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt key is an error, not ignored


class TrainParams(_Group):
    """Training: steps and batch of the preset's recipe, and how the run is spread over Ray workers."""

    steps: int = Field(2500, ge=1)
    batch_size: int = Field(128, ge=1)
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    report_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    slice_steps: int = Field(1000, ge=1)  # mode="continue": steps added to the newest run per flow run
    xflip: bool = False  # random horizontal flips; refused on data whose manifest says they change the class
    phema_every: int = Field(0, ge=0)  # > 0: keep post-hoc EMA profiles σ_rel 0.05, 0.10, snapshot this often


class EvalParams(_Group):
    """Evaluation: samples for FID (sampler, steps, guidance) and the likelihood's test-set size."""

    n_samples: int = Field(500, ge=2)
    sampler: str = "heun"
    sample_steps: int = Field(32, ge=1)
    guidance: float = Field(0.0, ge=0)  # the FID gate judges the model itself; the sweep judges w
    sample_workers: int = Field(0, ge=0)
    likelihood_samples: int = Field(128, ge=1)
    elbo_samples: int = Field(8, ge=1)


class SweepParams(_Group):
    """The guidance sweep: w values (None: the defaults; []: no sweep), samples and steps per point."""

    weights: list[float] | None = None
    samples: int = Field(200, ge=2)
    steps: int = Field(18, ge=1)
    # The optional post-hoc EMA search (`tune ema`) over these σ_rel ([]: none; needs train.phema_every).
    ema_sigma_rels: list[float] = Field(default_factory=list)


__all__ = ["EvalParams", "SweepParams", "TrainParams"]
