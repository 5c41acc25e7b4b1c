"""The dataset flavours: each dataset's processed files as Pointcept's Concerto preprocessing writes them.

Every flavour shares the layout that `layout.py` reads (split files, one folder of `.npy` point assets per scene, an
image folder per scene or camera); they differ in the facts below, which the synthetic writer (`synth.py`) follows
and the loader relies on. Sources: `pointcept/datasets/preprocessing/concerto/<dataset>/{preprocess_*,splits}.py`
for the files, `pointcept/datasets/{scannet,scannetpp,s3dis,hm3d,structure3d}.py` for how they are read back.

    flavour       splits                     labels (semseg)                          intrinsics per
    scannet       train, val, test           segment20.npy  int64 (N,)   20 classes   scene  (intrinsic/intrinsic.npy)
    scannet200    (the same files)           segment200.npy int64 (N,)  200 classes   scene
    scannetpp     train, val, test           segment.npy    int16 (N, 3) 100 classes  frame  (intrinsic/<index>.npy)
    s3dis         Area_1 .. Area_6           segment.npy    int16 (N, 1)  13 classes  frame  (intrinsic/<index>.npy)
    arkitscenes   Training, Validation       none                                     frame  (intrinsic/<frame>.npy)
    hm3d          train, val                 segment.npy    int16 (N,)    40 classes  dataset (images/intrinsic/K.npy)
    structured3d  train, val                 segment.npy    int16 (N, 1)  25 classes  frame  (intrinsic/<index>.npy)
    re10k         train, test                none; points lifted from the video frames  frame  (intrinsic/<index>.npy)

Labels are class indices with -1 for "ignore"; `test` splits carry no labels. ScanNet++ keeps up to three labels
per point (its overlapping annotations, the major one first); Pointcept's ScanNet++ dataset reads column 0, and so
do we (`record.primary_labels`); its fine-tuning trains on a chunked copy of the train split
(SCANNETPP_CHUNK_SPLIT). "<index>" is the frame's position among its folder's colour images in split-file
order (the preprocessing numbers pose and intrinsic files that way when the images keep their camera names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from concerto_ray.errors import ConfigError

IGNORE_INDEX = -1

# ScanNet++'s fine-tuning trains on chunks of the train scenes, written by Pointcept's
# preprocessing/sampling_chunking_data.py (--grid_size 0.01, 6 x 6 m chunks every 3 m) as a plain split folder.
SCANNETPP_CHUNK_SPLIT = "train_grid1mm_chunk6x6_stride3x3"


@dataclass(frozen=True)
class Flavor:
    name: str
    splits: tuple[str, ...]  # split names, as the preprocessing and its splits.py write them
    unlabelled_splits: tuple[str, ...]  # splits written without label arrays
    label_asset: str | None  # the point asset Pointcept's segmentation dataset reads as `segment`
    label_columns: int  # label arrays are (N,) for 0, else (N, label_columns); column 0 is the label
    num_classes: int
    intrinsics: Literal["scene", "frame", "dataset"]  # one intrinsic file per scene, per frame, or per dataset
    # Segmentation names a scene "<split>-<folder>" (S3DIS's `get_data_name`: rooms such as office_1 recur in every
    # area), else after its folder.
    split_in_scene_name: bool = False
    # Segmentation lists only the scene folders that hold the label array (HM3DDataset's force_label).
    labelled_scenes_only: bool = False

    def scene_name(self, split: str, folder: str) -> str:
        return f"{split}-{folder}" if self.split_in_scene_name else folder


FLAVORS: dict[str, Flavor] = {
    f.name: f
    for f in (
        Flavor("scannet", ("train", "val", "test"), ("test",), "segment20", 0, 20, "scene"),
        Flavor("scannet200", ("train", "val", "test"), ("test",), "segment200", 0, 200, "scene"),
        Flavor("scannetpp", ("train", "val", "test"), ("test",), "segment", 3, 100, "frame"),
        Flavor("s3dis", tuple(f"Area_{i}" for i in range(1, 7)), (), "segment", 1, 13, "frame", True),
        Flavor("arkitscenes", ("Training", "Validation"), ("Training", "Validation"), None, 0, 0, "frame"),
        Flavor("hm3d", ("train", "val"), (), "segment", 0, 40, "dataset", labelled_scenes_only=True),
        Flavor("structured3d", ("train", "val"), (), "segment", 1, 25, "frame"),
        Flavor("re10k", ("train", "test"), ("train", "test"), None, 0, 0, "frame"),
    )
}


def flavor(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset flavour {name!r}; known: {', '.join(FLAVORS)}") from None


def label_asset(dataset: str) -> str:
    """The label array that segmentation on `dataset` trains on (ScanNet200 reads segment200, not segment20)."""
    asset = flavor(dataset).label_asset
    if asset is None:
        raise ConfigError(f"dataset {dataset!r} has no semantic labels to train segmentation on")
    return asset
