"""The ScanNet-20 benchmark classes; a `segment20` label is an index into `SCANNET20_CLASSES`."""

from __future__ import annotations

# Order and spelling ("refridgerator") follow Pointcept's ScanNet configs, so class ids and names
# line up with checkpoints and metrics produced there.
SCANNET20_CLASSES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "desk",
    "curtain",
    "refridgerator",
    "shower curtain",
    "toilet",
    "sink",
    "bathtub",
    "otherfurniture",
)

IGNORE_INDEX = -1  # label of unannotated points, in segment20 and in instance


def class_id(name: str) -> int:
    """ScanNet-20 id of the class called `name`."""
    try:
        return SCANNET20_CLASSES.index(name)
    except ValueError:
        raise ValueError(f"{name!r} is not a ScanNet-20 class; known: {', '.join(SCANNET20_CLASSES)}") from None


# ScanNet's benchmark label ids of the ScanNet-20 and ScanNet200 classes, in the order of their class lists: a
# `segment20` label indexes SCANNET20_IDS (the NYU40 ids), a `segment200` label SCANNET200_IDS (the raw category ids
# of ScanNet's label map); the raw-data preprocessing maps labels to these indices, benchmark files map them back.
SCANNET20_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
# fmt: off
SCANNET200_IDS: tuple[int, ...] = (
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
