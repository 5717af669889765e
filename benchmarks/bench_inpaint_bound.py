"""What a posterior sampler can score on "complete the right half from the left" (issue #17).

    .venv/bin/python benchmarks/bench_inpaint_bound.py --data <sharded digits URI, e.g. the demo's data/>

An exact posterior sampler draws the right half from p(x_R | x_L). The domain classifier then names the
completion's class c with probability p(c | x_L) (for a perfect classifier), so one completion per image
has expected class accuracy E[p(c_true | x_L)], while the Bayes decision argmax_c p(c | x_L) has accuracy
E[1{argmax = c_true}] ≥ that. Both are estimated here from the left halves alone, with calibrated
classifiers fit on the training split and scored on the held-out split the inverse-problem stage uses
(`diffusion-pipeline inverse ... --per-image k` reports both figures for the diffusion model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def left_halves(data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.evaluation.classifier import load_split

    x, y = load_split(data, split)
    w = x.shape[-1]
    return x[..., : w // 2].reshape(x.shape[0], -1).numpy(), y.numpy()


def main(argv: list[str] | None = None) -> int:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    args = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
