"""The raw ScanNet v2 download -> Pointcept's processed Concerto layout for ScanNet, one scene at a time.

    SRC/scans/<scene>/<scene>.sens                      RGB-D stream (ScanNet's SensorData format, version 4)
                     /<scene>_vh_clean_2.ply            the mesh: its vertices are the point cloud
                     /<scene>_vh_clean_2.0.010000.segs.json, <scene>.aggregation.json   (labels; not in scans_test)
    SRC/scans_test/<scene>/...                          test scenes (no labels)
    SRC/scannetv2-labels.combined.tsv                   raw category -> nyu40id / id
    SRC/scannetv2_train.txt, scannetv2_val.txt          the benchmark's split lists (other scenes are `test`)

      -> OUT/<split>/<scene>/{coord,color,normal,segment20,segment200,instance}.npy
         OUT/images/<split>/<scene>/color/<frame>.png, depth/<frame>.png (with depth=True), pose/<frame>.npy,
                                   intrinsic/intrinsic.npy, correspondence/<frame>.npy

What Pointcept's `preprocessing/concerto/scannet` writes, checked against it on the same raw files
(tests/test_scannet_raw.py): every `frame_skip`-th frame (75) of the .sens stream, colour decoded from its JPEG at
full size, depth (uint16, depth-camera size) only on request, the camera-to-world pose and the colour intrinsic as
float32 4x4; the mesh's vertex colours and area-weighted vertex normals; ScanNet-20 and ScanNet200 labels through
the label map; correspondences by casting the mesh at each frame's pose (`raycast`) and keeping the pixels within
1 cm of a vertex (`correspondence`). The .sens file is streamed: only the kept frames are held in memory.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concerto_ray.data.correspondence import nearest_point_correspondences, no_correspondence
from concerto_ray.data.raycast import mesh_depth_image
from concerto_ray.data.scannet_classes import IGNORE_INDEX, SCANNET20_IDS, SCANNET200_IDS
from concerto_ray.errors import ConfigError, DataError

SENS_VERSION = 4
LABEL_MAP = "scannetv2-labels.combined.tsv"
SPLIT_LISTS = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt"}
SPLIT_PATH_PREFIX = "data/scannet/"  # Pointcept's splits.py writes the paths below its checkout's data folder
MESH_SUFFIX = "_vh_clean_2.ply"
_COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
_DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}


@dataclass
class SensFrame:
    index: int  # position in the stream; the frame's file name
    camera_to_world: np.ndarray  # float32 4x4
    color_jpeg: bytes
    depth_zlib: bytes


@dataclass
class SensData:
    intrinsic_color: np.ndarray  # float32 4x4
    color_size: tuple[int, int]  # (height, width)
    depth_size: tuple[int, int]
    frames: list[SensFrame]  # the kept frames only


def read_sens(path: Path, frame_skip: int) -> SensData:
    """The header and every `frame_skip`-th frame of a .sens file; the other frames' images are skipped unread."""
    try:
        with open(path, "rb") as f:
            return _read_sens(f, frame_skip, path)
    except (struct.error, ValueError) as exc:
        raise DataError(f"not a readable ScanNet .sens stream: {exc}", file=str(path)) from exc


def _read_sens(f, frame_skip: int, path: Path) -> SensData:
    where = "the header"

    def unpack(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"the file ends inside {where}")
        return struct.unpack(fmt, data)

    frames: list[SensFrame] = []
    (version,) = unpack("<I")
    if version != SENS_VERSION:
        raise ValueError(f"version {version}, expected {SENS_VERSION}")
    (name_length,) = unpack("<Q")
    f.seek(name_length, 1)  # the sensor's name
    matrices = [np.asarray(unpack("<16f"), dtype=np.float32).reshape(4, 4) for _ in range(4)]
    color_compression, depth_compression = unpack("<ii")
    color_width, color_height, depth_width, depth_height = unpack("<4I")
    unpack("<f")  # depth shift: 1000 (millimetres), which the exported PNG keeps
    (count,) = unpack("<Q")
    color_name = _COLOR_COMPRESSION.get(color_compression, color_compression)
    depth_name = _DEPTH_COMPRESSION.get(depth_compression, depth_compression)
    if (color_name, depth_name) != ("jpeg", "zlib_ushort"):
        raise ValueError(f"colour compression {color_name}, depth {depth_name}; ScanNet's are jpeg and zlib_ushort")
    for index in range(count):
        where = f"frame {index} of {count}"
        pose = np.asarray(unpack("<16f"), dtype=np.float32).reshape(4, 4)
        _, _, color_bytes, depth_bytes = unpack("<4Q")
        if index % frame_skip:
            f.seek(color_bytes + depth_bytes, 1)
            continue
        color, depth = f.read(color_bytes), f.read(depth_bytes)
        if len(color) != color_bytes or len(depth) != depth_bytes:
            raise ValueError(f"the file ends inside {where}")
        frames.append(SensFrame(index, pose, color, depth))
    return SensData(matrices[0], (color_height, color_width), (depth_height, depth_width), frames)


