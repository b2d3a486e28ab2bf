"""A compact U-Net: the fully convolutional encoder-decoder the seeds name (seed 002's FCN).

Width and depth are configurable so the same class serves CPU tests (8 channels, depth 2) and
real training; the decoder upsamples (bilinear + conv by default, transposed conv optional) and
concatenates the skip connection of the same scale. Output: one logit channel per pixel.
Any input whose sides are multiples of ``2**depth`` works.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int, mode: str, dropout: float):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_in, 2, stride=2)
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = _conv_block(c_in + c_skip, c_out, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """``UNet(in_channels=3, base_channels=16, depth=4)`` maps (B, 3, H, W) to (B, 1, H, W) logits.

    >>> UNet(3, 8, 2)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 1, 32, 32])
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 16,
        depth: int = 4,
        upsample: str = "bilinear",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.hparams = {
            "in_channels": in_channels, "base_channels": base_channels, "depth": depth,
            "upsample": upsample, "dropout": dropout,
        }
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = _conv_block(in_channels, widths[0], 0.0)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _conv_block(widths[i], widths[i + 1], dropout))
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], upsample, dropout)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.multiple = 2**depth
        self.feature_channels = base_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel features at full resolution (the decoder's last layer)."""
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(
                f"input sides {tuple(x.shape[-2:])} must be multiples of {self.multiple} "
                f"(2**depth); resize or pad first"
            )
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips.pop()
        for block in self.up:
            h = block(h, skips.pop())
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
