"""The benchmarks' per-scene prediction files, as Pointcept's tester writes them into its `submit/` folder.

- ScanNet and ScanNet200: one line per point, the ScanNet label id (the raw category id of the benchmark's
  class list) of the predicted class.
- ScanNet++: one line per point, the three most likely class indices, most likely first, comma-separated.
"""

from __future__ import annotations

import io

import numpy as np

from concerto_ray.data.scannet_classes import SCANNET20_IDS, SCANNET200_IDS

SUBMISSION_DATASETS = ("scannet", "scannet200", "scannetpp")

_LABEL_IDS = {"scannet": SCANNET20_IDS, "scannet200": SCANNET200_IDS}


def ranked_classes(dataset: str) -> int:
    """How many classes of each point, most likely first, the benchmark's file takes."""
    return 3 if dataset == "scannetpp" else 1


def submission_text(dataset: str, ranked: np.ndarray) -> str:
    """The prediction file of one scene; `ranked`: (points, `ranked_classes(dataset)`) class indices, most likely
    first."""
    if ranked.ndim != 2 or ranked.shape[1] != ranked_classes(dataset):
        raise ValueError(f"{dataset}: expected (points, {ranked_classes(dataset)}) class indices, got {ranked.shape}")
    text = io.StringIO()
    if dataset == "scannetpp":
        np.savetxt(text, ranked.astype(np.int32), delimiter=",", fmt="%d")
    else:
        np.savetxt(text, np.asarray(_LABEL_IDS[dataset])[ranked[:, :1]], fmt="%d")
    return text.getvalue()
