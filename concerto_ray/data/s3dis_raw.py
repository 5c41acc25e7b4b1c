"""The raw S3DIS download -> Pointcept's processed Concerto layout for S3DIS, one room at a time.

    SRC/Area_<k>/Area_<k>_alignmentAngle.txt          Stanford3dDataset_v1.2: the area's rooms (and their angles)
    SRC/Area_<k>/<room>/Annotations/<class>_<n>.txt   the room's points, one file per object: x y z r g b
    FRAMES/area_<k>/data/rgb/camera_<camera>_<room>_frame_<n>_domain_rgb.png     the 2D-3D-S download (no XYZ);
                   /data/depth/..._domain_depth.png, /data/pose/..._domain_pose.json   area 5 is in area_5a and
                   /3d/rgb.obj                                                    area_5b
      -> OUT/Area_<k>/<room>/{coord,color,normal,segment,instance}.npy
         OUT/images/Area_<k>/<room>/<camera>/color/<rgb file>, depth/<depth file> (with depth=True),
                                             intrinsic/<i>.npy, pose/<i>.npy, correspondence/<rgb stem>.npy

What Pointcept's `preprocessing/concerto/s3dis` writes as its shell script runs it (normals on, no alignment angle
unless `align_angle`), checked against it on the same raw files (tests/test_s3dis_raw.py):
- points: every object file of the room in name order, its class from the file name (13 classes, others such as
  "stairs" are clutter), its position in that order the instance id; coord float32, colour uint8, segment and
  instance int16 (N, 1);
- normals: the area's mesh (area 5: area_5b's placed into area_5a's frame) cut to the room's box plus 10 cm,
  turned from its y-up axes to the rooms' z-up ones; each point takes the normal of the mesh face nearest to it
  (trimesh's closest-point query, as the reference);
- frames: per camera, the frames that have both a colour image and a pose, every `frame_skip`-th (5) in frame
  order; the colour (and depth) files copied as they are; the pose file's K as intrinsic/<i>.npy and its
  world-to-camera [R|t] as a 4x4 pose/<i>.npy, numbered by the frame's place in that order;
- correspondences: the room's mesh cast at each frame's camera (`raycast`), pixels kept within 1 cm of a room
  point (`correspondence`), in the rooms' own frame (before any alignment rotation).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image, UnidentifiedImageError

from concerto_ray.data.correspondence import nearest_point_correspondences, no_correspondence
from concerto_ray.data.raycast import mesh_depth_image
from concerto_ray.errors import ConfigError, DataError

CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa", "bookcase",
           "board", "clutter")  # fmt: skip
AREAS = tuple(f"Area_{k}" for k in range(1, 7))
SPLIT_PATH_PREFIX = "data/s3dis/"  # Pointcept's splits.py writes the paths below its checkout's data folder
FRAME_SKIP = 5  # the reference's rgb_gap
CROP_MARGIN = 0.1  # metres around the room's points that its cut of the area mesh spans
# Area 5 was scanned in two parts; the second part's mesh placed in the first's frame (the reference's transform).
AREA_5B_TO_5A = np.array([[0, 0, -1, -4.09703582], [0, 1, 0, 0], [1, 0, 0, -6.22617759], [0, 0, 0, 1]])


def list_rooms(src: Path) -> list[tuple[str, str, Path]]:
    """(area, room, room folder) of every room named in SRC/Area_<k>/Area_<k>_alignmentAngle.txt."""
    if not src.is_dir():
        raise ConfigError(f"src: {src} is not a folder")
    areas = [area for area in AREAS if (src / area).is_dir()]
    if not areas:
        raise ConfigError(f"src: no S3DIS area folders ({AREAS[0]} .. {AREAS[-1]}) in {src} (Stanford3dDataset_v1.2)")
    return [(area, room, src / area / room) for area in areas for room in alignment_angles(src, area)]


def check_frames_src(frames_src: Path, areas: set[str]) -> None:
    """Refuses, before any task starts, a 2D-3D-S root that lacks an area's mesh or its frames (whose absence
    would silently leave every room of the area without frames)."""
    for area in sorted(areas):
        folders = ("area_5a", "area_5b") if area == "Area_5" else (area.lower(),)
        needed = [frames_src / folder / "3d" / "rgb.obj" for folder in folders]
        missing = [path for path in needed if not path.is_file()]
        if not any((frames_src / folder / "data" / kind).is_dir() for folder in folders for kind in ("rgb", "pose")):
            missing.append(frames_src / folders[0] / "data" / "{rgb,pose}")
        if missing:
            raise ConfigError(
                f"frames_src: {', '.join(map(str, missing))} missing; --frames-src is the 2D-3D-S download (no "
                f"XYZ) with {' and '.join(folders)}/3d/rgb.obj and .../data/{{rgb,depth,pose}}/ for {area}"
            )


def alignment_angles(src: Path, area: str) -> dict[str, int]:
    """room -> its alignment angle in degrees, from the area's alignmentAngle.txt ('#' lines are comments)."""
    path = src / area / f"{area}_alignmentAngle.txt"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: every area of Stanford3dDataset_v1.2 lists its rooms in it")
    angles = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or not words[1].lstrip("-").isdigit():
            raise ConfigError(f"{path}, line {number}: {line!r} is not '<room> <angle in degrees>'")
        angles[words[0]] = int(words[1])
    return angles


