"""The reference's test protocol (Pointcept's SemSegTester) for full-resolution scenes.

Per scene: every test-time augmentation pass is voxelised into fragments that together cover each point
(`semseg_test_fragments`); each fragment goes through the model alone, and its class probabilities (softmax) are
summed onto the original points through the fragment's `index`. The prediction is the argmax of the sum, and
the metrics come from the confusion matrix summed over scenes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from concerto_ray.data.collate import collate_semseg
from concerto_ray.data.presets import semseg_test_fragments
from concerto_ray.errors import DataError
from concerto_ray.finetune.configs import FinetuneConfig
from concerto_ray.finetune.metrics import SegMetrics, confusion_matrix, segmentation_metrics


@torch.no_grad()
def scene_probabilities(model: nn.Module, data: dict, cfg: FinetuneConfig) -> torch.Tensor:
    """(points, classes) summed softmax over all augmentation passes and fragments, on the CPU.

    `data` is a decoded scene (`name`, `coord`, `color`, optional `normal`, `segment`). The model runs in eval
    mode (its own mode is restored afterwards) and must return {"seg_logits": ...} for an offset-batched
    fragment."""
    was_training = model.training
    model.eval()
    try:
        votes = _summed_probabilities(model, data, cfg)
    finally:
        model.train(was_training)
    uncovered = int((votes.sum(dim=1) == 0).sum())
    if uncovered:
        raise DataError(f"{uncovered} of {len(votes)} points are in no test fragment", sample=str(data["name"]))
    return votes


def _summed_probabilities(model: nn.Module, data: dict, cfg: FinetuneConfig) -> torch.Tensor:
    device = next(model.parameters()).device
    sample = semseg_test_fragments(data, cfg.transform)
    # Votes stay on the model's device and come back once per scene: no host sync per fragment.
    votes = torch.zeros(len(sample["segment"]), cfg.num_classes, device=device)
    for fragment in sample["fragment_list"]:
        batch = {key: value.to(device) for key, value in collate_semseg([fragment]).items()}
        votes.index_add_(0, batch["index"], model(batch)["seg_logits"].float().softmax(dim=-1))
    return votes.cpu()


def evaluate_scene(model: nn.Module, data: dict, cfg: FinetuneConfig) -> np.ndarray:
    """Predicted class of every point of the scene, (points,) int64."""
    return scene_probabilities(model, data, cfg).argmax(dim=1).numpy()


def evaluate(model: nn.Module, samples: Iterable[dict], cfg: FinetuneConfig) -> SegMetrics:
    """Metrics over all scenes of `samples`; `SegMetrics.confusion` can be summed across workers."""
    confusion = np.zeros((cfg.num_classes, cfg.num_classes), dtype=np.int64)
    for data in samples:
        pred = evaluate_scene(model, data, cfg)
        confusion += confusion_matrix(pred, data["segment"], cfg.num_classes, cfg.ignore_index)
    return segmentation_metrics(confusion)
