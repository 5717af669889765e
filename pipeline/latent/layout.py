"""The latent branch's folders under a run's root (beside `pipeline.layout.RunLayout`'s), and its recipe.

{root}/autoencoder/      autoencoder checkpoints, EMA export, reconstructions.png
{root}/latents/          latent shards + manifest.json (+ encode-progress.json)
{root}/latent-train/     the diffusion prior on the latents
{root}/latent-samples/   decoded samples (shards, manifest, grid.png)
{root}/latent-eval/      FID/KID of the decoded samples, the likelihood bound
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import storage
from ..config import TrainConfig
from ..recipes import train_recipe


@dataclass(frozen=True)
class LatentLayout:
    root: str

    def _at(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def autoencoder(self) -> str:
        return self._at("autoencoder")

    @property
    def latents(self) -> str:
        return self._at("latents")

    @property
    def train(self) -> str:
        return self._at("latent-train")

    @property
    def samples(self) -> str:
        return self._at("latent-samples")

    @property
    def eval(self) -> str:
        return self._at("latent-eval")


def autoencoder_recipe(
    preset: str,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    kl_weight: float = 1e-4,
    reconstruction: str = "mse",
) -> TrainConfig:
    """An autoencoder preset's training config: Adam at 1e-3 with a short warm-up, a short EMA (the
    network is small and trained briefly), β = kl_weight (Rombach et al. 2022 use ≈1e-6 beside a
    perceptual loss; with MSE alone a larger β keeps the latent near N(0, I))."""
    return TrainConfig(
        model="autoencoder",
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=1e-3,
        warmup_steps=min(20, steps),
        ema_halflife_kimg=2.0,
        label_dropout=0.0,
        loss_kwargs={"kl_weight": kl_weight, "reconstruction": reconstruction},
    )


def prior_recipe(preset: str, *, steps: int, batch_size: int, seed: int = 0) -> TrainConfig:
    """The diffusion prior's config: the pixel recipe of the U-Net preset (`latent_config` then sizes
    the network to the latents)."""
    return train_recipe(preset, steps=steps, batch_size=batch_size, seed=seed)


__all__ = ["LatentLayout", "autoencoder_recipe", "prior_recipe"]
