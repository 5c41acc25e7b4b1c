"""A tiny raw S3DIS download, written from the formats' published layouts (never downloaded).

    ROOT/s3dis/Area_1/Area_1_alignmentAngle.txt, Area_1/<room>/Annotations/<object>.txt   (Stanford3dDataset_v1.2)
    ROOT/s3dis/Area_5/...
    ROOT/2d3ds/area_1/3d/rgb.obj, area_1/data/{rgb,depth,pose}/camera_<c>_<room>_frame_<n>_domain_*   (2D-3D-S)
    ROOT/2d3ds/area_5a/..., area_5b/...          (area 5's mesh in two parts, the second in its own frame)

Each room: a floor, two walls and a box (the ScanNet fixture's room), meshed on a 2 cm grid in the 2D-3D-S
meshes' y-up axes; its points are the mesh's vertices with a little noise, in millimetres, split into object files
(one of them "stairs", which the reference counts as clutter). Area 1's mesh holds two rooms and a corridor floor
that crosses the rooms' boxes, plus repeated vertices and triangles that the reference's mesh crop cleans away;
the meshes' faces come in texture chunks of several materials (rgb.mtl), as the real ones. Cameras: one with 11
frames (every 5th kept), one whose frame 4 lacks a pose, whose frame 6 has a NaN pose and whose K is of integers,
one with colour but no poses; area 5's cameras are split between area_5a and area_5b. Needs only NumPy and
Pillow: tests/data/make_s3dis_raw_reference.py runs it beside Pointcept's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scannet_raw_fixture import grid, room_parts

from concerto_ray.data.synth import look_at

COLOR_SIZE = (30, 40)  # (height, width)
ANGLES = {"Area_1": {"office_1": 90, "hallway_1": 0, "WC_1": 0}, "Area_5": {"office_1": 180, "hallway_1": 270}}
ORIGIN = {"office_1": np.array([0.0, 0.0, 0.0]), "hallway_1": np.array([3.0, 0.0, 0.0]), "WC_1": np.array([0, 2.0, 0])}
FRAMELESS = ("WC_1",)  # rooms that no camera saw
# objects of a room: (file name, mesh parts); parts as in scannet_raw_fixture.room_parts
OBJECTS = [("floor_1", [0]), ("wall_1", [1]), ("wall_2", [2]), ("table_1", [3]), ("stairs_1", [4, 5])]
# (camera, frames with colour, frames with a pose, frame whose pose is NaN) for every room; d3e4f5's K is of
# integers (the reference keeps the JSON's number type)
CAMERAS = [("a0b1c2", range(11), range(11), None), ("d3e4f5", range(8), [0, 1, 2, 3, 5, 6, 7], 6),
           ("noposes", range(3), [], None)]  # fmt: skip
MATERIALS = ("chunk_b", "chunk_a", "chunk_c")  # rgb.mtl, in this order
MATERIALS_IN_USE = ("chunk_a", "chunk_c", "undefined", "chunk_a", "chunk_b")
# area 5's second part: the inverse of the reference's placement of area_5b in area_5a's frame
_AREA_5B_TO_5A = np.array([[0, 0, -1, -4.09703582], [0, 1, 0, 0], [1, 0, 0, -6.22617759], [0, 0, 0, 1]])


def write_raw_s3dis(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes the fixture; returns (SRC, FRAMES): the Stanford3dDataset_v1.2 and 2D-3D-S roots."""
    rng = np.random.default_rng(seed)
    src, frames = root / "s3dis", root / "2d3ds"
    for area, rooms in ANGLES.items():
        lines = [f"## Global alignment angle per disjoint space in {area} ##", "## Disjoint Space Name  Angle ##"]
        (src / area).mkdir(parents=True)
        meshes = []
        for room, angle in rooms.items():
            lines.append(f"{room} {angle}")
            parts = [(points + ORIGIN[room], triangles) for points, triangles in room_parts()]
            meshes += parts
            _write_objects(src / area / room / "Annotations", parts, rng)
            if room in FRAMELESS:
                continue
            if area == "Area_5":  # area 5's frames are in both of its folders: a room's cameras may be split
                _write_frames(frames / "area_5a" / "data", room, ORIGIN[room], rng, CAMERAS[1:])
                _write_frames(frames / "area_5b" / "data", room, ORIGIN[room], rng, CAMERAS[:1])
            else:
                _write_frames(frames / area.lower() / "data", room, ORIGIN[room], rng, CAMERAS)
        (src / area / f"{area}_alignmentAngle.txt").write_text("\n".join(lines) + "\n")
        corridor = grid(np.array([-0.5, -0.5, 0.0]), np.array([5.0, 0, 0]), np.array([0, 0.3, 0]), 26, 4)
        vertices, triangles = _join([*meshes, corridor])
        if area == "Area_1":
            _write_obj(frames / "area_1" / "3d" / "rgb.obj", vertices, triangles, repeat=True)
        else:  # split in two: the second half's triangles in area_5b's own frame
            half = len(triangles) // 2
            _write_obj(frames / "area_5a" / "3d" / "rgb.obj", vertices, triangles[:half])
            to_b = np.linalg.inv(_AREA_5B_TO_5A)
            mesh_b = _room_to_mesh(vertices) @ to_b[:3, :3].T + to_b[:3, 3]
            _write_obj(frames / "area_5b" / "3d" / "rgb.obj", vertices, triangles[half:], mesh_vertices=mesh_b)
    return src, frames