def read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coord float32 (N, 3), color uint8 (N, 3), faces int (F, 3)) of a ScanNet mesh PLY."""
    from plyfile import PlyData

    try:
        ply = PlyData.read(str(path))
        vertex, face = ply["vertex"], ply["face"]
        coord = np.stack([np.asarray(vertex[k]) for k in ("x", "y", "z")], axis=1).astype(np.float32)
        color = np.stack([np.asarray(vertex[k]) for k in ("red", "green", "blue")], axis=1).astype(np.uint8)
        faces = np.stack(face.data["vertex_indices"], axis=0)
    except (KeyError, ValueError, OSError) as exc:
        message = f"not a ScanNet mesh (vertex x/y/z/red/green/blue, triangle faces): {exc}"
        raise DataError(message, file=str(path)) from exc
    return coord, color, faces


def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals: the sum of the adjacent faces' normals weighted by their areas (float32, the
    reference's operations in its order, so that the arrays are equal)."""
    cross = np.cross(coord[faces[:, 1]] - coord[faces[:, 0]], coord[faces[:, 2]] - coord[faces[:, 0]])
    length = np.sqrt(np.sum(cross**2, axis=1, keepdims=True)) + 1.0e-8
    weighted = (cross / length) * (length * 0.5)
    normal = np.zeros_like(coord)
    np.add.at(normal, faces.reshape(-1), np.repeat(weighted, 3, axis=0))  # face by face, as a loop over faces adds
    return normal / (np.sqrt(np.sum(normal**2, axis=1, keepdims=True)) + 1.0e-8)


