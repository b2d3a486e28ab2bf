"""Training from area ratios: every epoch re-rank the superpixels, paint the "second annotation",
train the segmentation network and the GCN on it.

``WeakGraphModel`` is a ``Segmenter`` plus a GCN over its superpixel graph. Per pixel the feature
is the network's last decoder layer (``UNet.features``) concatenated with the normalised colour,
so superpixels are meaningful even before the network has learned anything. One epoch:

1. annotate (no augmentation, eval mode): superpixels + graph per weak image, vertex scores,
   the count rule (``counts``) → a target map with 1 / 0 / -1 (ignore).
2. train on those targets (augmented like plain training): the pixel head's Dice + BCE skips the
   ignore pixels; the GCN's BCE is taken on the superpixels of the *current* features, each vertex
   labelled by the share of lesion among its labelled pixels (vertices mostly in the ignore band
   carry no loss), weighted by area. Both losses reach the network's features. With
   ``size_weight`` > 0 a size penalty (``losses.size_loss``) also keeps each weak image's
   predicted lesion area inside r ± e; labelled records get none (their masks fix every pixel).

The scores that rank vertices come from the GCN — except in the first epoch, when it is untrained:
then a pretrained network's own head ranks them (mean lesion probability per vertex), and an
untrained one falls back to a boundary-contrast prior (colour distance to the nearest superpixel
on the image border; lesions seldom fill the frame edge), a classic saliency cue (Wei et al.,
ECCV 2012) that costs nothing. ``rank_by: gcn+head`` ranks by the mean of the GCN's and the
head's probability instead, so the pixel head also votes from the second epoch on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lesionflow.config import TrainConfig, WeakLabelConfig
from lesionflow.data.augment import Augmenter, Strength
from lesionflow.data.manifest import Record
from lesionflow.data.transforms import load_image, load_target
from lesionflow.errors import WeakLabelError
from lesionflow.loop import TrainingLoop
from lesionflow.losses import IGNORE, dice_bce_loss, size_loss
from lesionflow.models.segmenter import Segmenter
from lesionflow.progress import progress
from lesionflow.training import SegmentationDataset, pick_device, validation_dice
from lesionflow.weak.counts import BACKGROUND, FOREGROUND, IGNORED, paint, vertex_labels
from lesionflow.weak.gcn import GCN
from lesionflow.weak.graph import Graph, batch_adjacency, build_graph
from lesionflow.weak.superpixels import superpixels


class WeakGraphModel(nn.Module):
    """A ``Segmenter`` and the GCN that scores its superpixels, trained as one module."""

    def __init__(self, segmenter: Segmenter, cfg: WeakLabelConfig):
        super().__init__()
        self.segmenter, self.cfg = segmenter, cfg
        self.colour = segmenter.in_channels
        self.gcn = GCN(segmenter.net.feature_channels + self.colour, cfg.gcn_hidden, cfg.gcn_layers)

    def pixel_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8-scaled (B, C, S, S) → ((B, F + C, S, S) features ⊕ colour, (B, 1, S, S) logits)."""
        seg = self.segmenter
        normalised = (x - seg.mean) / seg.std
        h = seg.net.features(normalised)
        return torch.cat([h, normalised], 1), seg.net.head(h)

    def graph(self, features: torch.Tensor) -> Graph:
        cfg = self.cfg
        labels = superpixels(features, cfg.n_superpixels, cfg.compactness, cfg.kmeans_iters)
        return build_graph(features, labels, cfg.sigma, cfg.connectivity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Graph], torch.Tensor]:
        """(pixel logits, one graph per image, vertex logits of all graphs concatenated)."""
        features, logits = self.pixel_features(x)
        graphs = [self.graph(f) for f in features]
        vertex_x, adj = batch_adjacency(graphs)
        return logits, graphs, self.gcn(vertex_x, adj)