def read_room_points(room_dir: Path) -> dict[str, np.ndarray]:
    """coord and colour (float64, as read), segment and instance (int16 (N, 1)) of a room's object files."""
    # not hidden files (macOS's ._<name>.txt), which the reference's glob does not list either
    objects = sorted(p for p in (room_dir / "Annotations").glob("*.txt") if not p.name.startswith("."))
    if not objects:
        raise DataError("no object files (Annotations/*.txt) in the room folder", file=str(room_dir))
    coord, color, segment, instance = [], [], [], []
    for object_id, path in enumerate(objects):
        try:
            rows = np.loadtxt(path, ndmin=2)
        except ValueError as exc:  # e.g. the stray byte of Area_5/office_19's ceiling in the public download
            raise DataError(f"not a table of numbers: {exc}", file=str(path)) from exc
        if rows.shape[1] < 6:
            raise DataError(f"{rows.shape[1]} columns; an object file has x y z r g b", file=str(path))
        name = path.name.split("_")[0]
        coord.append(rows[:, :3])
        color.append(rows[:, 3:6])
        segment.append(np.full((len(rows), 1), CLASSES.index(name if name in CLASSES else "clutter")))
        instance.append(np.full((len(rows), 1), object_id))
    int16 = {"segment": np.concatenate(segment).astype(np.int16), "instance": np.concatenate(instance).astype(np.int16)}
    return {"coord": np.concatenate(coord), "color": np.concatenate(color), **int16}


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3), triangles (F, 3)) of an OBJ mesh as the reference's Open3D reads it (through Assimp):
    coordinates parsed as Assimp parses them, to float32 (held as float64); triangles grouped by material in
    `_material_ranks` order, else in file order; vertices in the order of their first use by those triangles.
    Positions equal to the last bit matter: trimesh's nearest-face query (the normals) breaks near-ties by them.
    Only triangle faces with absolute vertex numbers (what the 2D-3D-S meshes hold)."""
    if not path.is_file():
        raise DataError("missing: the area's mesh (3d/rgb.obj of the 2D-3D-S download)", file=str(path))
    text = path.read_bytes()
    coordinates = re.findall(rb"^v[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", text, re.MULTILINE)
    if len(coordinates) != len(re.findall(rb"^v[ \t]", text, re.MULTILINE)):
        raise DataError("a vertex line without three coordinates", file=str(path))
    # the text between usemtl lines, and the material each such part uses (b"": before any usemtl)
    pieces = re.split(rb"^usemtl[ \t]+(.*?)[ \t]*\r?$", text, flags=re.MULTILINE)
    corner = rb"(\d+)[^ \t\r\n]*"  # a face corner's vertex number, its /texture/normal numbers dropped
    triangle = re.compile(rb"^f[ \t]+" + rb"[ \t]+".join([corner] * 3) + rb"[ \t]*\r?$", re.MULTILINE)
    groups, materials = [], []
    for material, piece in zip([b"", *pieces[1::2]], pieces[0::2]):
        found = triangle.findall(piece + b"\n")
        if len(found) != len(re.findall(rb"^f[ \t]", piece, re.MULTILINE)):
            raise DataError("a face that is not a triangle of absolute vertex numbers", file=str(path))
        groups.append(np.asarray(found, dtype=bytes).reshape(-1, 3))
        materials += [material] * len(found)
    triangles = np.concatenate(groups).astype(np.int64) - 1
    if len(triangles) and (triangles.min() < 0 or triangles.max() >= len(coordinates)):
        raise DataError(f"a face's vertex number outside 1 .. {len(coordinates)}", file=str(path))
    try:
        points = _assimp_floats(np.asarray(coordinates, dtype=bytes).reshape(-1)).reshape(-1, 3)
    except ValueError as exc:
        raise DataError(f"a vertex coordinate that is not a number: {exc}", file=str(path)) from exc
    ranks = _material_ranks(text, path.parent, materials)
    triangles = triangles[np.argsort([ranks[m] for m in materials], kind="stable")]
    used, first = np.unique(triangles.reshape(-1), return_index=True)
    order = used[np.argsort(first)]
    renumber = np.empty(len(points), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return points[order].astype(np.float64), renumber[triangles]


def _assimp_floats(tokens: np.ndarray) -> np.ndarray:
    """float32 of decimal tokens as Assimp's fast_atof computes them: the integer part in float32, plus the first
    15 fraction digits as an integer times 10^-digits in float64, rounded to float32 and added in float32; then
    times 10^exponent in float32. (1 in 20 values of six decimals differ from the nearest float32 by one ulp.)"""
    lower = np.char.lower(tokens)
    split = np.char.partition(lower, b"e")
    mantissa, exponent = split[..., 0], split[..., 2]
    negative = np.char.startswith(mantissa, b"-")
    parts = np.char.partition(np.char.lstrip(mantissa, b"+-"), b".")
    whole, fraction = parts[..., 0], parts[..., 2].astype("S15")
    digits = np.char.str_len(fraction)
    value = np.where(whole == b"", b"0", whole).astype(np.uint64).astype(np.float32)
    fraction_value = np.where(fraction == b"", b"0", fraction).astype(np.uint64).astype(np.float64)
    value = value + (fraction_value * 10.0 ** -digits.astype(np.float64)).astype(np.float32)
    power = np.where(exponent == b"", b"0", exponent).astype(np.int64).astype(np.float32)
    value = value * np.power(np.float32(10), power)
    return np.where(negative, -value, value)


def _material_ranks(text: bytes, folder: Path, used: list[bytes]) -> dict[bytes, int]:
    """The order in which the reference's reader lists an OBJ's material groups (measured on Open3D 0.20): the
    materials of the mtllib files in definition order, with the faces before any usemtl placed just before the
    last of them, then materials that no mtllib defines, in order of first use."""
    defined = []
    for name in re.findall(rb"^mtllib[ \t]+(.+?)[ \t]*\r?$", text, re.MULTILINE):
        library = folder / name.decode(errors="replace")
        if library.is_file():
            defined += re.findall(rb"^[ \t]*newmtl[ \t]+(\S+)", library.read_bytes(), re.MULTILINE)
    order = list(dict.fromkeys([*defined[:-1], b"", *defined[-1:], *used]))
    return {name: rank for rank, name in enumerate(order)}


@functools.lru_cache(maxsize=1)  # a Ray worker converts the rooms of one area in a row: read its mesh once
def area_mesh(frames_src: Path, area: str) -> tuple[np.ndarray, np.ndarray]:
    """The area's mesh in its own (y-up) frame; area 5 joins area_5b's mesh, placed in area_5a's frame."""
    if area != "Area_5":
        return read_obj(frames_src / area.lower() / "3d" / "rgb.obj")
    vertices_a, triangles_a = read_obj(frames_src / "area_5a" / "3d" / "rgb.obj")
    vertices_b, triangles_b = read_obj(frames_src / "area_5b" / "3d" / "rgb.obj")
    vertices_b = vertices_b @ AREA_5B_TO_5A[:3, :3].T + AREA_5B_TO_5A[:3, 3]
    return np.concatenate([vertices_a, vertices_b]), np.concatenate([triangles_a, triangles_b + len(vertices_a)])


