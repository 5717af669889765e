"""Optional flows beside the end-to-end DAG, on a trained checkpoint: latent interpolation through the
probability-flow ODE, and inverse problems (inpainting, colourisation, super-resolution) solved with the
model trained without the measurement. Each is one stage call whose picture is embedded in the Prefect UI."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from pipeline import stages
from pipeline.evaluation.inverse_problems import InverseTask

from .tasks import RETRY, LiveBar, publish

_DEFAULT = InverseTask()  # the flow's defaults are the task's own


@task(name="interpolation", **RETRY)
def interpolation_task(checkpoint: str, data: str, out: str, pairs: int, n: int) -> dict[str, Any]:
    return publish(stages.interpolation_stage(checkpoint, data, out, pairs=pairs, n=n), "interpolation",
                   "latent interpolation through the probability-flow ODE")


@task(name="inverse-problem", **RETRY)
def inverse_task(checkpoint: str, data: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    bar = LiveBar("inverse-progress", "sampler steps done / total (%)")
    return publish(stages.inverse_stage(checkpoint, data, out, on_progress=bar, **options), "inverse-problem",
                   "inverse problem with a model trained without y")


@flow(name="interpolation")
def interpolation_flow(checkpoint: str, data: str, out: str, pairs: int = 4, n: int = 8) -> dict[str, Any]:
    """Encode pairs of held-out images to x_T, decode spherical interpolations between them."""
    return interpolation_task(checkpoint, data, out, pairs, n)


@flow(name="inverse-problem")
def inverse_flow(checkpoint: str, data: str, out: str, task: str = _DEFAULT.task,
                 method: str = _DEFAULT.method, n: int = _DEFAULT.n, steps: int = _DEFAULT.steps,
                 classifier: str | None = None, per_image: int = _DEFAULT.per_image,
                 sigma_y: float = _DEFAULT.sigma_y, data_var: float | None = _DEFAULT.data_var,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Solve an inverse problem on held-out images; PSNR/SSIM, and class accuracy and FID of the
    completions when the domain classifier is given. `data_var` None is the method's default. `options`:
    any other `InverseTask` field, e.g. {"particles": 10, "batch": 64} for smc on large images (an unknown
    name is refused with the allowed ones)."""
    return inverse_task(checkpoint, data, out, {"task": task, "method": method, "n": n, "steps": steps,
                                               "classifier": classifier, "per_image": per_image,
                                               "sigma_y": sigma_y, "data_var": data_var, **(options or {})})