def read_label_map(path: Path) -> dict[str, tuple[int, int]]:
    """raw_category -> (nyu40id, id) from ScanNet's label map; the first row of a category counts."""
    if not path.is_file():
        raise ConfigError(f"ScanNet's label map {path} is missing (scannetv2-labels.combined.tsv of the download)")
    mapping: dict[str, tuple[int, int]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            try:
                mapping.setdefault(row["raw_category"], (int(row["nyu40id"]), int(row["id"])))
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{path}: row {row} has no integer nyu40id / id: {exc}") from exc
    return mapping


def scene_labels(scene_dir: Path, scene: str, points: int, label_map: dict[str, tuple[int, int]]) -> dict:
    """segment20, segment200 and instance (int64, -1 unlabelled) from the scene's segments and aggregation."""
    segments_file = scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json"
    aggregation_file = scene_dir / f"{scene}.aggregation.json"
    segment_of_point = np.asarray(_json_field(segments_file, "segIndices"))
    if len(segment_of_point) != points:
        raise DataError(f"segIndices has {len(segment_of_point)} entries for {points} mesh vertices",
                        file=str(segments_file), field="segIndices")  # fmt: skip
    segment20 = np.full(points, IGNORE_INDEX, dtype=np.int16)
    segment200 = np.full(points, IGNORE_INDEX, dtype=np.int16)
    instance = np.full(points, IGNORE_INDEX, dtype=np.int16)
    for group in _json_field(aggregation_file, "segGroups"):
        if not {"label", "segments", "id"} <= set(group):
            message = f"a group lacks label, segments or id: {group}"
            raise DataError(message, file=str(aggregation_file), field="segGroups")
        nyu40, category = label_map.get(group["label"], (0, 0))
        points_of_group = np.flatnonzero(np.isin(segment_of_point, np.asarray(group["segments"])))
        segment20[points_of_group] = SCANNET20_IDS.index(nyu40) if nyu40 in SCANNET20_IDS else IGNORE_INDEX
        segment200[points_of_group] = SCANNET200_IDS.index(category) if category in SCANNET200_IDS else IGNORE_INDEX
        instance[points_of_group] = group["id"]
    return {"segment20": segment20.astype(np.int64), "segment200": segment200.astype(np.int64),
            "instance": instance.astype(np.int64)}  # fmt: skip


def _json_field(path: Path, field: str):
    try:
        return json.loads(path.read_text())[field]
    except FileNotFoundError:
        raise DataError("missing: a labelled ScanNet scene needs it", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not JSON: {exc}", file=str(path)) from exc
    except (KeyError, TypeError):
        raise DataError("missing from the file", file=str(path), field=field) from None


def list_scenes(src: Path, split_lists: Path) -> list[tuple[str, str, Path]]:
    """(split, scene, scene folder) of every SRC/scans*/scene*: train and val by the benchmark's lists, the rest
    test (as Pointcept's preprocessing splits them)."""
    folders = sorted(p for p in src.glob("scans*/scene*") if p.is_dir())
    if not folders:
        raise ConfigError(f"src: no scene folders as {src}/scans/scene*/ or {src}/scans_test/scene*/")
    lists = {}
    for split, name in SPLIT_LISTS.items():
        path = split_lists / name
        if not path.is_file():
            raise ConfigError(
                f"ScanNet's split list {path} is missing (Tasks/Benchmark/{name} of the ScanNet repository; "
                f"--split-lists names the folder that holds {' and '.join(SPLIT_LISTS.values())})"
            )
        lists[split] = set(path.read_text().split())
    return [(next((s for s, names in lists.items() if p.name in names), "test"), p.name, p) for p in folders]


class ScannetScene:
    """One raw ScanNet scene folder -> its processed files under OUT (images first, coord.npy last, so that a
    complete folder marks a finished scene). Picklable for Ray Data tasks."""

    def __init__(self, out, label_map: dict | None, frame_skip: int, depth: bool, device: str):
        self.out, self.label_map, self.frame_skip, self.depth, self.device = out, label_map, frame_skip, depth, device

    def convert(self, split: str, scene: str, scene_dir: Path) -> dict:
        """Writes the scene; returns its points, arrays and kept frame names."""
        coord, color, faces = read_mesh(_required(scene_dir / f"{scene}{MESH_SUFFIX}"))
        arrays = {"coord": coord, "color": color, "normal": vertex_normals(coord, faces)}
        if split != "test":
            if self.label_map is None:
                raise ConfigError(f"labelling {split} scenes needs ScanNet's label map ({LABEL_MAP})")
            arrays.update(scene_labels(scene_dir, scene, len(coord), self.label_map))
        sens = read_sens(_required(scene_dir / f"{scene}.sens"), self.frame_skip)
        images = f"images/{split}/{scene}"
        self.out.write_npy(f"{images}/intrinsic/intrinsic.npy", sens.intrinsic_color)
        for frame in sens.frames:
            self.out.write_png(f"{images}/color/{frame.index}.png", _decode_jpeg(frame, scene_dir, scene))
            if self.depth:
                self.out.write_png(f"{images}/depth/{frame.index}.png", _decode_depth(frame, sens, scene_dir, scene))
            self.out.write_npy(f"{images}/pose/{frame.index}.npy", frame.camera_to_world)
            self.out.write_npy(
                f"{images}/correspondence/{frame.index}.npy", self._correspondences(coord, faces, sens, frame)
            )
        for key in sorted(arrays, key=lambda k: k == "coord"):  # coord.npy last
            self.out.write_npy(f"{split}/{scene}/{key}.npy", arrays[key])
        return {"points": len(coord), "arrays": sorted(arrays), "frames": [f"{f.index}.png" for f in sens.frames]}

    def _correspondences(self, coord, faces, sens: SensData, frame: SensFrame) -> np.ndarray:
        pose, K = frame.camera_to_world, sens.intrinsic_color[:3, :3]
        if not np.isfinite(pose).all():  # ScanNet marks lost tracking with -inf poses
            return no_correspondence()
        depth = mesh_depth_image(coord, faces, K, pose, *sens.color_size, device=self.device)
        return nearest_point_correspondences(
            coord, depth, K, pose, device=None if self.device == "cpu" else self.device
        )


def _decode_depth(frame: SensFrame, sens: SensData, scene_dir: Path, scene: str) -> np.ndarray:
    try:
        return np.frombuffer(zlib.decompress(frame.depth_zlib), dtype=np.uint16).reshape(sens.depth_size)
    except (zlib.error, ValueError) as exc:
        message = f"frame {frame.index}'s depth is not {sens.depth_size} zlib uint16: {exc}"
        raise DataError(message, file=str(scene_dir / f"{scene}.sens")) from exc


def _decode_jpeg(frame: SensFrame, scene_dir: Path, scene: str) -> np.ndarray:
    from PIL import Image

    try:
        return np.asarray(Image.open(io.BytesIO(frame.color_jpeg)).convert("RGB"))
    except OSError as exc:
        sens = str(scene_dir / f"{scene}.sens")
        raise DataError(f"frame {frame.index}'s colour is not a JPEG: {exc}", file=sens) from exc


def _required(path: Path) -> Path:
    if not path.is_file():
        raise DataError("missing: every ScanNet scene folder has it", file=str(path))
    return path
