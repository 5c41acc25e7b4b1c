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
