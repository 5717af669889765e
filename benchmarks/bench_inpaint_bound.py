"""What a posterior sampler can score on "complete the right half from the left" (issue #17).

    .venv/bin/python benchmarks/bench_inpaint_bound.py --data <sharded digits URI, e.g. the demo's data/>

An exact posterior sampler draws the right half from p(x_R | x_L). The domain classifier then names the
completion's class c with probability p(c | x_L) (for a perfect classifier), so one completion per image
has expected class accuracy E[p(c_true | x_L)], while the Bayes decision argmax_c p(c | x_L) has accuracy
E[1{argmax = c_true}] ≥ that. Both are estimated here from the left halves alone, with calibrated
classifiers fit on the training split and scored on the held-out split the inverse-problem stage uses
(`diffusion-pipeline inverse ... --per-image k` reports both figures for the diffusion model).

    ... --checkpoint CKPT --classifier CLF [--samples 20000]

also estimates both figures for the *model's* own p(c | x_L), sampler aside: it draws unconditional samples
from the null label and from the class mixture (1/C) Σ_c p_θ(x | c), names their classes with the domain
classifier, and reads p(c | x_L) off the k nearest samples in left-half pixel space (k-NN: biased by its
neighbourhood's width, so two k are shown). Estimates, not bounds: a neighbourhood average flattens a
sharp p(c | x_L), so a good posterior sampler of that prior can score a little above them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def left_halves(data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.evaluation.classifier import load_split

    x, y = load_split(data, split)
    w = x.shape[-1]
    return x[..., : w // 2].reshape(x.shape[0], -1).numpy(), y.numpy()


def model_samples(checkpoint: str, classifier: str, n: int, prior: str,
                  levels: int) -> tuple[np.ndarray, np.ndarray]:
    """n samples of the model's p(x) (prior: null or classes), as left halves, and their classes as the
    domain classifier names them; Heun, 18 steps, snapped to the data's `levels`."""
    from pipeline.diffusion.dequantize import snap_to_levels
    from pipeline.diffusion.samplers import sample
    from pipeline.evaluation.classifier import class_probs
    from pipeline.evaluation.features import build_extractor
    from pipeline.training.checkpoint import load_model

    model, ext = load_model(checkpoint), build_extractor("domain", weights=classifier)
    lefts, classes = [], []
    for i, start in enumerate(range(0, n, 1000)):
        b = min(1000, n - start)
        labels = None if prior == "null" else torch.arange(start, start + b) % model.num_classes
        with torch.no_grad():
            x, _ = sample("heun", model.score_fn(labels), model.sde, (b, *model.image_shape), steps=18,
                          seed=1000 + i)
        x = snap_to_levels(x.clamp(-1, 1), levels)
        classes.append(class_probs(ext.model, x).argmax(1).numpy())
        lefts.append(x[..., : x.shape[-1] // 2].reshape(b, -1).numpy())
    return np.concatenate(lefts), np.concatenate(classes)


def main(argv: list[str] | None = None) -> int:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", help="also estimate the model's own figures from its samples")
    p.add_argument("--classifier", help="the domain classifier that names the samples' classes")
    p.add_argument("--samples", type=int, default=20000, help="model samples per prior")
    args = p.parse_args(argv)
    if args.checkpoint and not args.classifier:
        p.error("--checkpoint needs --classifier")
    xtr, ytr = left_halves(args.data, "train")
    xte, yte = left_halves(args.data, "test")
    models = {
        "SVC (RBF), isotonic calibration": CalibratedClassifierCV(SVC(C=10), method="isotonic", cv=5),
        "SVC (RBF), sigmoid calibration": CalibratedClassifierCV(SVC(C=10), method="sigmoid", cv=5),
        "logistic regression": LogisticRegression(C=1.0, max_iter=5000),
        "5-NN": KNeighborsClassifier(5),
    }
    print(f"left halves: {xtr.shape[0]} train, {xte.shape[0]} held-out images, {xtr.shape[1]} pixels\n")
    print("| model of p(c given the left half) | Bayes decision accuracy | E[p(c_true given left)] "
          "(one posterior sample) | log loss |")
    print("|---|---:|---:|---:|")
    for name, model in models.items():
        P = model.fit(xtr, ytr).predict_proba(xte)
        pt = P[np.arange(len(yte)), yte]
        print(f"| {name} | {np.mean(P.argmax(1) == yte):.3f} | {pt.mean():.3f} | "
              f"{-np.log(np.clip(pt, 1e-12, None)).mean():.3f} |")
    if args.checkpoint:
        print(f"\n| the model's p(c given the left half), {args.samples} samples | Bayes decision accuracy | "
              "E[p(c_true given left)] | class frequencies of the samples (min–max) |")
        print("|---|---:|---:|---|")
        from pipeline.evaluation.bpd import dataset_levels

        for prior in ("null", "classes"):
            xs, cs = model_samples(args.checkpoint, args.classifier, args.samples, prior,
                                   dataset_levels(args.data))
            freq = np.bincount(cs, minlength=10) / len(cs)
            for k in (5, 20):
                knn = KNeighborsClassifier(k).fit(xs, cs)
                P = np.zeros((len(yte), 10))
                P[:, knn.classes_] = knn.predict_proba(xte)  # a class no sample has gets 0
                pt = P[np.arange(len(yte)), yte]
                name = "null label" if prior == "null" else "class mixture"
                print(f"| {name}, {k}-NN | {np.mean(P.argmax(1) == yte):.3f} | {pt.mean():.3f} | "
                      f"{freq.min():.3f}–{freq.max():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
