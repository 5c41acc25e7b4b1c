"""One training sample as it travels through shards: raw file bytes in, validated arrays out.

A `SceneRecord` holds the *bytes* of every file of a sample (the `.npy` point assets, and for each camera frame its
colour image, depth image, pose, intrinsic and point-pixel correspondence), so that a round trip through parquet or
webdataset shards is byte-exact by construction. `decode_record` turns a record into the plain dict the transforms
consume, validating it on the way so that bad data fails with the sample, file and field named.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from concerto_ray.errors import DataError

SCHEMA_VERSION = 1

# Point assets that are not one value per point (Pointcept stores a scene-level pose next to the points).
SCENE_LEVEL_ASSETS = frozenset({"pose"})

FRAME_FILES = ("color", "depth", "pose", "intrinsic", "correspondence")


@dataclass
class FrameRecord:
    """One camera frame. Paths are relative to the dataset root; an absent optional file is empty bytes."""

    name: str
    color_path: str
    color: bytes
    correspondence_path: str
    correspondence: bytes
    depth: bytes = b""
    pose: bytes = b""
    intrinsic: bytes = b""


@dataclass
class SceneRecord:
    name: str  # the sample name (a key of the split file)
    split: str
    dataset: str
    source: str  # point-cloud folder, relative to the dataset root
    point_assets: dict[str, bytes]  # asset name ("coord", "color", ...) -> raw .npy file bytes
    frames: list[FrameRecord] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(map(len, self.point_assets.values())) + sum(
            len(getattr(f, k)) for f in self.frames for k in FRAME_FILES
        )


ARROW_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("split", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("point_asset_names", pa.list_(pa.string())),
        ("point_asset_npy", pa.list_(pa.large_binary())),
        ("frame_names", pa.list_(pa.string())),
        ("frame_color_paths", pa.list_(pa.string())),
        ("frame_correspondence_paths", pa.list_(pa.string())),
    ]
    + [(f"frame_{k}", pa.list_(pa.large_binary())) for k in FRAME_FILES]
)


def record_to_row(record: SceneRecord) -> dict:
    """A flat dict of columns matching `ARROW_SCHEMA`."""
    row = {
        "name": record.name,
        "split": record.split,
        "dataset": record.dataset,
        "source": record.source,
        "point_asset_names": list(record.point_assets),
        "point_asset_npy": list(record.point_assets.values()),
        "frame_names": [f.name for f in record.frames],
        "frame_color_paths": [f.color_path for f in record.frames],
        "frame_correspondence_paths": [f.correspondence_path for f in record.frames],
    }
    for key in FRAME_FILES:
        row[f"frame_{key}"] = [getattr(f, key) for f in record.frames]
    return row


def row_to_record(row: dict) -> SceneRecord:
    """Inverse of `record_to_row`; accepts lists or numpy object arrays (as Ray Data hands them out)."""
    try:
        frames = [
            FrameRecord(
                name=str(n),
                color_path=str(cp),
                correspondence_path=str(rp),
                **{k: bytes(row[f"frame_{k}"][i]) for k in FRAME_FILES},
            )
            for i, (n, cp, rp) in enumerate(
                zip(row["frame_names"], row["frame_color_paths"], row["frame_correspondence_paths"])
            )
        ]
        names, blobs = list(row["point_asset_names"]), list(row["point_asset_npy"])
    except KeyError as exc:
        raise DataError(f"shard row lacks column {exc.args[0]!r}", sample=row.get("name")) from exc
    if len(names) != len(blobs):
        raise DataError("point asset names and payloads differ in number", sample=row.get("name"))
    return SceneRecord(
        name=str(row["name"]),
        split=str(row["split"]),
        dataset=str(row["dataset"]),
        source=str(row["source"]),
        point_assets={str(k): bytes(v) for k, v in zip(names, blobs)},
        frames=frames,
    )


# numpy parses .npy headers with ast.literal_eval, which CPython 3.11 does not make thread-safe (it fails with "AST
# constructor recursion depth mismatch" when threads parse at once, as prepare's reader threads do).
_NPY_HEADER_LOCK = threading.Lock()


def load_npy(blob: bytes, *, sample: str, file: str, field: str | None = None) -> np.ndarray:
    try:
        with _NPY_HEADER_LOCK:
            return np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/EOFError/OSError depending on the damage
        raise DataError(f"not a readable .npy array ({exc})", sample=sample, file=file, field=field) from exc


def load_image(blob: bytes, *, sample: str, file: str) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises several types for truncated or foreign data
        raise DataError(f"not a readable image ({exc})", sample=sample, file=file) from exc


def image_size(blob: bytes, *, sample: str, file: str) -> tuple[int, int]:
    """(width, height) from the image header only."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.size
    except Exception as exc:
        raise DataError(f"not a readable image ({exc})", sample=sample, file=file) from exc


def check_points(arrays: dict[str, np.ndarray], *, sample: str, source: str) -> int:
    """Validate point assets; returns the point count."""
    if "coord" not in arrays:
        raise DataError("the point cloud has no coord.npy", sample=sample, file=source, field="coord")
    coord = arrays["coord"]
    where = dict(sample=sample, file=f"{source}/coord.npy", field="coord")
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise DataError(f"expected shape (N, 3), got {coord.shape}", **where)
    n = coord.shape[0]
    if n == 0:
        raise DataError("the point cloud has zero points", **where)
    if not np.issubdtype(coord.dtype, np.number):
        raise DataError(f"expected a numeric array, got dtype {coord.dtype}", **where)
    bad = ~np.isfinite(coord).all(axis=1)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} of {n} points have NaN/inf coordinates (first at index {int(np.flatnonzero(bad)[0])})",
            **where,
        )
    for key, value in arrays.items():
        if key in SCENE_LEVEL_ASSETS or key == "coord":
            continue
        where = dict(sample=sample, file=f"{source}/{key}.npy", field=key)
        if value.ndim == 0 or value.shape[0] != n:
            raise DataError(f"has {value.shape[0] if value.ndim else 'no'} rows but coord has {n} points", **where)
        if is_label_asset(key):
            primary_labels(value, **where)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise DataError("contains NaN/inf values", **where)
    return n