def crop_mesh(vertices, triangles, low, high) -> tuple[np.ndarray, np.ndarray]:
    """The triangles whose corners all lie in the box [low, high] (bounds included), cleaned as Open3D's crop
    cleans them: corners at one position merged, triangles then degenerate or repeated (the same corners in the
    same turn) dropped, the first of repeated ones kept, order otherwise unchanged. Returns the used vertices."""
    inside = np.all((vertices >= low) & (vertices <= high), axis=1)
    kept = triangles[inside[triangles].all(axis=1)]
    used, compact = np.unique(kept, return_inverse=True)
    # one index per position: the first vertex (in file order) at it
    _, first, same = np.unique(vertices[used], axis=0, return_index=True, return_inverse=True)
    merged = first[same.reshape(-1)][compact.reshape(-1, 3)]
    merged = merged[(merged[:, 0] != merged[:, 1]) & (merged[:, 1] != merged[:, 2]) & (merged[:, 0] != merged[:, 2])]
    turn = np.argmin(merged, axis=1)[:, None]  # rotate each triangle to start at its smallest index: one key a turn
    key = np.take_along_axis(merged, (turn + np.arange(3)) % 3, axis=1)
    _, unique = np.unique(key, axis=0, return_index=True)
    merged = merged[np.sort(unique)]
    used_again, faces = np.unique(merged, return_inverse=True)
    return vertices[used][used_again], faces.reshape(-1, 3)


