"""Networks: the DDPM / DDPM++ U-Net with named presets, and the EMA of its weights."""

from .autocast import AutocastNet
from .ema import EMA, unwrap_model
from .unet import EMBEDDING_TYPES, PRESETS, UNet, build_unet, preset_config

__all__ = ["EMA", "EMBEDDING_TYPES", "PRESETS", "AutocastNet", "UNet", "build_unet", "preset_config",
           "unwrap_model"]
