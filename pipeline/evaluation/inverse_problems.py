"""Inverse problems with a model trained without the condition (Song et al. 2021, Sec. 5 and App. I):
inpainting, colourisation and super-resolution of held-out real images, solved by the replacement
method inside the predictor–corrector sampler, by ΠGDM posterior sampling, or by the twisted diffusion
sampler (SMC with ΠGDM's twisting; `diffusion/inverse.py`), and scored against the ground truth: PSNR and
SSIM, the domain classifier's accuracy on the completions' true labels, and FID of the completions (with
its floor at the same N).

The model never sees y in training: it is the prior p(x) that is inverted. A class-conditional model gives
p(x) through its null label, or, for smc, as the mixture (1/C) Σ_c p_θ(x | c) of its conditional branches,
whose particles' classes are resampled by how well they explain y (prior "classes", the default there:
on digits the null label, trained on a tenth of the batches, draws 7.5%–14.3% of its samples per class
against the data's 10%; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .. import storage
from ..config import check_int
from ..diffusion.dequantize import snap_to_levels
from ..diffusion.inverse import (
    ClassMixture,
    Colorization,
    Inpainting,
    Measurement,
    SuperResolution,
    sample_posterior,
    sample_replacement,
    sample_smc,
)
from .grid import grid_png

TASKS: tuple[str, ...] = ("inpaint-right", "inpaint-left", "inpaint-center", "colorize", "superres")
METHODS: tuple[str, ...] = ("replacement", "pigdm", "smc")
PRIORS: tuple[str, ...] = ("auto", "null", "classes")
# ΠGDM's v by method: near the digits' per-pixel variance in [-1, 1] (0.29) for pigdm, whose samples it
# shapes; the paper's v = 1 for smc, whose target it does not change (flat early twisting keeps particles).
DATA_VAR = {"pigdm": 0.25, "smc": 1.0}
GRID_FILE = "inverse.png"
RESULT_FILE = "inverse.json"


@dataclass(frozen=True)
class InverseTask:
    """What is measured and how it is solved. `task`: inpaint-right (the right half is unknown and
    completed from the left), inpaint-left, inpaint-center, colorize (3-channel data), superres (average
    pooling by `factor`); `method`: replacement (noiseless y), pigdm or smc (y with noise σ_y; smc runs
    `particles` particles per completion). `per_image` completions are drawn for every measurement
    (independent posterior samples). `data_var`: ΠGDM's prior variance v in r_t² = v σ̃²/(v + σ̃²)
    (`diffusion.inverse.pigdm_score`), None for the method's default (`DATA_VAR`); for pigdm a smaller v
    weights the measurement more at high noise, a tempered posterior (sharper, no longer exact;
    benchmarks/RESULTS.md measures both). `prior`: null (the null label), classes (smc only: the mixture
    of a class-conditional model's branches) or auto (classes for smc where the model has classes).
    `batch`: completions per sampler call (each with its particles; the memory bound for large images),
    None for all n × per_image in one call; call j is seeded with seed + j."""

    task: str = "inpaint-right"
    method: str = "replacement"
    n: int = 200
    steps: int = 500
    factor: int = 2
    sigma_y: float = 0.01
    data_var: float | None = None
    seed: int = 0
    split: str = "test"
    per_image: int = 1
    particles: int = 10
    prior: str = "auto"
    batch: int | None = None

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        for name in ("n", "steps", "factor", "per_image", "particles"):
            check_int(name, getattr(self, name), 2 if name == "n" else 1)
        if self.batch is not None:
            check_int("batch", self.batch, 1)
        if not self.sigma_y >= 0:
            raise ValueError(f"sigma_y must be >= 0, got {self.sigma_y}")
        if self.data_var is not None and not self.data_var > 0:
            raise ValueError(f"data_var must be > 0 (or None for the method's default), got {self.data_var}")
        if self.prior == "classes" and self.method != "smc":
            raise ValueError(f"prior 'classes' needs method 'smc' (only its particles can trade classes by "
                             f"how well they explain y), got method {self.method!r}")

    def resolved(self, num_classes: int | None) -> InverseTask:
        """The task with the method's defaults filled in for a model with `num_classes` classes (None:
        unconditional): data_var from `DATA_VAR`, prior auto → classes for smc on a class-conditional model,
        else null."""
        self.validate()
        if self.prior == "classes" and not num_classes:
            raise ValueError("prior 'classes' needs a class-conditional model; this one is unconditional "
                             "(use prior 'null' or 'auto')")
        prior = self.prior
        if prior == "auto":
            prior = "classes" if self.method == "smc" and num_classes else "null"
        data_var = self.data_var if self.data_var is not None else DATA_VAR.get(self.method)
        return replace(self, prior=prior, data_var=data_var)


def measurement(task: str, shape: tuple[int, int, int], factor: int = 2) -> Measurement:
    """The measurement operator of `task` for images of shape (C, H, W)."""
    C, H, W = shape
    if task.startswith("inpaint"):
        mask = torch.zeros(C, H, W)
        if task == "inpaint-right":
            mask[..., : W // 2] = 1
        elif task == "inpaint-left":
            mask[..., W // 2:] = 1
        else:
            mask[:] = 1
            mask[..., H // 4: H - H // 4, W // 4: W - W // 4] = 0
        return Inpainting(mask)
    if task == "colorize":
        if C != 3:
            raise ValueError(f"task 'colorize' needs 3-channel images, the data has {C} channel(s)")
        return Colorization()
    return SuperResolution(factor)


@torch.no_grad()
def _solve(model: Any, op: Measurement, y: Tensor, shape: tuple[int, ...], task: InverseTask,
           on_progress: Callable[[dict[str, Any]], None] | None, steps_before: int = 0,
           total: int | None = None) -> tuple[Tensor, int]:
    """One sampler call; progress counts on from `steps_before` steps of `total` (calls × steps)."""
    score_fn = model.score_fn(None)
    callback = None
    if on_progress is not None:
        def callback(event: dict[str, Any]) -> None:
            on_progress({"step": steps_before + event["i"] + 1, "total": total or task.steps})

    if task.method == "replacement":
        return sample_replacement(score_fn, model.sde, op, y, shape, steps=task.steps, seed=task.seed,
                                  callback=callback)
    if task.method == "smc":
        C = model.num_classes
        prior = (ClassMixture(model.score_fn, torch.full((C,), 1.0 / C)) if task.prior == "classes"
                 else score_fn)
        return sample_smc(prior, model.sde, op, y, shape, sigma_y=task.sigma_y, steps=task.steps,
                          seed=task.seed, particles=task.particles, data_var=task.data_var, callback=callback)
    with torch.enable_grad():  # ΠGDM differentiates through the denoiser
        return sample_posterior("euler_maruyama", score_fn, model.sde, op, y, shape, sigma_y=task.sigma_y,
                                steps=task.steps, seed=task.seed, data_var=task.data_var,
                                device=y.device, callback=callback)


def run_inverse(checkpoint: str, data: str, out: str, task: InverseTask | None = None, *,
                classifier: str | None = None,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Solve `task` on the first n held-out images of `data`; grid (truth, measurement, completion rows)
    and scores under `out`. With a domain classifier: its accuracy on the completions and their FID.
    `on_progress({"step", "total"})` is called after each sampler step (of every call, `task.batch`)."""
    from ..training.checkpoint import load_model
    from .bpd import dataset_levels
    from .classifier import load_split
    from .image_metrics import reconstruction_metrics

    task = task or InverseTask()
    task.validate()  # before the checkpoint is read; what depends on the model is resolved after
    # Sampling on the GPU where there is one; measuring, scoring and the picture on the CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint, device=device)
    task = task.resolved(model.num_classes)
    levels = dataset_levels(data)
    x, labels = load_split(data, task.split)
    if x.shape[0] < task.n:
        raise ValueError(f"n={task.n} exceeds the {x.shape[0]} images of split {task.split!r} of {data}")
    x, labels = x[: task.n], labels[: task.n]
    op = measurement(task.task, tuple(x.shape[1:]), task.factor)
    op.check(tuple(x.shape))
    g = torch.Generator().manual_seed(task.seed)
    y = op.measure(x)
    if task.method != "replacement":  # the noisy-measurement methods
        y = y + task.sigma_y * torch.randn(y.shape, generator=g)
    k = task.per_image  # completions of one image sit next to each other: rows i·k … i·k + k - 1
    truth, y_k = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    t0 = time.perf_counter()
    rows = task.batch or truth.shape[0]
    starts = range(0, truth.shape[0], rows)
    parts = []
    for j, a in enumerate(starts):
        part, nfe = _solve(model, op, y_k[a: a + rows].to(device), tuple(truth[a: a + rows].shape),
                           replace(task, seed=task.seed + j), on_progress, j * task.steps,
                           len(starts) * task.steps)
        parts.append(part.cpu())
    completed = torch.cat(parts)
    done = snap_to_levels(completed.float().clamp(-1, 1), levels)  # stored and scored on the data's grid
    scores = reconstruction_metrics(done, truth)  # means over all completions
    result: dict[str, Any] = {"checkpoint": model.describe(), "data": data, "task": asdict(task),
                              "nfe": nfe, "psnr": scores["psnr"], "ssim": scores["ssim"],
                              "seconds": time.perf_counter() - t0}
    if classifier:
        result.update(_classifier_scores(done, labels, classifier, data, levels, k))
    done = done[::k]  # the grid shows each image's first completion
    shown = min(10, task.n)
    seen = (op.lift(y[:shown], tuple(x[:shown].shape)) if task.task.startswith("inpaint")
            else _as_image(op, y[:shown], x[:shown]))
    rows = torch.cat([x[:shown], snap_to_levels(seen.clamp(-1, 1), levels), done[:shown]])
    png = grid_png(rows, nrow=shown, levels=levels, scale=max(1, 64 // x.shape[-1]))
    result["grid"] = storage.join(out, GRID_FILE)
    storage.write_bytes(result["grid"], png)
    storage.write_json(storage.join(out, RESULT_FILE), result)
    return {**result, "png": png}


def _as_image(op: Measurement, y: Tensor, like: Tensor) -> Tensor:
    """A measurement shown at image size: the grey image broadcast to 3 channels, or the low-resolution
    image upsampled by repetition."""
    if isinstance(op, Colorization):
        return y.expand(-1, like.shape[1], -1, -1)
    f = like.shape[-1] // y.shape[-1]
    return y.repeat_interleave(f, -1).repeat_interleave(f, -2)


def _classifier_scores(done: Tensor, labels: Tensor, classifier: str, data: str, levels: int,
                       per_image: int) -> dict:
    """Class accuracy of every completion, and of the class the k completions of an image support
    together: argmax_c of (1/k) Σ_j p_clf(c | x_j), the Monte Carlo estimate of p(c | y) under the
    posterior samples (the Bayes decision; a single posterior sample is right only with probability
    E[p(c_true | y)], which ambiguous measurements keep below the Bayes accuracy)."""
    from .classifier import class_probs
    from .features import build_extractor
    from .fid import reference_stats
    from .scoring import fid_and_precision

    ext = build_extractor("domain", weights=classifier)
    ref = reference_stats(data, ext, split="train")
    labels_k = labels.repeat_interleave(per_image)
    scores = fid_and_precision(done, labels_k, extractor=ext, reference=ref, levels=levels)
    probs = class_probs(ext.model, done)
    out = {"class_accuracy": float((probs.argmax(1) == labels_k).float().mean()), "fid": scores["fid"],
           "fid_floor": scores.get("floor")}
    if per_image > 1:
        out["class_accuracy_posterior"] = float((posterior_class(probs, per_image) == labels).float().mean())
    return out


def posterior_class(probs: Tensor, per_image: int) -> Tensor:
    """argmax_c (1/k) Σ_j p_clf(c | x_j) over each image's k = `per_image` completions (adjacent rows of
    `probs` [n·k, classes]): the class of highest posterior probability p(c | y) by Monte Carlo."""
    if probs.shape[0] % per_image:
        raise ValueError(f"{probs.shape[0]} completions are not a whole number of groups of {per_image}")
    return probs.reshape(probs.shape[0] // per_image, per_image, -1).mean(1).argmax(1)


def inverse_markdown(res: dict[str, Any]) -> str:
    from ..reports import embed_png, fmt, table

    t = res["task"]
    # One setting per row: a long cell is cut off at the Prefect UI's table width.
    rows: list[tuple[str, Any]] = [("task / method", f"{t['task']} / {t['method']}")]
    if t["method"] != "replacement":
        rows += [("measurement noise σ_y / ΠGDM's v", f"{t['sigma_y']} / {t['data_var']}")]
    prior = "class mixture (1/C) Σ_c p(x | c)" if t["prior"] == "classes" else "unconditional (null label)"
    rows += [("prior p(x)", prior)]
    nfe = res["nfe"]
    if t["method"] == "smc":
        rows += [("particles per completion", t["particles"])]
        nfe = f"{nfe} per particle"
    rows += [("images", t["n"]), ("completions per image", t.get("per_image", 1)), ("NFE", nfe),
             ("PSNR (dB)", res["psnr"]), ("SSIM", res["ssim"])]
    if "class_accuracy" in res:
        rows += [("class accuracy of completions", res["class_accuracy"])]
        if "class_accuracy_posterior" in res:
            rows += [("class accuracy of p(c | y) from the completions", res["class_accuracy_posterior"])]
        fid = f"{fmt(res['fid'], 3)} ({fmt(res.get('fid_floor'), 3)})"
        rows += [("FID of completions (floor at N)", fid)]
    return ("### Inverse problem with a model trained without y\n\n" + table(rows)
            + "\n\nRows: ground truth, measurement, completion (the first of each image's).\n\n"
            + embed_png(res["png"], "inverse problem", link=res["grid"]))


__all__ = ["DATA_VAR", "METHODS", "PRIORS", "TASKS", "InverseTask", "inverse_markdown", "measurement",
           "posterior_class", "run_inverse"]
