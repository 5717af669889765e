"""Recipes: named functions from a preset to its training configuration, and the run defaults that
several stages share (guidance weights, which FID features suit a dataset).

A recipe is what a researcher would otherwise copy between scripts: the CLI, the flows and the demo
all call these, so a tuned constant lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import TrainConfig

# The guidance weights w a sweep covers by default (Ho & Salimans 2022 sweep w ∈ [0, 4]).
GUIDANCE_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)


def tiny_digits(*, steps: int, batch_size: int, seed: int = 0) -> TrainConfig:
    """The embedded demo: EDM preconditioning and loss (Karras et al. 2022) on the VP process, a high
    learning rate and a short EMA for a 1.8k-image dataset, no flips (digits are chiral)."""
    return TrainConfig(preset="tiny-digits", sde="vp", loss="edm", loss_kwargs={"sigma_data": 0.5},
                       label_dropout=0.1, lr=2e-3, warmup_steps=min(200, steps // 5), batch_size=batch_size,
                       steps=steps, ema_halflife_kimg=20.0, seed=seed)


def edm_default(preset: str, *, steps: int, batch_size: int, seed: int = 0) -> TrainConfig:
    """Any other preset: the EDM loss on VP with the DDPM learning rate 2e-4 and EMA half-life 500 kimg."""
    return TrainConfig(preset=preset, sde="vp", loss="edm", loss_kwargs={"sigma_data": 0.5},
                       label_dropout=0.1, lr=2e-4, warmup_steps=min(200, steps // 5), batch_size=batch_size,
                       steps=steps, ema_halflife_kimg=500.0, seed=seed)


RECIPES: dict[str, Callable[..., TrainConfig]] = {"tiny-digits": tiny_digits}


def train_recipe(preset: str, *, steps: int, batch_size: int, seed: int = 0) -> TrainConfig:
    """The TrainConfig of `preset`: its named recipe, or `edm_default`."""
    from .models import preset_config

    preset_config(preset)  # ValueError naming the known presets
    if preset in RECIPES:
        return RECIPES[preset](steps=steps, batch_size=batch_size, seed=seed)
    return edm_default(preset, steps=steps, batch_size=batch_size, seed=seed)


def is_conditional(config: TrainConfig | dict[str, Any]) -> bool:
    """Whether the config's network takes class labels (and so can be guided)."""
    from .models import preset_config

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    return preset_config(cfg.preset, **cfg.model_overrides).get("num_classes") is not None


def fid_features(levels: int, image_shape: tuple[int, ...] | list[int]) -> str:
    """"domain" (a classifier trained on the data) for small or few-level images, where Inception's
    299×299 natural-image features say little; "inception" for 8-bit images of 32 px and more."""
    H = int(image_shape[0])
    return "domain" if levels != 256 or H < 32 else "inception"


__all__ = ["GUIDANCE_WEIGHTS", "RECIPES", "edm_default", "fid_features", "is_conditional", "tiny_digits",
           "train_recipe"]
