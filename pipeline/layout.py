"""The storage layout of one end-to-end run: every folder and file name under its root, in one place.

    {root}/data/         WebDataset shards + manifest.json
    {root}/train/        checkpoints, EMA export, history.json, Ray run storage
    {root}/classifier/   the domain classifier (FID features for small domains)
    {root}/samples/      samples as shards + grid.png + the record of every seed
    {root}/eval/         FID/KID and likelihood reports (JSON + markdown)
    {root}/tune/         the guidance sweep (Ray Tune storage, report, plots)
    {root}/report.md     the summary of the run, summary.json its numbers
    {root}/runs.json     the flow runs that wrote into this root (scheduled time, flow-run id, mode)
    {root}/lease/        the lease of the driver writing into the root now (`pipeline.lease`)
    {series}/latest.json the newest completed run of a series of per-run roots (`pipeline.runs`)
"""

from __future__ import annotations

from dataclasses import dataclass

from . import storage


@dataclass(frozen=True)
class RunLayout:
    """Where each stage of a run under `root` reads and writes."""

    root: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def data(self) -> str:
        return self._at("data")

    @property
    def train(self) -> str:
        return self._at("train")

    @property
    def classifier(self) -> str:
        return self._at("classifier")

    @property
    def samples(self) -> str:
        return self._at("samples")

    @property
    def eval(self) -> str:
        return self._at("eval")

    @property
    def tune(self) -> str:
        return self._at("tune")

    @property
    def report(self) -> str:
        return self._at("report.md")

    @property
    def summary(self) -> str:
        return self._at("summary.json")

    @property
    def runs_log(self) -> str:
        return self._at("runs.json")

    @property
    def lease(self) -> str:
        return self._at("lease")

    @staticmethod
    def latest(series: str) -> str:
        """The pointer to the newest completed run among the per-run roots under `series`."""
        return storage.join(series, "latest.json")

    # Files inside the stage folders, named here so that no reader repeats a writer's string.
    @staticmethod
    def history(train: str) -> str:
        return storage.join(train, "history.json")

    @staticmethod
    def likelihood(eval_dir: str, ext: str = "json") -> str:
        return storage.join(eval_dir, f"likelihood.{ext}")

    @staticmethod
    def loss_curve(train: str) -> str:
        return storage.join(train, "loss.png")

    @staticmethod
    def grid(samples: str) -> str:
        return storage.join(samples, "grid.png")


__all__ = ["RunLayout"]
