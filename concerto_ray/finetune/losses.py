"""Segmentation losses of the Concerto semseg configs: cross-entropy plus multiclass Lovasz-softmax.

Both skip points labelled `ignore_index`. A batch without any labelled point (possible when only a few points
per scene are annotated and a crop misses them all) gives a zero loss that keeps the graph, not NaN.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Multiclass Lovasz-softmax (Berman et al., 2018) over the classes present in `target`.

    For each present class, the per-point errors |1[target == c] - p_c| are sorted in decreasing order and
    weighted by the gradient of the Lovasz extension of the Jaccard loss; the result is averaged over classes.
    All present classes are handled at once: one sort of the (points, classes) errors along the points."""
    valid = target != ignore_index
    probs = logits.float().softmax(dim=1)[valid]
    target = target[valid]
    if target.numel() == 0:
        return logits.sum() * 0.0
    classes = target.unique()
    foreground = (target[:, None] == classes[None, :]).float()
    errors = (foreground - probs[:, classes]).abs()
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    per_class = (errors_sorted * _jaccard_gradient(foreground.gather(0, order))).sum(dim=0)
    return per_class.mean()


def _jaccard_gradient(foreground_sorted: torch.Tensor) -> torch.Tensor:
    """Increments of 1 - IoU as the points, in sorted order (dim 0), are predicted as the class one after
    another; one column per class."""
    total = foreground_sorted.sum(dim=0)
    intersection = total - foreground_sorted.cumsum(dim=0)
    union = total + (1.0 - foreground_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class SegmentationLoss(nn.Module):
    """ce_weight * cross-entropy + lovasz_weight * Lovasz-softmax."""

    def __init__(self, ce_weight: float = 1.0, lovasz_weight: float = 1.0, ignore_index: int = -1):
        super().__init__()
        self.ce_weight = ce_weight
        self.lovasz_weight = lovasz_weight
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_softmax(logits, target, self.ignore_index)
        return loss
