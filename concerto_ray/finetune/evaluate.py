"""Evaluation as the reference does it: a validation pass every round, the full test protocol at the end.

- Validation (Pointcept's SemSegEvaluator): each scene goes through the validation transform once (voxelised, with
  the inverse mapping); the prediction of every voxel's point is given to all raw points of the voxel and scored
  against the raw labels.
- Test (Pointcept's SemSegTester): every test-time augmentation pass is voxelised into fragments that together
  cover each point (`semseg_test_fragments`); each fragment goes through the model alone, and its class
  probabilities (softmax) are summed onto the points through the fragment's `index`. The prediction is the argmax
  of the sum; where the config pre-samples the scene (ScanNet++, S3DIS), it is mapped back to every raw point.

Both return confusion matrices, which add up over scenes and over workers; the metrics are computed once from
the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from concerto_ray.data.collate import collate_semseg
from concerto_ray.data.presets import semseg_test_fragments
from concerto_ray.errors import DataError
from concerto_ray.finetune.configs import FinetuneConfig
from concerto_ray.finetune.metrics import (
    SegMetrics,
    confusion_matrix,
    segmentation_metrics,
)
from concerto_ray.finetune.submission import ranked_classes, submission_text

LABEL_KEYS = ("segment", "origin_segment", "inverse")  # what the model must not see (it would compute a loss)


@torch.no_grad()
def scene_probabilities(model: nn.Module, data: dict, cfg: FinetuneConfig) -> tuple[torch.Tensor, dict]:
    """(points, classes) summed softmax over all augmentation passes and fragments, on the CPU, and the test
    sample (`semseg_test_fragments`) whose points they are: the raw points, or the pre-sampled ones.

    `data` is a decoded scene (`name`, `coord`, `color`, optional `normal`, `segment`). The model runs in eval
    mode (its own mode is restored afterwards) and must return {"seg_logits": ...} for an offset-batched
    fragment."""
    sample = semseg_test_fragments(data, cfg.transform)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # Votes stay on the model's device and come back once per scene: no host sync per fragment.
        votes = torch.zeros(len(sample["segment"]), cfg.num_classes, device=device)
        for fragment in sample.pop("fragment_list"):
            batch = {key: value.to(device) for key, value in collate_semseg([fragment]).items()}
            votes.index_add_(0, batch["index"], model(batch)["seg_logits"].float().softmax(dim=-1))
    finally:
        model.train(was_training)
    votes = votes.cpu()
    uncovered = int((votes.sum(dim=1) == 0).sum())
    if uncovered:
        raise DataError(f"{uncovered} of {len(votes)} points are in no test fragment", sample=str(data["name"]))
    return votes, sample


def ranked_scene_classes(model: nn.Module, data: dict, cfg: FinetuneConfig, k: int = 1) -> np.ndarray:
    """The `k` most likely classes of every raw point of the scene, most likely first, (points, k) int64."""
    votes, sample = scene_probabilities(model, data, cfg)
    # k = 1 as the reference's argmax (its first maximum on a tie); more as its topk
    ranked = (votes.argmax(dim=1, keepdim=True) if k == 1 else votes.topk(k, dim=1).indices).numpy()
    return ranked[sample["inverse"]] if "inverse" in sample else ranked


def evaluate_scene(model: nn.Module, data: dict, cfg: FinetuneConfig) -> np.ndarray:
    """Predicted class of every raw point of the scene, (points,) int64."""
    return ranked_scene_classes(model, data, cfg)[:, 0]


def protocol_confusion(
    model: nn.Module,
    scenes: Iterable[dict],
    cfg: FinetuneConfig,
    write_submission: Callable[[str, str], None] | None = None,
) -> np.ndarray:
    """The test protocol's confusion matrix over decoded full-resolution `scenes`; with `write_submission`
    (name, text), each scene's benchmark prediction file (`submission.submission_text`) is handed to it too."""
    confusion = np.zeros((cfg.num_classes, cfg.num_classes), dtype=np.int64)
    k = ranked_classes(cfg.dataset) if write_submission is not None else 1
    for data in scenes:
        ranked = ranked_scene_classes(model, data, cfg, k)
        if write_submission is not None:
            write_submission(str(data["name"]), submission_text(cfg.dataset, ranked))
        confusion += confusion_matrix(ranked[:, 0], data["segment"], cfg.num_classes, cfg.ignore_index)
    return confusion


def evaluate(model: nn.Module, scenes: Iterable[dict], cfg: FinetuneConfig) -> SegMetrics:
    """The test protocol's metrics over decoded full-resolution `scenes`."""
    return segmentation_metrics(protocol_confusion(model, scenes, cfg))


@torch.no_grad()
def validation_confusion(model: nn.Module, samples: Iterable[dict], cfg: FinetuneConfig) -> np.ndarray:
    """The validation pass's confusion matrix over samples of the validation transform (`semseg_val_transform`:
    voxelised, with `inverse` and the raw `origin_segment`)."""
    device = next(model.parameters()).device
    confusion = np.zeros((cfg.num_classes, cfg.num_classes), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            inputs = {key: value for key, value in sample.items() if key not in LABEL_KEYS}
            batch = {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in collate_semseg([inputs]).items()
            }
            pred = model(batch)["seg_logits"].argmax(dim=1).cpu().numpy()
            confusion += confusion_matrix(
                pred[np.asarray(sample["inverse"])], sample["origin_segment"], cfg.num_classes, cfg.ignore_index
            )
    finally:
        model.train(was_training)
    return confusion