def room_mesh(frames_src: Path, area: str, coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The area mesh cut to the room's box plus CROP_MARGIN, in the rooms' z-up frame: mesh (x, y, z) -> (x, -z, y)."""
    vertices, triangles = area_mesh(frames_src, area)
    low, high = coord.min(axis=0), coord.max(axis=0)
    # the room's box in the mesh's axes: x, z_room, -y_room
    box_low = np.array([low[0], low[2], -high[1]]) - CROP_MARGIN
    box_high = np.array([high[0], high[2], -low[1]]) + CROP_MARGIN
    vertices, faces = crop_mesh(vertices, triangles, box_low, box_high)
    # + 0.0: every -0.0 becomes +0.0, as in the reference's matrix product
    return np.column_stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]]) + 0.0, faces


def nearest_face_normals(vertices: np.ndarray, faces: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """The unit normal of the mesh face nearest to each point (float64 (N, 3)), by trimesh's closest-point query."""
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces)
    _, _, face = mesh.nearest.on_surface(coord)
    return mesh.face_normals[face]


@dataclass(frozen=True)
class Frame:
    color: Path
    depth: Path | None
    pose: Path


def room_frames(frames_src: Path, area: str, room: str, frame_skip: int) -> dict[str, list[Frame]]:
    """camera -> its kept frames: those with a colour image and a pose, every `frame_skip`-th in frame order."""
    folders = sorted(frames_src.glob("area_5*")) if area == "Area_5" else [frames_src / area.lower()]
    found: dict[str, dict[str, dict[int, Path]]] = {}  # kind -> camera -> frame -> its first file
    for kind, suffix in (("rgb", "png"), ("depth", "png"), ("pose", "json")):
        name = re.compile(rf"camera_(.+)_{re.escape(room)}_frame_(\d+)_domain_{kind}\.{suffix}")
        for folder in folders:
            for path in sorted((folder / "data" / kind).glob(f"*_{room}_*.{suffix}")):
                match = name.fullmatch(path.name)
                if match:
                    found.setdefault(kind, {}).setdefault(match[1], {}).setdefault(int(match[2]), path)
    colors, depths, poses = (found.get(kind, {}) for kind in ("rgb", "depth", "pose"))
    cameras = {}
    for camera in sorted(set(colors) & set(poses)):
        numbers = sorted(set(colors[camera]) & set(poses[camera]))[::frame_skip]
        frames = [Frame(colors[camera][n], depths.get(camera, {}).get(n), poses[camera][n]) for n in numbers]
        if frames:
            cameras[camera] = frames
    return cameras


def read_pose(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), world-to-camera 4x4) of a 2D-3D-S pose file; K keeps the file's number type, as the reference."""
    try:
        data = json.loads(path.read_text())
        intrinsic, extrinsic = np.array(data["camera_k_matrix"]), np.array(data["camera_rt_matrix"], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"not a 2D-3D-S pose (camera_k_matrix, camera_rt_matrix): {exc!r}", file=str(path)) from exc
    if intrinsic.shape != (3, 3) or extrinsic.shape != (3, 4):
        message = f"camera_k_matrix is {intrinsic.shape} and camera_rt_matrix {extrinsic.shape}; 3x3 and 3x4 expected"
        raise DataError(message, file=str(path))
    if intrinsic.dtype.kind not in "iuf" or not np.isfinite(intrinsic).all() or np.linalg.det(intrinsic) == 0:
        raise DataError(f"camera_k_matrix is not an invertible matrix of numbers: {intrinsic.tolist()}", file=str(path))
    world_to_camera = np.eye(4)
    world_to_camera[:3, :] = extrinsic
    return intrinsic, world_to_camera


