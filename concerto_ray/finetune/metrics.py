"""Semantic segmentation metrics from a confusion matrix, as Pointcept's SemSegTester reports them.

Confusion matrices are additive: accumulate one per scene (or per worker) by summing, then compute the metrics
once. Rows are ground-truth classes, columns predicted classes; points labelled `ignore_index` are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concerto_ray.errors import DataError

EPS = 1e-10  # the reference's guard against empty classes: an absent class scores 0, and counts in the means


@dataclass
class SegMetrics:
    miou: float  # mean over all classes of intersection / union
    macc: float  # mean over all classes of per-class recall
    all_acc: float  # correctly labelled points / labelled points
    iou: np.ndarray  # (classes,)
    acc: np.ndarray  # (classes,)
    confusion: np.ndarray  # (classes, classes) int64, rows = target, columns = prediction


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = -1) -> np.ndarray:
    """(num_classes, num_classes) int64 counts of (target, pred) pairs over the points not labelled ignore_index."""
    pred = np.asarray(pred).reshape(-1)
    target = np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise DataError(f"prediction has {pred.size} points but the labels have {target.size}", field="segment")
    keep = target != ignore_index
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, values in (("segment", target), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise DataError(
                f"holds class ids outside [0, {num_classes}) other than ignore_index={ignore_index}: "
                f"{sorted(set(values[(values < 0) | (values >= num_classes)].tolist()))[:5]}",
                field=name,
            )
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> SegMetrics:
    confusion = np.asarray(confusion, dtype=np.int64)
    intersection = np.diag(confusion).astype(np.float64)
    target = confusion.sum(axis=1).astype(np.float64)
    union = target + confusion.sum(axis=0) - intersection
    iou = intersection / (union + EPS)
    acc = intersection / (target + EPS)
    return SegMetrics(
        miou=float(iou.mean()),
        macc=float(acc.mean()),
        all_acc=float(intersection.sum() / (target.sum() + EPS)),
        iou=iou,
        acc=acc,
        confusion=confusion,
    )


def per_class_table(metrics: SegMetrics, class_names: tuple[str, ...] | list[str]) -> str:
    """A plain-text table: one row per class (id, name, IoU, accuracy, labelled points), then the summary."""
    if len(class_names) != len(metrics.iou):
        raise ValueError(f"{len(class_names)} class names for {len(metrics.iou)} classes")
    width = max(len("class"), *(len(name) for name in class_names))
    points = metrics.confusion.sum(axis=1)
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'points':>10}"]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>3}  {name:<{width}}  {metrics.iou[i]:6.4f}  {metrics.acc[i]:6.4f}  {points[i]:>10d}")
    lines.append(f"mIoU {metrics.miou:.4f}  mAcc {metrics.macc:.4f}  allAcc {metrics.all_acc:.4f}")
    return "\n".join(lines)


def save_confusion_png(confusion: np.ndarray, class_names: tuple[str, ...] | list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (each ground-truth class sums to 1) as a PNG image."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), labels=class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), labels=class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