def _join(parts):
    vertices, triangles, offset = [], [], 0
    for points, faces in parts:
        vertices.append(points)
        triangles.append(faces + offset)
        offset += len(points)
    return np.concatenate(vertices), np.concatenate(triangles)


def _room_to_mesh(points):
    """z-up room axes -> the 2D-3D-S meshes' y-up axes: (x, y, z) -> (x, z, -y)."""
    return np.column_stack([points[:, 0], points[:, 2], -points[:, 1]])


def _write_obj(path: Path, vertices, triangles, repeat: bool = False, mesh_vertices=None) -> None:
    mesh = _room_to_mesh(vertices) if mesh_vertices is None else mesh_vertices
    used = np.unique(triangles)
    number = np.zeros(len(mesh), dtype=np.int64)
    number[used] = np.arange(1, len(used) + 1)
    lines = ["mtllib rgb.mtl", "o area"] + [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh[used]]
    lines += ["vt 0.5 0.5"]
    faces = number[triangles]
    if repeat:  # the first 40 triangles again, on a copy of their vertices; and one triangle degenerate by it
        copied = np.unique(faces[:40])
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh[used][copied - 1]]
        renumber = dict(zip(copied.tolist(), range(len(used) + 1, len(used) + 1 + len(copied))))
        again = np.vectorize(renumber.get)(faces[:40])
        faces = np.concatenate([faces, again, [[faces[0, 0], renumber[faces[0, 0]], faces[0, 1]]]])
    # texture chunks as the 2D-3D-S meshes have: materials used out of their definition order, one used twice,
    # one that rgb.mtl does not define, and faces before the first usemtl
    for chunk, start in enumerate(range(0, len(faces), 500)):
        lines += [f"usemtl {MATERIALS_IN_USE[(chunk - 1) % len(MATERIALS_IN_USE)]}"] if chunk else []
        lines += [f"f {a}/1 {b}/1 {c}/1" for a, b, c in faces[start : start + 500]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "rgb.mtl").write_text("".join(f"newmtl {m}\nKd 1 1 1\nmap_Kd {m}.jpg\n" for m in MATERIALS))


def _write_objects(folder: Path, parts, rng) -> None:
    folder.mkdir(parents=True)
    for name, indices in OBJECTS:
        points = np.concatenate([parts[i][0] for i in indices])
        points = points + rng.normal(0, 0.002, points.shape)
        colors = rng.integers(0, 256, (len(points), 3))
        rows = [f"{x:.3f} {y:.3f} {z:.3f} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(points, colors)]
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")


def _write_frames(data: Path, room: str, origin, rng, cameras) -> None:
    height, width = COLOR_SIZE
    for kind in ("rgb", "depth", "pose"):
        (data / kind).mkdir(parents=True, exist_ok=True)
    for camera, colours, poses, lost in cameras:
        intrinsic = [[0.75 * width, 0.0, (width - 1) / 2], [0.0, 0.75 * width, (height - 1) / 2], [0.0, 0.0, 1.0]]
        if camera == "d3e4f5":
            intrinsic = [[30, 0, 20], [0, 30, 15], [0, 0, 1]]
        stem = f"camera_{camera}_{room}_frame_{{}}_domain"
        for n in colours:
            smooth = np.kron(rng.integers(0, 256, (height // 5, width // 5, 3)), np.ones((5, 5, 1))).astype(np.uint8)
            Image.fromarray(smooth).save(data / "rgb" / f"{stem.format(n)}_rgb.png")
            depth = rng.integers(0, 65535, (height, width)).astype(np.uint16)
            Image.fromarray(depth).save(data / "depth" / f"{stem.format(n)}_depth.png")
        for n in poses:
            position = origin + np.array([1.1, 0.95, 0.75]) + rng.normal(0, 0.05, 3)
            camera_to_world = look_at(position, origin + np.array([0.55, 0.45, 0.15]) + rng.normal(0, 0.05, 3))
            world_to_camera = np.linalg.inv(camera_to_world.astype(np.float64))
            if n == lost:
                world_to_camera[:3, :] = np.nan
            pose = {"camera_k_matrix": intrinsic, "camera_rt_matrix": world_to_camera[:3, :].tolist()}
            (data / "pose" / f"{stem.format(n)}_pose.json").write_text(json.dumps(pose))