class S3disRoom:
    """One S3DIS room folder -> its processed files under OUT (images first, coord.npy last, so that a complete
    folder marks a finished room). Picklable for Ray Data tasks."""

    def __init__(self, out, frames_src: Path, frame_skip: int, depth: bool, align_angle: bool, device: str):
        self.out, self.frames_src, self.frame_skip = out, frames_src, frame_skip
        self.depth, self.align_angle, self.device = depth, align_angle, device

    def convert(self, area: str, room: str, room_dir: Path) -> dict:
        """Writes the room; returns its points, arrays and kept frames as "<camera>/<colour file>"."""
        arrays = read_room_points(room_dir)
        coord = arrays["coord"]
        vertices, faces = room_mesh(self.frames_src, area, coord)
        if not len(faces):
            message = f"the {area} mesh (--frames-src) has no triangle within {CROP_MARGIN} m of the room's points"
            raise DataError(message, file=str(room_dir))
        arrays["normal"] = nearest_face_normals(vertices, faces, coord)
        kept = []
        for camera, frames in room_frames(self.frames_src, area, room, self.frame_skip).items():
            images = f"images/{area}/{room}/{camera}"
            for i, frame in enumerate(frames):
                intrinsic, world_to_camera = read_pose(frame.pose)
                self.out.write_bytes(f"{images}/color/{frame.color.name}", frame.color.read_bytes())
                if self.depth:
                    if frame.depth is None:
                        raise DataError("missing: the frame's depth image", file=str(frame.color))
                    self.out.write_bytes(f"{images}/depth/{frame.depth.name}", frame.depth.read_bytes())
                self.out.write_npy(f"{images}/intrinsic/{i}.npy", intrinsic)
                self.out.write_npy(f"{images}/pose/{i}.npy", world_to_camera)
                table = self._correspondences(vertices, faces, coord, frame, intrinsic, world_to_camera)
                self.out.write_npy(f"{images}/correspondence/{frame.color.stem}.npy", table)
                kept.append(f"{camera}/{frame.color.name}")
        if self.align_angle:
            angle = alignment_angles(room_dir.parent.parent, area)[room]
            arrays["coord"], arrays["normal"] = _align(coord, arrays["normal"], angle)
        arrays["coord"] = arrays["coord"].astype(np.float32)
        arrays["color"] = arrays["color"].astype(np.uint8)
        arrays["normal"] = arrays["normal"].astype(np.float32)
        for key in sorted(arrays, key=lambda k: k == "coord"):  # coord.npy last
            self.out.write_npy(f"{area}/{room}/{key}.npy", arrays[key])
        return {"points": len(coord), "arrays": sorted(arrays), "frames": kept}

    def _correspondences(self, vertices, faces, coord, frame: Frame, intrinsic, world_to_camera) -> np.ndarray:
        try:
            camera_to_world = np.linalg.inv(world_to_camera)
        except np.linalg.LinAlgError:
            raise DataError("camera_rt_matrix is singular", file=str(frame.pose)) from None
        if not np.isfinite(camera_to_world).all():
            return no_correspondence()
        try:
            with Image.open(frame.color) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"not an image: {exc}", file=str(frame.color)) from exc
        depth = mesh_depth_image(vertices, faces, intrinsic, camera_to_world, height, width, device=self.device)
        search = None if self.device == "cpu" else self.device  # scipy's k-d tree on the CPU, torch on a GPU
        return nearest_point_correspondences(coord, depth, intrinsic, camera_to_world, device=search)


def _align(coord: np.ndarray, normal: np.ndarray, degrees: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's --align_angle: the room turned about the vertical through its box's centre."""
    angle = (2 - degrees / 180) * np.pi
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    center = (coord.max(axis=0) + coord.min(axis=0)) / 2
    return (coord - center) @ rotation.T + center, normal @ rotation.T
