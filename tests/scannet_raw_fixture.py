"""A tiny raw ScanNet v2 download, written from the formats' published layouts (never downloaded).

    ROOT/scans/scene0000_00/       scene0000_00.sens (SensorData v4: JPEG colour, zlib uint16 depth),
                                   scene0000_00_vh_clean_2.ply (binary mesh with vertex colours),
                                   scene0000_00_vh_clean_2.0.010000.segs.json, scene0000_00.aggregation.json
    ROOT/scans/scene0100_00/       the same files (a val scene)
    ROOT/scans_test/scene0707_00/  .sens and mesh only (a test scene)
    ROOT/scannetv2-labels.combined.tsv, scannetv2_train.txt, scannetv2_val.txt

The room: a floor, two walls and a box, meshed on a 2 cm grid with a little noise, so that cast pixels land within
1 cm of a vertex and beyond it. Frames: FRAMES per stream, the middle one with ScanNet's -inf "lost tracking" pose.
Needs only NumPy, Pillow and plyfile: tests/data/make_scannet_raw_reference.py runs it beside Pointcept's own code.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from concerto_ray.data.synth import look_at

FRAMES = 7
FRAME_SKIP = 3  # keeps frames 0, 3 (the lost pose) and 6
COLOR_SIZE = (36, 48)  # (height, width)
DEPTH_SIZE = (18, 24)
SCENES = [("scans", "scene0000_00"), ("scans", "scene0100_00"), ("scans_test", "scene0707_00")]
# id, raw_category, nyu40id: wall and floor are ScanNet-20 classes; "storage box" only a ScanNet200 one (id 26 in
# its list, nyu40 29 not a 20 class); "box" appears twice (the first row counts); "ghost" is in no list.
LABEL_ROWS = [(1, "wall", 1), (2, "floor", 2), (26, "storage box", 29), (3, "box", 5), (4, "box", 7), (5, "ghost", 40)]


def write_raw_scannet(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for folder, scene in SCENES:
        scene_dir = root / folder / scene
        scene_dir.mkdir(parents=True)
        vertices, faces, segment_of_vertex = _room(rng)
        _write_mesh(scene_dir / f"{scene}_vh_clean_2.ply", vertices, faces, rng)
        _write_sens(scene_dir / f"{scene}.sens", rng)
        if folder == "scans":
            (scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json").write_text(
                json.dumps({"sceneId": scene, "segIndices": segment_of_vertex.tolist()})
            )
            groups = [("floor", [0]), ("wall", [1, 2]), ("box", [3]), ("storage box", [4]), ("unlisted thing", [5])]
            aggregation = [
                {"id": i, "objectId": i, "segments": segments, "label": label}
                for i, (label, segments) in enumerate(groups)
            ]
            (scene_dir / f"{scene}.aggregation.json").write_text(json.dumps({"segGroups": aggregation}))
    header = "id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class"
    rows = [f"{i}\t{name}\t{name}\t1\t{nyu40}\t1\t{name}\t{name}" for i, name, nyu40 in LABEL_ROWS]
    (root / "scannetv2-labels.combined.tsv").write_text("\n".join([header, *rows]) + "\n")
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0100_00\n")


def grid(corner, u, v, nu, nv):
    """Vertices of a (nu x nv) grid on the parallelogram corner + a u + b v, and its triangles."""
    a, b = np.meshgrid(np.linspace(0, 1, nu), np.linspace(0, 1, nv), indexing="ij")
    points = corner + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
    index = np.arange(nu * nv).reshape(nu, nv)
    p, q, r, s = index[:-1, :-1].ravel(), index[1:, :-1].ravel(), index[:-1, 1:].ravel(), index[1:, 1:].ravel()
    return points, np.concatenate([np.stack([p, q, s], 1), np.stack([p, s, r], 1)])


def room_parts() -> list[tuple[np.ndarray, np.ndarray]]:
    """(vertices, triangles) of the room's floor, wall x=0, wall y=0, the box's top and two of its sides."""
    return [
        grid(np.zeros(3), np.array([1.2, 0, 0]), np.array([0, 1.0, 0]), 61, 51),
        grid(np.zeros(3), np.array([0, 1.0, 0]), np.array([0, 0, 0.6]), 51, 31),
        grid(np.zeros(3), np.array([1.2, 0, 0]), np.array([0, 0, 0.6]), 61, 31),
        grid(np.array([0.5, 0.4, 0.2]), np.array([0.3, 0, 0]), np.array([0, 0.3, 0]), 16, 16),
        grid(np.array([0.5, 0.7, 0.0]), np.array([0.3, 0, 0]), np.array([0, 0, 0.2]), 16, 11),
        grid(np.array([0.8, 0.4, 0.0]), np.array([0, 0.3, 0]), np.array([0, 0, 0.2]), 16, 11),
    ]


def _room(rng):
    vertices, faces, segment, offset = [], [], [], 0
    for i, (points, triangles) in enumerate(room_parts()):  # segments 0 .. 5
        vertices.append(points + rng.normal(0, 0.002, points.shape))
        faces.append(triangles + offset)
        segment.append(np.full(len(points), i))
        offset += len(points)
    return np.concatenate(vertices).astype(np.float32), np.concatenate(faces), np.concatenate(segment)


def _write_mesh(path: Path, vertices, faces, rng) -> None:
    from plyfile import PlyData, PlyElement  # here: benchmarks/mesh_cast.py borrows the room on machines without it

    vertex = np.zeros(
        len(vertices), dtype=[(k, "f4") for k in "xyz"] + [(k, "u1") for k in ("red", "green", "blue", "alpha")]
    )
    for i, k in enumerate("xyz"):
        vertex[k] = vertices[:, i]
    colors = rng.integers(0, 256, (len(vertices), 3))
    vertex["red"], vertex["green"], vertex["blue"], vertex["alpha"] = colors[:, 0], colors[:, 1], colors[:, 2], 255
    face = np.zeros(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = faces
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]).write(str(path))


def _write_sens(path: Path, rng) -> None:
    (height, width), (depth_height, depth_width) = COLOR_SIZE, DEPTH_SIZE
    intrinsic = np.eye(4, dtype=np.float32)
    intrinsic[0, 0] = intrinsic[1, 1] = 0.75 * width
    intrinsic[0, 2], intrinsic[1, 2] = (width - 1) / 2, (height - 1) / 2
    name = b"StructureSensor"
    out = [struct.pack("<IQ", 4, len(name)), name]
    for matrix in (intrinsic, np.eye(4), intrinsic / 2, np.eye(4)):  # colour, depth intrinsic / extrinsic
        out.append(struct.pack("<16f", *np.asarray(matrix, dtype=np.float32).ravel()))
    out.append(struct.pack("<ii4If", 2, 1, width, height, depth_width, depth_height, 1000.0))  # jpeg, zlib_ushort
    out.append(struct.pack("<Q", FRAMES))
    for i in range(FRAMES):
        position = np.array([1.1, 0.95, 0.75]) + rng.normal(0, 0.05, 3)
        pose = look_at(position, np.array([0.55, 0.45, 0.15]) + rng.normal(0, 0.05, 3))
        if i == FRAMES // 2:
            pose = np.full((4, 4), -np.inf, dtype=np.float32)
        smooth = np.kron(rng.integers(0, 256, (height // 4, width // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        jpeg = io.BytesIO()
        Image.fromarray(smooth).save(jpeg, format="JPEG", quality=90)
        depth = zlib.compress(rng.integers(0, 4000, DEPTH_SIZE).astype("<u2").tobytes())
        out.append(struct.pack("<16f4Q", *pose.ravel(), 1000 * i, 1000 * i, len(jpeg.getvalue()), len(depth)))
        out += [jpeg.getvalue(), depth]
    path.write_bytes(b"".join(out))
