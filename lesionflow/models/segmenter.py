"""``Segmenter``: the network plus its preprocessing, the unit that is trained, logged, registered,
served and rolled back — so a registered version always carries the input conventions it was
trained with (image size, channel count, intensity normalisation from the dataset fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionflow.data.transforms import resize_image, resize_prob, to_channels
from lesionflow.models.resunet import ResUNet
from lesionflow.models.unet import UNet

NETWORKS = {"unet": UNet, "resunet": ResUNet}
# test-time flips (``model.tta``): the dims each extra pass flips, undone on its prediction
TTA_FLIPS: dict[str, list[tuple[int, ...]]] = {"none": [], "h": [(3,)], "hv": [(3,), (2,), (2, 3)]}


def network(hparams: dict) -> UNet | ResUNet:
    """The network ``hparams`` describe (``arch`` absent: a U-Net saved before there was a choice)."""
    hparams = dict(hparams)
    return NETWORKS[hparams.pop("arch", "unet")](**hparams)


class Segmenter(nn.Module):
    def __init__(self, net: UNet | ResUNet, image_size: int, mean: list[float], std: list[float],
                 tta: str = "none"):
        super().__init__()
        if image_size % net.multiple:
            raise ValueError(f"image_size {image_size} must be a multiple of {net.multiple}")
        if tta not in TTA_FLIPS:
            raise ValueError(f"tta {tta!r} must be one of {', '.join(TTA_FLIPS)}")
        self.net = net
        self.image_size = image_size
        self.tta = tta
        channels = net.hparams["in_channels"]
        self.register_buffer("mean", torch.tensor(mean[:channels], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std[:channels], dtype=torch.float32).view(-1, 1, 1))

    @property
    def in_channels(self) -> int:
        return self.net.hparams["in_channels"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for uint8-scaled input (B, C, S, S); normalisation happens here."""
        return self.net((x - self.mean) / self.std)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Final logits and the deep-supervision heads' (``ResUNet`` only)."""
        return self.net.forward_all((x - self.mean) / self.std)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """What inference answers (``predict_proba``, the ONNX export): the lesion probability,
        averaged over the ``tta`` flips of ``x``, all views in one batch (B, 1, S, S). Training and
        its validation use ``forward``: one view."""
        flips = TTA_FLIPS[self.tta]
        if not flips:
            return torch.sigmoid(self(x))
        probs = torch.sigmoid(self(torch.cat([x, *(x.flip(dims) for dims in flips)]))).chunk(len(flips) + 1)
        return (probs[0] + sum(p.flip(dims) for p, dims in zip(probs[1:], flips, strict=True))) / (len(flips) + 1)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 image of any size → (C, S, S) uint8 array at the model's resolution."""
        return resize_image(to_channels(image, self.in_channels), self.image_size).transpose(2, 0, 1)

    @torch.no_grad()
    def predict_proba(self, images: list[np.ndarray], lesion_types: list[str | None] | None = None,
                      batch_size: int = 8) -> list[np.ndarray]:
        """Lesion probability per pixel, each map at its own image's size. ``lesion_types`` is
        accepted for interface parity with ``LesionTypeRouter``; one model serves every type."""
        self.eval()
        device = self.mean.device
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = torch.from_numpy(np.stack([self.prepare(im) for im in chunk])).float().to(device)
            probs = self.probabilities(x)[:, 0].cpu().numpy()
            out += [resize_prob(p, im.shape[0], im.shape[1]) for p, im in zip(probs, chunk, strict=True)]
        return out

    def save(self, path: Path) -> None:
        torch.save({"hparams": self.net.hparams, "image_size": self.image_size,
                    "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                    "tta": self.tta, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: Path, map_location: str = "cpu") -> Segmenter:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        # saved before test-time flips existed: "none"
        model = cls(network(blob["hparams"]), blob["image_size"], blob["mean"], blob["std"], blob.get("tta", "none"))
        model.load_state_dict(blob["state_dict"])
        return model