def is_label_asset(key: str) -> bool:
    """Per-point label arrays: segment, segment20, segment200 and instance."""
    return key.startswith("segment") or key == "instance"


def primary_labels(labels: np.ndarray, *, sample: str, file: str, field: str) -> np.ndarray:
    """The one label per point of a label array, as int32.

    The flavours (see `flavors.py`) store labels as (N,) (ScanNet, HM3D), (N, 1) (S3DIS, Structured3D) or (N, 3)
    (ScanNet++: up to three labels per point, the major one first, and Pointcept's ScanNet++ dataset uses column 0).
    Any other shape is an error: flattening it would hand points the labels of other points. So is a float array:
    every flavour stores class indices as integers, and a cast would turn fractions into other classes.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"label array of dtype {labels.dtype}: expected integer class indices",
            sample=sample,
            file=file,
            field=field,
        )
    if labels.ndim == 1:
        return labels.astype(np.int32)
    if labels.ndim == 2 and labels.shape[1] in (1, 3):
        return labels[:, 0].astype(np.int32)
    raise DataError(
        f"label array of shape {labels.shape}: expected (N,), (N, 1) or (N, 3) (ScanNet++'s three labels per point)",
        sample=sample,
        file=file,
        field=field,
    )


def check_correspondence(
    corr: np.ndarray, num_points: int, width: int, height: int, *, sample: str, file: str
) -> np.ndarray:
    """Validate one frame's (M, 3) [pixel_x, pixel_y, point_index] table; returns it as float32.

    Pointcept marks a frame that sees no point with the single row (-1, -1, -1).
    """
    where = dict(sample=sample, file=file, field="correspondence")
    if corr.ndim != 2 or corr.shape[1] != 3:
        raise DataError(f"expected shape (M, 3) [pixel_x, pixel_y, point_index], got {corr.shape}", **where)
    if corr.shape == (1, 3) and np.all(corr == -1):
        return corr.astype(np.float32)
    if not np.isfinite(corr).all():
        raise DataError("contains NaN/inf values", **where)
    index = corr[:, 2]
    bad = (index < 0) | (index >= num_points) | (index != np.round(index))
    if bad.any():
        raise DataError(
            f"point index {index[bad][0]:g} is out of range for a cloud of {num_points} points "
            f"({int(bad.sum())} bad rows)",
            **where,
        )
    x, y = corr[:, 0], corr[:, 1]
    bad = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if bad.any():
        raise DataError(
            f"pixel ({x[bad][0]:g}, {y[bad][0]:g}) lies outside the {width}x{height} image ({int(bad.sum())} bad rows)",
            **where,
        )
    return corr.astype(np.float32)


def decode_record(
    record: SceneRecord, *, segment_asset: str | None = None, with_frames: bool = True, require_labels: bool = False
) -> dict:
    """Decode and validate a record into the dict the transforms consume.

    Returns Pointcept's raw-sample keys (`coord`, `color`, `normal` as float32, `segment`, `instance` as int32, one
    label per point as `primary_labels` picks it, every other point asset as stored) plus, with frames,
    `frames_color` (uint8 HxWx3 per frame) and `frames_correspondence` (float32 Mx3 per frame). `segment_asset`
    picks the label array (`flavors.label_asset`: "segment20" for ScanNet, "segment200" for ScanNet200); by default
    `segment` if present, else `segment20`.
    Without labels, `segment` is all -1 (ignored), which suits pre-training; `require_labels` makes a missing label
    array an error instead (segmentation must not train on silently unlabelled scenes).
    """
    sample, source = record.name, record.source
    arrays = {k: load_npy(v, sample=sample, file=f"{source}/{k}.npy") for k, v in record.point_assets.items()}
    n = check_points(arrays, sample=sample, source=source)
    data = dict(arrays)
    data["name"] = sample
    data["split"] = record.split
    for key in ("coord", "color", "normal"):
        if key in data:
            data[key] = data[key].astype(np.float32)
    required = require_labels or segment_asset is not None
    if segment_asset is None:
        segment_asset = "segment" if "segment" in arrays else "segment20"
    if required and segment_asset not in arrays:
        raise DataError(
            f"the label array {segment_asset}.npy is missing (have: {', '.join(sorted(arrays))})",
            sample=sample,
            file=source,
            field=segment_asset,
        )
    for key, asset in (("segment", segment_asset), ("instance", "instance")):
        data[key] = (
            primary_labels(arrays[asset], sample=sample, file=f"{source}/{asset}.npy", field=asset)
            if asset in arrays
            else np.full(n, -1, dtype=np.int32)
        )
    if with_frames:
        colors, corrs = [], []
        for frame in record.frames:
            image = load_image(frame.color, sample=sample, file=frame.color_path)
            corr = load_npy(frame.correspondence, sample=sample, file=frame.correspondence_path)
            corrs.append(
                check_correspondence(
                    corr, n, image.shape[1], image.shape[0], sample=sample, file=frame.correspondence_path
                )
            )
            colors.append(image)
        data["frames_color"] = colors
        data["frames_correspondence"] = corrs
    return data
