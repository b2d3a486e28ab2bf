"""Next-frame model G: (I_t, M̂_t) → (Î_t+1, M̂_t+1), and an optional patch discriminator.

Two architectures from seed 001, chosen by ``video.architecture``:

- ``shared``: one convolutional encoder over the 4-channel input, two upsampling decoders (image,
  mask) that branch from it — the mask decoder reuses the features the image decoder needs;
- ``separate``: a full encoder–decoder for the image and another for the mask.

Decoders take the encoder's skip connections (U-Net style), so keeping a lesion where it was is
easy and the network learns the motion. With ``mask_sees_next`` (separate networks only) the
mask network also sees the next image: the real I_t+1 where it exists (training, label
propagation), G's own Î_t+1 in synthesis — without it, M̂_t+1 is a forecast made blind to where
the lesion went. The image head predicts a residual on I_t: a static
scene is the zero output, which is where training starts from.

    >>> g = NextFrameModel("shared", base_channels=8, depth=2)
    >>> image, mask = g(torch.rand(2, 3, 32, 32), torch.rand(2, 1, 32, 32))
    >>> tuple(image.shape), tuple(mask.shape)
    ((2, 3, 32, 32), (2, 1, 32, 32))
"""

from __future__ import annotations

import torch
from torch import nn

from lesionflow.errors import FrameShapeError
from lesionflow.models.unet import _conv_block, _Up


class _Encoder(nn.Module):
    def __init__(self, c_in: int, widths: list[int]):
        super().__init__()
        self.stem = _conv_block(c_in, widths[0], 0.0)
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _conv_block(widths[i], widths[i + 1], 0.0))
                                  for i in range(len(widths) - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        return skips


class _Decoder(nn.Module):
    def __init__(self, widths: list[int], c_out: int):
        super().__init__()
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], widths[i], "bilinear", 0.0)
                                for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], c_out, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        h = skips.pop()
        for block in self.up:
            h = block(h, skips.pop())
        return self.head(h)


class NextFrameModel(nn.Module):
    """Images in [0, 1] (B, 3, S, S) and mask probabilities (B, 1, S, S) → next image in [0, 1]
    (unclamped during training) and next-mask *logits*. S must be a multiple of ``2**depth``."""

    def __init__(self, architecture: str = "shared", base_channels: int = 16, depth: int = 3,
                 image_channels: int = 3, mask_sees_next: bool = False):
        super().__init__()
        if architecture not in ("shared", "separate"):
            raise ValueError(f"architecture must be 'shared' or 'separate', not {architecture!r}")
        if mask_sees_next and architecture != "separate":
            raise ValueError("mask_sees_next needs architecture 'separate' (a mask network of its own)")
        self.hparams = {"architecture": architecture, "base_channels": base_channels, "depth": depth,
                        "image_channels": image_channels, "mask_sees_next": mask_sees_next}
        widths = [base_channels * 2**i for i in range(depth + 1)]
        c_in = image_channels + 1
        self.mask_sees_next = mask_sees_next
        self.image_encoder = _Encoder(c_in, widths)
        self.mask_encoder = (_Encoder(c_in + mask_sees_next * image_channels, widths)
                             if architecture == "separate" else None)
        self.image_decoder = _Decoder(widths, image_channels)
        self.mask_decoder = _Decoder(widths, 1)
        self.multiple = 2**depth

    def forward(self, image: torch.Tensor, mask: torch.Tensor, next_image: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_image`` (the real I_t+1) is used only with ``mask_sees_next``; absent, the mask
        network sees G's own Î_t+1."""
        if image.shape[-2:] != mask.shape[-2:] or mask.shape[1] != 1:
            raise FrameShapeError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} must share "
                                  "height/width, and the mask must have one channel")
        if image.shape[-1] % self.multiple or image.shape[-2] % self.multiple:
            raise FrameShapeError(f"frame sides {tuple(image.shape[-2:])} must be multiples of "
                                  f"{self.multiple} (2**depth)")
        x = torch.cat([image, mask], dim=1)
        skips = self.image_encoder(x)
        pred_image = image + self.image_decoder(skips)
        if self.mask_encoder is None:
            return pred_image, self.mask_decoder(skips)
        if self.mask_sees_next:
            seen = pred_image.detach().clamp(0, 1) if next_image is None else next_image
            x = torch.cat([x, seen], dim=1)
        return pred_image, self.mask_decoder(self.mask_encoder(x))


class PatchDiscriminator(nn.Module):
    """Real/fake logits per patch for a frame pair (I_t, I_t+1): judges the *motion*, not only the
    look of one frame. Used only when ``video.gan_weight > 0``."""

    def __init__(self, image_channels: int = 3, base_channels: int = 16):
        super().__init__()
        c = base_channels
        self.net = nn.Sequential(
            nn.Conv2d(2 * image_channels, c, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * c, 1, 3, 1, 1))

    def forward(self, current: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([current, following], dim=1))
