"""Segmentation networks, built from ``ModelConfig``."""

from lesionflow.config import ModelConfig
from lesionflow.models.unet import UNet


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(
        in_channels=cfg.in_channels,
        base_channels=cfg.base_channels,
        depth=cfg.depth,
        upsample=cfg.upsample,
        dropout=cfg.dropout,
    )


__all__ = ["UNet", "build_model"]
