"""The benchmarks' per-scene prediction files, as Pointcept's tester writes them into its `submit/` folder.

- ScanNet and ScanNet200: one line per point, the ScanNet label id (the raw category id of the benchmark's
  class list) of the predicted class.
- ScanNet++: one line per point, the three most likely class indices, most likely first, comma-separated.
"""

from __future__ import annotations

import io

import numpy as np

SUBMISSION_DATASETS = ("scannet", "scannet200", "scannetpp")

# ScanNet's benchmark label ids of the ScanNet-20 and ScanNet200 classes, in the order of their class lists (a
# `segment20` / `segment200` label indexes them).
SCANNET20_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
# fmt: off
SCANNET200_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 26, 27, 28, 29, 31, 32, 33, 34,
    35, 36, 38, 39, 40, 41, 42, 44, 45, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 57, 58, 59, 62, 63, 64, 65, 66, 67,
    68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 82, 84, 86, 87, 88, 89, 90, 93, 95, 96, 97, 98, 99, 100,
    101, 102, 103, 104, 105, 106, 107, 110, 112, 115, 116, 118, 120, 121, 122, 125, 128, 130, 131, 132, 134, 136,
    138, 139, 140, 141, 145, 148, 154, 155, 156, 157, 159, 161, 163, 165, 166, 168, 169, 170, 177, 180, 185, 188,
    191, 193, 195, 202, 208, 213, 214, 221, 229, 230, 232, 233, 242, 250, 261, 264, 276, 283, 286, 300, 304, 312,
    323, 325, 331, 342, 356, 370, 392, 395, 399, 408, 417, 488, 540, 562, 570, 572, 581, 609, 748, 776, 1156, 1163,
    1164, 1165, 1166, 1167, 1168, 1169, 1170, 1171, 1172, 1173, 1174, 1175, 1176, 1178, 1179, 1180, 1181, 1182,
    1183, 1184, 1185, 1186, 1187, 1188, 1189, 1190, 1191,
)
# fmt: on
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
