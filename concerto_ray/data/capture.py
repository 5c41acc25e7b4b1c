"""Own RGB-D captures -> Pointcept's processed layout, one scene at a time (`ingest --adapter capture`).

The capture folder format, which any capture tool can write (a phone or RGB-D camera app, a SLAM system's export):

    SRC/<split>/<scene>/                 (or SRC/<scene>/ with --split NAME)
        color/<frame>.jpg|.png           RGB images; <frame> is any name, frames are ordered by natural sort
        depth/<frame>.png                uint16 depth registered to the colour image (same size); 0 = no reading
        pose/<frame>.txt|.npy            4x4 camera-to-world, OpenCV camera axes (x right, y down, z forward), metres
        intrinsic.txt|.npy               the colour camera's 3x3 (or 4x4) K; or intrinsic/<frame>.txt|.npy per frame
        cloud.ply|.las|.laz|.npy|.npz    optional: the scene's point cloud (read as `ingest` reads plain clouds);
                                         without it, one is fused from the kept frames' depth
        capture.json                     optional: {"depth_scale": 1000.0, "voxel_size": 0.01, "max_depth": 10.0}

  -> OUT/<split>/<scene>/{coord,color[,normal][,segment]}.npy
     OUT/images/<split>/<scene>/color/<frame>.<ext> (the bytes as captured), pose/<frame>.npy, intrinsic/<frame>.npy,
                               correspondence/<frame>.npy, depth/<frame>.png (uint16 millimetres, with depth=True)

Every `frame_skip`-th frame is kept. Depth is `depth_scale` units per metre (1000: millimetres); readings beyond
`max_depth` metres are dropped. Correspondences follow the reference's rule for ScanNet and S3DIS with the
capture's own depth in place of a mesh cast: each pixel with depth is lifted to 3-D and corresponds to the nearest
cloud point when that point is within 1 cm. A fused cloud is the kept frames' lifted pixels averaged per
`voxel_size` cell (coordinates and colours); it has no normals, and none are made up.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from concerto_ray.data.correspondence import lift_pixels, nearest_point_correspondences
from concerto_ray.data.point_files import POINT_FILE_SUFFIXES, read_point_file
from concerto_ray.errors import ConfigError, DataError

SETTINGS_FILE = "capture.json"
COLOR_SUFFIXES = (".jpg", ".jpeg", ".png")
MATRIX_SUFFIXES = (".txt", ".npy")


@dataclass(frozen=True)
class CaptureSettings:
    depth_scale: float = 1000.0  # depth PNG units per metre
    voxel_size: float = 0.01  # metres: the cell a fused cloud averages over
    max_depth: float = 10.0  # metres: farther readings are dropped


def list_captures(src: Path, split: str | None) -> list[tuple[str, str, Path]]:
    """(split, scene, folder) of every capture: SRC/<split>/<scene>/color/, or SRC/<scene>/color/ as `split`."""
    if not src.is_dir():
        raise ConfigError(f"src: {src} is not a folder")
    parents = [(split, src)] if split is not None else [(p.name, p) for p in sorted(src.iterdir()) if p.is_dir()]
    found = [(name, p.name, p) for name, parent in parents for p in sorted(parent.iterdir()) if (p / "color").is_dir()]
    if not found:
        layout = f"{src}/<scene>/color/" if split is not None else f"{src}/<split>/<scene>/color/"
        raise ConfigError(f"src: no capture folders as {layout} (see `concerto-ray ingest --help`)")
    return found


class CaptureScene:
    """One capture folder -> its processed files under OUT (frames first, coord.npy last). Picklable."""

    def __init__(self, out, labels: bool, frame_skip: int, depth: bool, device: str):
        self.out, self.labels, self.frame_skip, self.depth, self.device = out, labels, frame_skip, depth, device

    def convert(self, split: str, scene: str, folder: Path) -> dict:
        settings = _settings(folder)
        frames = _frames(folder)[:: self.frame_skip]
        cloud_file = next((p for p in sorted(folder.glob("cloud.*")) if p.suffix.lower() in POINT_FILE_SUFFIXES), None)
        if cloud_file is not None:
            cloud = read_point_file(cloud_file, self.labels)
            if any(cloud.shift):  # a georeferenced cloud was moved near the origin: the poses are not
                raise DataError(f"the cloud is georeferenced (coordinates near {cloud.shift}); give it in the poses' "
                                "frame", file=str(cloud_file))  # fmt: skip
            arrays = cloud.arrays
        else:
            arrays = _fuse(folder, frames, settings)
        images = f"images/{split}/{scene}"
        search = None if self.device == "cpu" else self.device  # scipy's k-d tree on the CPU, torch on a GPU
        for name in frames:  # one frame in memory at a time (a fused cloud read them once before)
            view = _read_view(folder, name, settings)
            stem = Path(view.name).stem
            self.out.write_bytes(f"{images}/color/{view.name}", view.color_bytes)
            if self.depth:
                self.out.write_png(f"{images}/depth/{stem}.png", np.round(view.depth * 1000).astype(np.uint16))
            self.out.write_npy(f"{images}/pose/{stem}.npy", view.pose)
            self.out.write_npy(f"{images}/intrinsic/{stem}.npy", view.intrinsic)
            table = nearest_point_correspondences(arrays["coord"], view.depth, view.intrinsic, view.pose, device=search)
            self.out.write_npy(f"{images}/correspondence/{stem}.npy", table)
        for key in sorted(arrays, key=lambda k: k == "coord"):  # coord.npy last
            self.out.write_npy(f"{split}/{scene}/{key}.npy", arrays[key])
        return {"points": len(arrays["coord"]), "arrays": sorted(arrays), "frames": frames}


@dataclass
class _View:
    name: str  # the colour file's name
    color_bytes: bytes
    color: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray  # float32 metres (H, W), 0 = none
    pose: np.ndarray  # float32 4x4
    intrinsic: np.ndarray  # float32 3x3 or 4x4


def _settings(folder: Path) -> CaptureSettings:
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return CaptureSettings()
    try:
        values = json.loads(path.read_text())
        known = {f.name for f in fields(CaptureSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(known)}")
        settings = CaptureSettings(**{k: float(v) for k, v in values.items()})
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"not valid capture settings: {exc}", file=str(path)) from exc
    if min(settings.depth_scale, settings.voxel_size, settings.max_depth) <= 0:
        raise DataError(f"depth_scale, voxel_size and max_depth must be positive: {settings}", file=str(path))
    return settings


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _frames(folder: Path) -> list[str]:
    names = [p.name for p in (folder / "color").iterdir() if p.suffix.lower() in COLOR_SUFFIXES]
    if not names:
        raise DataError(f"no colour images ({', '.join(COLOR_SUFFIXES)})", file=str(folder / "color"))
    stems = [Path(n).stem for n in names]
    if len(set(stems)) < len(stems):
        raise DataError("two colour images share a frame name", file=str(folder / "color"))
    return sorted(names, key=_natural_key)


def _matrix(candidates: list[Path], what: str, shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"missing: the frame's {what}", file=str(candidates[0]))
    try:
        matrix = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as exc:
        raise DataError(f"not a {what} matrix: {exc}", file=str(path)) from exc
    if matrix.shape not in shapes:
        raise DataError(f"a {what} is {' or '.join(f'{a}x{b}' for a, b in shapes)}, not {matrix.shape}", file=str(path))
    return matrix.astype(np.float32)


def _read_view(folder: Path, name: str, settings: CaptureSettings) -> _View:
    from PIL import Image

    stem = Path(name).stem
    color_path, depth_path = folder / "color" / name, folder / "depth" / f"{stem}.png"
    color_bytes = color_path.read_bytes()
    try:
        color = np.asarray(Image.open(io.BytesIO(color_bytes)).convert("RGB"))
    except OSError as exc:
        raise DataError(f"not an image: {exc}", file=str(color_path)) from exc
    if not depth_path.is_file():
        raise DataError("missing: every kept frame needs its depth image", file=str(depth_path))
    try:
        raw = np.asarray(Image.open(depth_path))
    except OSError as exc:
        raise DataError(f"not an image: {exc}", file=str(depth_path)) from exc
    if raw.shape != color.shape[:2]:
        sizes = f"depth is {raw.shape[1]}x{raw.shape[0]} but the colour image is {color.shape[1]}x{color.shape[0]}"
        raise DataError(f"{sizes}: depth must be registered to the colour camera", file=str(depth_path))
    depth = raw.astype(np.float32) / np.float32(settings.depth_scale)
    depth[depth > settings.max_depth] = 0
    pose = _matrix([folder / "pose" / f"{stem}{s}" for s in MATRIX_SUFFIXES], "camera-to-world pose", ((4, 4),))
    per_frame = [folder / "intrinsic" / f"{stem}{s}" for s in MATRIX_SUFFIXES]
    intrinsic = _matrix(per_frame + [folder / f"intrinsic{s}" for s in MATRIX_SUFFIXES], "intrinsic", ((3, 3), (4, 4)))
    return _View(name, color_bytes, color, depth, pose, intrinsic)


def _fuse(folder: Path, frames: list[str], settings: CaptureSettings) -> dict[str, np.ndarray]:
    """The frames' lifted pixels averaged per voxel: coord float32, color uint8. Frames are read one at a time into
    running per-voxel sums, so memory follows the scene's surface, not its frame count."""
    cells = np.empty((0, 3), dtype=np.int64)
    sums = np.empty((0, 6))  # x, y, z, r, g, b
    counts = np.empty(0)
    for name in frames:
        view = _read_view(folder, name, settings)
        if not np.isfinite(view.pose).all():
            continue
        pixel, world = lift_pixels(view.depth, view.intrinsic, view.pose)
        color = view.color[pixel[:, 1].astype(np.int64), pixel[:, 0].astype(np.int64)]
        merged = np.concatenate([cells, np.floor(world / settings.voxel_size).astype(np.int64)])
        values = np.concatenate([sums, np.column_stack([world, color]).astype(np.float64)])
        cells, inverse = np.unique(merged, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        sums = np.stack([np.bincount(inverse, values[:, i], len(cells)) for i in range(6)], axis=1)
        counts = np.bincount(inverse, np.concatenate([counts, np.ones(len(world))]), len(cells))
    if not len(cells):
        raise DataError("no depth readings in the kept frames to fuse a cloud from (and no cloud.* file)")
    mean = sums / counts[:, None]
    return {"coord": mean[:, :3].astype(np.float32), "color": np.round(mean[:, 3:]).astype(np.uint8)}