def boundary_contrast(graph: Graph, colour: int) -> torch.Tensor:
    """Per vertex: colour distance (the last ``colour`` feature channels) to the *nearest*
    superpixel touching the image border, so a region that looks like any part of the border is
    background. Nearest rather than the border's mean colour: endoscopy frames have black corners
    and overlays on the border, and their mean matches nothing (on 60 Kvasir-SEG images the
    first-epoch pseudo-labels reach Dice 0.36 against the masks with the nearest, 0.28 with the mean)."""
    lab = graph.labels
    border = torch.unique(torch.cat([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    rgb = graph.x.detach()[:, -colour:]
    return torch.cdist(rgb, rgb[border]).min(1).values


@dataclass
class Annotation:
    """The second annotation of one weak image at training resolution."""

    target: np.ndarray  # (S, S) int8: 1 lesion, 0 background, -1 ignore
    superpixels: np.ndarray  # (S, S) superpixel ids, for reviewers' image strips
    counts: dict[str, int]  # vertices: foreground / background / ignored
    agreement: float  # Dice of the pixel head's prediction with the painted lesion (labelled pixels)


def _agreement(logits: torch.Tensor, target: torch.Tensor) -> float:
    valid = target >= 0
    pred, fg = (logits > 0) & valid, target == FOREGROUND
    total = int(pred.sum() + fg.sum())
    return 1.0 if total == 0 else float(2 * (pred & fg).sum() / total)


def vertex_scores(ranking: str, graph: Graph, pixel_logits: torch.Tensor, vertex_logits: torch.Tensor,
                  colour: int) -> torch.Tensor:
    """One image's ranking scores (higher: more lesion-like). "gcn": the GCN's vertex logit;
    "head": the pixel head's mean probability over the vertex; "gcn+head": the mean of the GCN's
    probability and the head's (both in [0, 1]), so the two rankers vote; "prior":
    ``boundary_contrast``."""
    if ranking == "prior":
        return boundary_contrast(graph, colour)
    if ranking == "gcn":
        return vertex_logits  # not its sigmoid: that saturates to ties at large logits
    gcn = torch.sigmoid(vertex_logits)
    head = gcn.new_zeros(graph.n).index_add_(
        0, graph.labels.flatten(), torch.sigmoid(pixel_logits).flatten()) / graph.area
    return head if ranking == "head" else (gcn + head) / 2


RANKINGS = ("gcn", "gcn+head", "head", "prior")


@torch.no_grad()
def annotate(model: WeakGraphModel, images: np.ndarray, ratios: Sequence[float], errors: Sequence[float],
             ranking: str, device: torch.device, batch_size: int = 8) -> list[Annotation]:
    """Rank each image's superpixels by ``ranking`` (one of ``RANKINGS``, see ``vertex_scores``),
    apply the count rule with its ratio and error, paint the result back to pixels."""
    if ranking not in RANKINGS:
        raise WeakLabelError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    model.eval()
    out: list[Annotation] = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).float().to(device)
        logits, graphs, vertex_logits = model(x)
        for i, (graph, scores) in enumerate(zip(graphs, vertex_logits.split([g.n for g in graphs]),
                                                strict=True)):
            scores = vertex_scores(ranking, graph, logits[i, 0], scores, model.colour)
            area = graph.area if model.cfg.count_by == "area" else None
            labels = vertex_labels(scores, ratios[start + i], errors[start + i], area)
            target = paint(labels, graph.labels)
            out.append(Annotation(
                target.cpu().numpy(), graph.labels.cpu().numpy(),
                {"foreground": int((labels == FOREGROUND).sum()), "background": int((labels == BACKGROUND).sum()),
                 "ignored": int((labels == IGNORED).sum())},
                _agreement(logits[i, 0], target)))
    return out


def vertex_loss(graphs: list[Graph], vertex_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Area-weighted BCE of the vertex logits against the share of lesion among each vertex's
    labelled pixels; a vertex whose pixels are mostly ignored carries no loss."""
    offsets = np.cumsum([0] + [g.n for g in graphs])
    index = torch.cat([g.labels.flatten() + int(o) for g, o in zip(graphs, offsets, strict=False)])
    t = targets.flatten()
    n = int(offsets[-1])
    labelled = torch.zeros(n, device=t.device).index_add_(0, index, (t != IGNORE).float())
    lesion = torch.zeros(n, device=t.device).index_add_(0, index, (t == FOREGROUND).float())
    area = torch.cat([g.area for g in graphs]).float()
    weight = area * (labelled >= 0.5 * area)
    if weight.sum() == 0:
        return vertex_logits.sum() * 0
    soft = lesion / labelled.clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(vertex_logits, soft, reduction="none")
    return (bce * weight).sum() / weight.sum()


class WeakTrainingSet(SegmentationDataset):
    """Fully labelled records with their masks, then weak records whose targets ``fit_weak``
    rewrites every epoch (all ignore until the first annotation). Items are (image, target,
    weight, [r, e]), r and e NaN for labelled records (no size term)."""

    def __init__(self, dataset_dir: Path, labelled: list[Record], weak: list[Record], model: Segmenter,
                 default_error: float = 0.0, augment: Strength = "none", seed: int = 0):
        if not weak:
            raise WeakLabelError("no weak records (image + area ratio) to learn from")
        missing = [r.id for r in weak if r.area_ratio is None]
        if missing:
            raise WeakLabelError(f"weak records without an area ratio: {missing[:5]}")
        size = model.image_size
        self.images = np.stack([model.prepare(load_image(dataset_dir, r))
                                for r in progress(labelled + weak, "loading")])
        self.masks = np.stack([load_target(dataset_dir, r, size) for r in labelled]
                              + [np.full((size, size), IGNORE, np.int8)] * len(weak))[:, None]
        self.weights = np.ones(len(self.images), np.float32)
        self.augmenter = Augmenter(augment, seed)
        self.weak = slice(len(labelled), len(self.images))
        self.ratios = [r.area_ratio for r in weak]
        self.errors = [default_error if r.area_error is None else r.area_error for r in weak]
        self.bands = np.full((len(self.images), 2), np.nan, np.float32)
        self.bands[self.weak] = np.stack([self.ratios, self.errors], 1)

    def __getitem__(self, i: int):
        return *super().__getitem__(i), torch.from_numpy(self.bands[i])


@dataclass
class WeakFitResult:
    annotations: list[Annotation]  # the final second annotation of every weak record
    best_epoch: int
    best_val_dice: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)
    state: dict = field(default_factory=dict)  # segmenter + GCN weights (CPU): what labelled them


def fit_weak(segmenter: Segmenter, data: WeakTrainingSet, cfg: WeakLabelConfig, train_cfg: TrainConfig, *,
             seed: int, val: SegmentationDataset | None = None, pretrained: bool = False,
             on_epoch: Callable[[dict], None] | None = None) -> WeakFitResult:
    """``cfg.epochs`` rounds of annotate → train (AdamW + one-cycle, ``train_cfg``'s batch size and
    LR). With ``val`` the weights of the best validation epoch are kept (as plain ``fit`` does).
    ``segmenter`` is trained in place and returned on the CPU in eval mode."""
    torch.manual_seed(seed)
    device = pick_device(train_cfg.device)
    model = WeakGraphModel(segmenter, cfg).to(device)
    loader = DataLoader(data, batch_size=train_cfg.batch_size, shuffle=True,
                        drop_last=len(data) > train_cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    loop = TrainingLoop(model, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                        total_steps=cfg.epochs * len(loader), max_minutes=train_cfg.max_minutes)
    weak_images = data.images[data.weak]
    history: list[dict] = []
    for epoch in range(cfg.epochs):
        ranking = cfg.rank_by if epoch else ("head" if pretrained else "prior")
        annotations = annotate(model, weak_images, data.ratios, data.errors, ranking, device, train_cfg.batch_size)
        data.masks[data.weak, 0] = np.stack([a.target for a in annotations])
        model.train()
        pixel_losses, graph_losses, size_losses = [], [], []
        for image, target, _, band in progress(loader, f"weak epoch {epoch + 1}/{cfg.epochs}"):
            image, target, band = image.to(device), target.to(device), band.to(device)
            logits, graphs, vertex_logits = model(image)
            pixel = dice_bce_loss(logits, target, dice_weight=train_cfg.dice_weight, bce_weight=train_cfg.bce_weight)
            graph = vertex_loss(graphs, vertex_logits, target)
            weak = ~band[:, 0].isnan()
            # computed even at size_weight 0: the logged penalty says how far areas leave r ± e
            size = size_loss(logits[weak], band[weak, 0], band[weak, 1]) if weak.any() else logits.new_zeros(())
            loop.step(pixel + cfg.gcn_weight * graph + cfg.size_weight * size)
            pixel_losses.append(pixel.item())
            graph_losses.append(graph.item())
            size_losses.append(size.item())
        row = {"epoch": epoch, "ranking": ranking, "pixel_loss": float(np.mean(pixel_losses)),
               "vertex_loss": float(np.mean(graph_losses)), "size_loss": float(np.mean(size_losses)),
               "seconds": loop.seconds,
               **{f"{k}_vertices": sum(a.counts[k] for a in annotations) for k in annotations[0].counts},
               "ignored_pixel_share": float(np.mean([(a.target == IGNORE).mean() for a in annotations]))}
        if val is not None:
            row["val_dice"] = validation_dice(segmenter, val, device, train_cfg.batch_size)
            loop.select(epoch, row["val_dice"])
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if loop.out_of_time():
            break
    best = (loop.best_at, loop.best_score) if val is not None else (len(history) - 1, None)
    loop.finish().to(device)  # the selected weights write the final pseudo-labels
    final = annotate(model, weak_images, data.ratios, data.errors, cfg.rank_by, device, train_cfg.batch_size)
    model.to("cpu").eval()
    return WeakFitResult(final, best[0], best[1], loop.seconds, history, model.state_dict())
