"""Segmentation networks, built from ``ModelConfig``."""

from lesionflow.config import ModelConfig
from lesionflow.models.resunet import ResUNet
from lesionflow.models.unet import UNet


def build_model(cfg: ModelConfig) -> UNet | ResUNet:
    if cfg.arch == "resunet":
        return ResUNet(cfg.in_channels, cfg.base_channels, cfg.depth, cfg.blocks, cfg.dropout)
    return UNet(cfg.in_channels, cfg.base_channels, cfg.depth, cfg.upsample, cfg.dropout)


__all__ = ["ResUNet", "UNet", "build_model"]
