"""Procedural indoor scenes written in the processed files of Pointcept's Concerto datasets.

The demo, the tests and the benchmarks run on these instead of the real datasets. Each flavour (`flavors.py`:
scannet, scannet200, scannetpp, s3dis, arkitscenes, hm3d, structured3d, re10k) writes the same kind of room in
that dataset's names, folders, dtypes, label shapes and ids, split names, intrinsics and split-file grouping. The
default, ScanNet, writes under ROOT:

    {split}/{scene}/coord.npy         float32 (N, 3), metres
    {split}/{scene}/color.npy         uint8   (N, 3)
    {split}/{scene}/normal.npy        float32 (N, 3), unit length
    {split}/{scene}/segment20.npy     int64   (N,), ScanNet-20 ids, -1 = unannotated (not in the test split)
    {split}/{scene}/segment200.npy    int64   (N,), ScanNet200 ids
    {split}/{scene}/instance.npy      int64   (N,), -1 = no instance
    images/{split}/{scene}/color/{i}.png            RGB uint8
    images/{split}/{scene}/depth/{i}.png            uint16 millimetres, 0 = no surface (SynthConfig.depth)
    images/{split}/{scene}/pose/{i}.npy             float32 (4, 4) camera-to-world, OpenCV axes
    images/{split}/{scene}/intrinsic/intrinsic.npy  float32 (4, 4), shared by the scene's views
    images/{split}/{scene}/correspondence/{i}.npy   float64 (M, 3) rows [column, row, point index],
                                                    or -np.ones((1, 3)) when the view sees no point
    splits/{split}.json   {"{scene}_{k}": {"pointclouds", "images", "correspondences"}}, four views per entry
                          (the last entry of a scene holds the remainder)
    synth_config.json     the SynthConfig that wrote ROOT; marks ROOT as safe to overwrite

The other flavours' writers (`_scannetpp`, `_s3dis`, ...) say how they differ. Split files hold paths relative to
ROOT ("train/scene0003_00"); Pointcept's splits.py writes the same paths prefixed with "data/<dataset>/", which
readers strip.

A scene is a room (floor and four walls, no ceiling) furnished with objects built from yaw-rotated
boxes. Points are sampled on the exposed box surfaces (RE10K: lifted from the views' pixels); views are ray cast
against the same boxes, so colour, depth and correspondences agree with the point cloud, occlusion included.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from concerto_ray.config import to_dict
from concerto_ray.data.correspondence import no_correspondence, projected_correspondences
from concerto_ray.data.flavors import FLAVORS, SCANNETPP_CHUNK_SPLIT, flavor
from concerto_ray.data.scannet_classes import IGNORE_INDEX, class_id
from concerto_ray.errors import ConfigError

MARKER_FILE = "synth_config.json"
VIEWS_PER_SAMPLE = 4  # Pointcept's splits.py groups a scene's frames four at a time
DEPTH_TOLERANCE_M = 0.03  # how far a point may sit from the rendered depth and still correspond
MAX_COORD_NOISE_M = 0.01  # keeps 3 sigma of sensor noise inside DEPTH_TOLERANCE_M
SURFACE_EPS_M = 0.005  # points closer than this to the inside of another box are hidden by it
LIGHT_DIRECTION = np.array([0.3, 0.4, 0.866]) / np.linalg.norm([0.3, 0.4, 0.866])
COLOR_NOISE = 4.0  # per-point colour noise, in uint8 steps
NEAR_M = 0.01  # cameras stay 0.15 m clear of every box, so nothing visible is nearer than this


@dataclass
class SynthConfig:
    scenes: int = 8
    seed: int = 0
    points_per_scene: int = 20000
    views_per_scene: int = 8
    image_width: int = 320
    image_height: int = 240
    # fraction of the scenes in each split; scenes are assigned in blocks, in this order. Default: 3/4 to the
    # flavour's first split and 1/4 to its second (S3DIS: one sixth to each area).
    splits: dict[str, float] | None = None
    coord_noise: float = 0.005  # standard deviation of the Gaussian noise on coordinates, metres
    flavor: str = "scannet"  # whose processed files to write: a name from flavors.FLAVORS
    depth: bool = True  # write depth images (Pointcept's preprocessing writes them when asked: --parse_depths)

    def __post_init__(self):
        if self.flavor not in FLAVORS:
            raise ConfigError(f"flavor: unknown dataset flavour {self.flavor!r}; known: {', '.join(FLAVORS)}")
        split_names = flavor(self.flavor).splits
        if self.splits is None:
            self.splits = (
                {s: 1 / 6 for s in split_names}
                if self.flavor == "s3dis"
                else {split_names[0]: 0.75, split_names[1]: 0.25}
            )
        minimums = {
            "scenes": 1,
            "seed": 0,
            "points_per_scene": 100,
            "views_per_scene": 1,
            "image_width": 16,
            "image_height": 16,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.coord_noise, (int, float)) or not 0.0 <= self.coord_noise <= MAX_COORD_NOISE_M:
            raise ConfigError(
                f"coord_noise: must be between 0 and {MAX_COORD_NOISE_M} metres, got {self.coord_noise!r}"
            )
        if not isinstance(self.splits, dict) or not self.splits:
            raise ConfigError(f"splits: must map split names to fractions, got {self.splits!r}")
        for name, fraction in self.splits.items():
            if name not in split_names:
                raise ConfigError(f"splits: {self.flavor} has no split {name!r}; use {', '.join(split_names)}")
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0:
                raise ConfigError(f"splits.{name}: fraction must be > 0, got {fraction!r}")
        if not math.isclose(sum(self.splits.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"splits: fractions must sum to 1, got {sum(self.splits.values())}")


# --------------------------------------------------------------------------------------------------
# Objects: each kind builds its parts as axis-aligned spans in its own frame (x across, y from back
# to front, z up, origin on the floor below its centre); placing it adds a yaw and a position.


@dataclass(frozen=True)
class _Part:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    accent: bool  # drawn in the object's accent colour (legs, frames) instead of its main colour


def _span(x0, x1, y0, y1, z0, z1, accent=False) -> _Part:
    return _Part((x0, y0, z0), (x1, y1, z1), accent)


def _legs(half_x: float, half_y: float, height: float, leg: float) -> list[_Part]:
    """Four square legs of half-width `leg` under the corners of a (2 half_x, 2 half_y) top."""
    return [
        _span(
            sx * (half_x - leg) - leg,
            sx * (half_x - leg) + leg,
            sy * (half_y - leg) - leg,
            sy * (half_y - leg) + leg,
            0.0,
            height,
            accent=True,
        )
        for sx in (-1, 1)
        for sy in (-1, 1)
    ]


def _chair(rng):
    s = rng.uniform(0.20, 0.25)
    seat = rng.uniform(0.42, 0.48)
    top = seat + 0.04 + rng.uniform(0.35, 0.50)
    return [
        *_legs(s, s, seat, 0.02),
        _span(-s, s, -s, s, seat, seat + 0.04),
        _span(-s, s, -s, -s + 0.04, seat + 0.04, top),
    ]


def _table(rng):
    x, y, h = rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.5), rng.uniform(0.70, 0.78)
    return [*_legs(x - 0.04, y - 0.04, h - 0.04, 0.03), _span(-x, x, -y, y, h - 0.04, h)]


def _desk(rng):
    x, y, h = rng.uniform(0.5, 0.8), rng.uniform(0.28, 0.38), rng.uniform(0.72, 0.76)
    return [
        _span(-x, -x + 0.03, -y, y, 0.0, h - 0.03, accent=True),
        _span(x - 0.03, x, -y, y, 0.0, h - 0.03, accent=True),
        _span(-x + 0.03, x - 0.03, -y, -y + 0.03, h * 0.45, h - 0.03, accent=True),
        _span(-x, x, -y, y, h - 0.03, h),
    ]


def _cabinet(rng):
    x, y, h = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.3), rng.uniform(0.5, 1.0)
    return [_span(-x, x, -y, y, 0.05, h), _span(-x + 0.03, x - 0.03, -y + 0.03, y - 0.03, 0.0, 0.05, accent=True)]


def _bookshelf(rng):
    x, y, h = rng.uniform(0.3, 0.6), rng.uniform(0.13, 0.2), rng.uniform(1.2, 2.0)
    board = 0.02
    parts = [
        _span(-x, -x + board, -y, y, 0.0, h),
        _span(x - board, x, -y, y, 0.0, h),
        _span(-x + board, x - board, -y, -y + board, 0.0, h),
    ]
    shelves = int(h / rng.uniform(0.3, 0.4)) + 1
    for z in np.linspace(0.0, h - board, shelves):
        parts.append(_span(-x + board, x - board, -y + board, y, z, z + board))
    return parts


def _bed(rng):
    x, y = rng.uniform(0.45, 0.9), rng.uniform(0.95, 1.05)
    base, mattress = rng.uniform(0.25, 0.35), rng.uniform(0.15, 0.25)
    return [
        _span(-x, x, -y + 0.06, y, 0.0, base, accent=True),
        _span(-x, x, -y + 0.06, y, base, base + mattress),
        _span(-x, x, -y, -y + 0.06, 0.0, base + mattress + rng.uniform(0.4, 0.7), accent=True),
    ]


def _sofa(rng):
    x, y, seat = rng.uniform(0.7, 1.2), rng.uniform(0.4, 0.5), rng.uniform(0.40, 0.45)
    arm, back = 0.15, rng.uniform(0.15, 0.22)
    return [
        _span(-x + arm, x - arm, -y + back, y, 0.0, seat),
        _span(-x, x, -y, -y + back, 0.0, seat + 0.4),
        _span(-x, -x + arm, -y + back, y, 0.0, seat + 0.18),
        _span(x - arm, x, -y + back, y, 0.0, seat + 0.18),
    ]


def _counter(rng):
    x, y, h = rng.uniform(0.6, 1.25), rng.uniform(0.28, 0.32), rng.uniform(0.86, 0.92)
    return [_span(-x, x, -y, y - 0.03, 0.0, h - 0.04, accent=True), _span(-x, x, -y, y, h - 0.04, h)]


def _refrigerator(rng):
    x, y, h = rng.uniform(0.3, 0.43), rng.uniform(0.3, 0.37), rng.uniform(1.5, 1.9)
    return [_span(-x, x, -y, y, 0.0, h)]


def _toilet(rng):
    return [
        _span(-0.18, 0.18, -0.2, 0.3, 0.0, rng.uniform(0.38, 0.42)),
        _span(-0.2, 0.2, -0.3, -0.12, 0.38, rng.uniform(0.75, 0.85)),
    ]


def _sink(rng):
    z = rng.uniform(0.75, 0.82)
    return [
        _span(-0.08, 0.08, -0.2, -0.04, 0.0, z, accent=True),
        _span(-rng.uniform(0.22, 0.3), rng.uniform(0.22, 0.3), -0.22, 0.2, z, z + 0.15),
    ]


def _bathtub(rng):
    x, y, h, rim = rng.uniform(0.35, 0.4), rng.uniform(0.75, 0.85), rng.uniform(0.5, 0.6), 0.08
    # hollow: a bottom slab and four rims, so the inside is a visible basin
    return [
        _span(-x, x, -y, y, 0.0, 0.12),
        _span(-x, -x + rim, -y, y, 0.12, h),
        _span(x - rim, x, -y, y, 0.12, h),
        _span(-x + rim, x - rim, -y, -y + rim, 0.12, h),
        _span(-x + rim, x - rim, y - rim, y, 0.12, h),
    ]


def _other_furniture(rng):
    x, y, h = rng.uniform(0.15, 0.45), rng.uniform(0.15, 0.4), rng.uniform(0.3, 1.1)
    top = rng.uniform(0.5, 1.0)
    return [_span(-x, x, -y, y, 0.0, h, accent=True), _span(-x * top, x * top, -y * top, y * top, h, h + 0.1)]


def _clutter(rng):
    x, y, h = rng.uniform(0.05, 0.2, size=3) * (1.0, 1.0, 2.0)
    return [_span(-x, x, -y, y, 0.0, h)]


# Wall-mounted kinds: y = 0 is the wall plane, +y points into the room.
def _door(rng):
    x, t = rng.uniform(0.4, 0.5), rng.uniform(0.03, 0.06)
    return [_span(-x, x, -t, t, 0.0, rng.uniform(2.0, 2.1))]


def _window(rng):
    x, t, sill = rng.uniform(0.4, 0.8), rng.uniform(0.02, 0.05), rng.uniform(0.8, 1.0)
    return [_span(-x, x, -t, t, sill, sill + rng.uniform(1.0, 1.4))]


def _picture(rng):
    x, z, half_h = rng.uniform(0.15, 0.5), rng.uniform(1.3, 1.7), rng.uniform(0.15, 0.4)
    return [_span(-x, x, -0.02, 0.02, z - half_h, z + half_h)]


def _curtain(rng):
    x, off = rng.uniform(0.3, 0.8), rng.uniform(0.06, 0.12)
    return [_span(-x, x, off, off + 0.05, 0.05, rng.uniform(2.1, 2.4))]


def _shower_curtain(rng):
    x, off = rng.uniform(0.4, 0.8), rng.uniform(0.7, 0.9)
    return [_span(-x, x, off, off + 0.02, 0.3, rng.uniform(1.9, 2.1))]


Mount = Literal["wall", "against_wall", "free"]


@dataclass(frozen=True)
class _Kind:
    label: int  # ScanNet-20 id, or IGNORE_INDEX for unannotated clutter
    build: Callable[[np.random.Generator], list[_Part]]
    mount: Mount  # on a wall plane / standing with its back to a wall / anywhere on the floor
    materials: tuple[str, ...]


_MATERIALS = {
    "white": (226, 222, 214),
    "beige": (204, 186, 152),
    "grey": (138, 138, 140),
    "dark": (52, 50, 54),
    "wood": (146, 100, 62),
    "light_wood": (196, 160, 112),
    "metal": (172, 176, 182),
    "glass": (168, 196, 214),
    "blue_fabric": (66, 88, 138),
    "red_fabric": (148, 60, 54),
    "green_fabric": (82, 118, 78),
}
_FABRICS = ("blue_fabric", "red_fabric", "green_fabric")
_WOODS = ("wood", "light_wood")
_ACCENTS = ("dark", "metal", "wood", "white")
_ANY = tuple(_MATERIALS)

# Classes share materials on purpose, so that colour alone cannot tell them apart.
WALL_MATERIALS = ("white", "beige", "grey")
FLOOR_MATERIALS = (*_WOODS, "grey", "beige")
DOOR = _Kind(class_id("door"), _door, "wall", (*_WOODS, "white"))
WINDOW = _Kind(class_id("window"), _window, "wall", ("glass", "white"))
PICTURE = _Kind(class_id("picture"), _picture, "wall", _ANY)
CURTAIN = _Kind(class_id("curtain"), _curtain, "wall", (*_FABRICS, "beige", "white"))
SHOWER_CURTAIN = _Kind(class_id("shower curtain"), _shower_curtain, "wall", ("white", "blue_fabric", "beige"))
BED = _Kind(class_id("bed"), _bed, "against_wall", ("white", "beige", *_FABRICS))
CABINET = _Kind(class_id("cabinet"), _cabinet, "against_wall", (*_WOODS, "white", "grey"))
DESK = _Kind(class_id("desk"), _desk, "against_wall", (*_WOODS, "white", "dark"))
BOOKSHELF = _Kind(class_id("bookshelf"), _bookshelf, "against_wall", (*_WOODS, "white", "dark"))
SOFA = _Kind(class_id("sofa"), _sofa, "against_wall", (*_FABRICS, "grey", "beige"))
COUNTER = _Kind(class_id("counter"), _counter, "against_wall", ("white", "grey", "wood", "dark"))
REFRIGERATOR = _Kind(class_id("refridgerator"), _refrigerator, "against_wall", ("white", "metal", "grey"))
TOILET = _Kind(class_id("toilet"), _toilet, "against_wall", ("white",))
SINK = _Kind(class_id("sink"), _sink, "against_wall", ("white", "metal"))
BATHTUB = _Kind(class_id("bathtub"), _bathtub, "against_wall", ("white", "beige"))
CHAIR = _Kind(class_id("chair"), _chair, "free", ("dark", *_WOODS, *_FABRICS))
TABLE = _Kind(class_id("table"), _table, "free", (*_WOODS, "white", "dark"))
OTHER_FURNITURE = _Kind(class_id("otherfurniture"), _other_furniture, "free", _ANY)
CLUTTER = _Kind(IGNORE_INDEX, _clutter, "free", _ANY)


@dataclass(frozen=True)
class _RoomType:
    side: tuple[float, float]  # range of the floor's side lengths, metres
    contents: tuple[tuple[_Kind, int, int], ...]  # (kind, min count, max count), placed in this order


_ROOM_TYPES = (
    _RoomType(
        (3.0, 5.0),
        (
            (DOOR, 1, 1),
            (WINDOW, 1, 2),
            (CURTAIN, 0, 2),
            (PICTURE, 0, 3),
            (BED, 1, 1),
            (CABINET, 0, 2),
            (DESK, 0, 1),
            (BOOKSHELF, 0, 1),
            (CHAIR, 0, 2),
            (OTHER_FURNITURE, 0, 1),
            (CLUTTER, 0, 3),
        ),
    ),
    _RoomType(
        (4.0, 7.0),
        (
            (DOOR, 1, 1),
            (WINDOW, 1, 3),
            (CURTAIN, 0, 2),
            (PICTURE, 0, 3),
            (SOFA, 1, 2),
            (BOOKSHELF, 0, 2),
            (CABINET, 0, 2),
            (TABLE, 1, 2),
            (CHAIR, 1, 4),
            (OTHER_FURNITURE, 0, 2),
            (CLUTTER, 0, 3),
        ),
    ),
    _RoomType(
        (3.5, 6.0),
        (
            (DOOR, 1, 1),
            (WINDOW, 1, 2),
            (PICTURE, 0, 2),
            (DESK, 1, 3),
            (BOOKSHELF, 1, 2),
            (CABINET, 0, 2),
            (TABLE, 0, 1),
            (CHAIR, 1, 4),
            (CLUTTER, 0, 3),
        ),
    ),
    _RoomType(
        (3.0, 5.0),
        (
            (DOOR, 1, 1),
            (WINDOW, 0, 1),
            (COUNTER, 1, 2),
            (REFRIGERATOR, 1, 1),
            (SINK, 0, 1),
            (CABINET, 1, 2),
            (TABLE, 0, 1),
            (CHAIR, 0, 4),
            (CLUTTER, 0, 3),
        ),
    ),
    _RoomType(
        (2.2, 3.5),
        (
            (DOOR, 1, 1),
            (WINDOW, 0, 1),
            (SHOWER_CURTAIN, 0, 1),
            (PICTURE, 0, 1),
            (TOILET, 1, 1),
            (SINK, 1, 1),
            (BATHTUB, 0, 1),
            (CABINET, 0, 1),
            (CLUTTER, 0, 2),
        ),
    ),
)


# --------------------------------------------------------------------------------------------------
# Scene: the room plus every object part as an oriented box.


@dataclass
class _Scene:
    room: np.ndarray  # (3,) the room's inside spans [0, room] on each axis
    center: np.ndarray  # (B, 3) box centres
    half: np.ndarray  # (B, 3) half extents in the box frame
    yaw: np.ndarray  # (B,) rotation about +z of the box frame
    label: np.ndarray  # (B,) ScanNet-20 ids
    instance: np.ndarray  # (B,)
    color: np.ndarray  # (B, 3) float RGB
    room_color: np.ndarray  # (5, 3) walls at x=0, x=max, y=0, y=max, then the floor


@dataclass
class _Faces:
    """All surfaces of a scene: the room's five faces, then six faces per box (axis * 2 + positive side)."""

    center: np.ndarray  # (F, 3)
    u: np.ndarray  # (F, 3) half edge
    v: np.ndarray  # (F, 3) half edge
    normal: np.ndarray  # (F, 3) outward from the box, inward for the room
    owner: np.ndarray  # (F,) box index, -1 for the room
    label: np.ndarray
    instance: np.ndarray
    color: np.ndarray  # (F, 3) float RGB, shaded


ROOM_FACES = 5


_BOX_CORNER_SIGNS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
# corner pairs that differ in exactly one sign
_BOX_EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8) if bin(i ^ j).count("1") == 1])


def _rotation_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _material_color(rng, materials: tuple[str, ...]) -> np.ndarray:
    """A material's colour with a per-object tint, so instances of a class differ."""
    base = np.array(_MATERIALS[materials[rng.integers(len(materials))]], dtype=float)
    # mostly a brightness change: independent channel shifts would turn greys green or pink
    return np.clip(base * rng.uniform(0.85, 1.15) + rng.normal(0.0, 5.0, 3), 0.0, 255.0)


def _footprint(parts: list[_Part], rotation: np.ndarray, position: np.ndarray) -> np.ndarray:
    """World-space (x0, y0, x1, y1) bounds of the parts' floor plan."""
    lo = np.min([p.lo for p in parts], axis=0)
    hi = np.max([p.hi for p in parts], axis=0)
    corners = np.array([[x, y, 0.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])]) @ rotation.T + position
    return np.concatenate([corners[:, :2].min(0), corners[:, :2].max(0)])


def _overlaps(rect: np.ndarray, others: list[np.ndarray]) -> bool:
    return any(rect[0] < o[2] and o[0] < rect[2] and rect[1] < o[3] and o[1] < rect[3] for o in others)


def _random_placement(rng, kind: _Kind, parts: list[_Part], room: np.ndarray):
    """(yaw, position) for one object; wall-bound kinds face into the room from a random wall."""
    if kind.mount == "free":
        return rng.uniform(0.0, 2 * math.pi), np.array([*rng.uniform(0.3, room[:2] - 0.3), 0.0])
    wall = rng.integers(4)
    inward_angle = (0.0, math.pi, 0.5 * math.pi, 1.5 * math.pi)[wall]  # walls x=0, x=max, y=0, y=max
    yaw = inward_angle - 0.5 * math.pi  # turns the object's +y (its front) to face into the room
    width = max(p.hi[0] for p in parts) - min(p.lo[0] for p in parts)
    along_axis = 1 if wall < 2 else 0
    along = rng.uniform(width / 2 + 0.05, max(room[along_axis] - width / 2 - 0.05, width / 2 + 0.06))
    # an object against a wall keeps a small gap; one on the wall sits on its plane
    depth_back = -min(p.lo[1] for p in parts)
    off = depth_back + rng.uniform(0.02, 0.08) if kind.mount == "against_wall" else 0.0
    position = np.zeros(3)
    position[along_axis] = along
    position[1 - along_axis] = off if wall % 2 == 0 else room[1 - along_axis] - off
    return yaw, position


def _place(
    rng, kind: _Kind, parts: list[_Part], room: np.ndarray, floor_taken: list[np.ndarray], wall_taken: list[np.ndarray]
) -> tuple[float, np.ndarray] | None:
    """(yaw, position) of a free spot for the object, recording the space it takes; None if the room has none."""
    for _attempt in range(20):
        yaw, position = _random_placement(rng, kind, parts, room)
        rotation = _rotation_z(yaw)
        rect = _footprint(parts, rotation, position)
        if kind.mount == "wall":
            if _overlaps(rect, wall_taken):
                continue
            wall_taken.append(rect)
            if kind is DOOR:  # keep the floor in front of a door free
                floor_taken.append(_footprint([_span(-0.5, 0.5, 0.0, 0.9, 0.0, 0.0)], rotation, position))
            elif min(p.lo[2] for p in parts) < 0.5:  # curtains reaching the floor keep furniture out
                floor_taken.append(rect)
            return yaw, position
        inside_room = rect[0] >= 0.0 and rect[1] >= 0.0 and rect[2] <= room[0] and rect[3] <= room[1]
        if inside_room and not _overlaps(rect, floor_taken):
            floor_taken.append(rect)
            return yaw, position
    return None


def _build_scene(rng) -> _Scene:
    room_type = _ROOM_TYPES[rng.integers(len(_ROOM_TYPES))]
    room = np.array([*rng.uniform(*room_type.side, size=2), rng.uniform(2.5, 3.0)])
    room_color = np.stack([_material_color(rng, WALL_MATERIALS)] * 4 + [_material_color(rng, FLOOR_MATERIALS)])
    boxes = []  # (center, half, yaw, label, instance, color); the door is always placed, so never empty
    floor_taken: list[np.ndarray] = []  # floor-plan rectangles of placed objects and door clearances
    wall_taken: list[np.ndarray] = []
    next_instance = ROOM_FACES  # instances 0-3 are the walls, 4 the floor
    for kind, low, high in room_type.contents:
        for _ in range(rng.integers(low, high + 1)):
            parts = kind.build(rng)
            placement = _place(rng, kind, parts, room, floor_taken, wall_taken)
            if placement is None:
                continue
            yaw, position = placement
            rotation = _rotation_z(yaw)
            main, accent = _material_color(rng, kind.materials), _material_color(rng, _ACCENTS)
            instance = IGNORE_INDEX if kind.label == IGNORE_INDEX else next_instance
            next_instance += kind.label != IGNORE_INDEX
            for part in parts:
                lo, hi = np.array(part.lo), np.array(part.hi)
                center = rotation @ ((lo + hi) / 2) + position
                boxes.append((center, (hi - lo) / 2, yaw, kind.label, instance, accent if part.accent else main))
    center, half, yaw, label, instance, color = (np.array(column) for column in zip(*boxes))
    return _Scene(
        room, center, half, yaw.astype(float), label.astype(np.int64), instance.astype(np.int64), color, room_color
    )


def _shade(color: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Fixed directional lighting baked into colours, as in a scanned mesh."""
    return color * (0.8 + 0.2 * (normal @ LIGHT_DIRECTION))[..., None]


def _scene_faces(scene: _Scene) -> _Faces:
    w, d, h = scene.room
    room_center = np.array(
        [[0, d / 2, h / 2], [w, d / 2, h / 2], [w / 2, 0, h / 2], [w / 2, d, h / 2], [w / 2, d / 2, 0]]
    )
    room_u = np.array([[0, d / 2, 0], [0, d / 2, 0], [w / 2, 0, 0], [w / 2, 0, 0], [w / 2, 0, 0]])
    room_v = np.array([[0, 0, h / 2]] * 4 + [[0, d / 2, 0]])
    room_normal = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    room_label = np.array([class_id("wall")] * 4 + [class_id("floor")])

    count = len(scene.center)
    # axes[b, k] is box b's k-th axis in world space
    axes = np.stack([_rotation_z(y) for y in scene.yaw]).transpose(0, 2, 1)
    centers, us, vs, normals = [], [], [], []
    for axis in range(3):
        other_u, other_v = (axis + 1) % 3, (axis + 2) % 3
        for sign in (-1.0, 1.0):
            normal = sign * axes[:, axis]
            centers.append(scene.center + normal * scene.half[:, axis : axis + 1])
            us.append(axes[:, other_u] * scene.half[:, other_u : other_u + 1])
            vs.append(axes[:, other_v] * scene.half[:, other_v : other_v + 1])
            normals.append(normal)

    def per_box(arrays):  # (6, B, ...) in face order -> (B * 6, ...) grouped by box
        return np.stack(arrays, axis=1).reshape(count * 6, *arrays[0].shape[1:])

    normal = np.concatenate([room_normal, per_box(normals)])
    base_color = np.concatenate([scene.room_color, np.repeat(scene.color, 6, axis=0)])
    return _Faces(
        center=np.concatenate([room_center, per_box(centers)]),
        u=np.concatenate([room_u, per_box(us)]),
        v=np.concatenate([room_v, per_box(vs)]),
        normal=normal,
        owner=np.concatenate([np.full(ROOM_FACES, -1), np.repeat(np.arange(count), 6)]),
        label=np.concatenate([room_label, np.repeat(scene.label, 6)]),
        instance=np.concatenate([np.arange(ROOM_FACES), np.repeat(scene.instance, 6)]),
        color=_shade(base_color, normal),
    )


# --------------------------------------------------------------------------------------------------
# Point cloud


def _exposed(scene: _Scene, points: np.ndarray, owner: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Which surface samples are exposed: inside the room, not on an object's underside, not inside another box."""
    keep = np.all((points >= -SURFACE_EPS_M) & (points <= scene.room + SURFACE_EPS_M), axis=1)
    keep &= ~((normal[:, 2] < -0.5) & (points[:, 2] < SURFACE_EPS_M))  # bottoms resting on the floor
    # with the points sorted by x, each box only tests the slice that its x extent can reach
    order = np.argsort(points[:, 0])
    sorted_x = points[order, 0]
    for box, (center, half, yaw) in enumerate(zip(scene.center, scene.half, scene.yaw)):
        reach_x = abs(math.cos(yaw)) * half[0] + abs(math.sin(yaw)) * half[1] + SURFACE_EPS_M
        start, stop = np.searchsorted(sorted_x, [center[0] - reach_x, center[0] + reach_x])
        candidate = order[start:stop]
        local = (points[candidate] - center) @ _rotation_z(yaw)
        inside = np.all(np.abs(local) < half + SURFACE_EPS_M, axis=1) & (owner[candidate] != box)
        keep[candidate[inside]] = False
    return keep


def _sample_points(scene: _Scene, faces: _Faces, count: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """`count` points spread uniformly over the exposed surfaces, with the face each lies on."""
    area = 4.0 * np.linalg.norm(faces.u, axis=1) * np.linalg.norm(faces.v, axis=1)
    probability = area / area.sum()
    points, face_ids, found = [], [], 0
    while found < count:  # hidden samples are discarded, so draw a margin and repeat if short
        draw = int(1.3 * (count - found)) + 64
        face = rng.choice(len(area), size=draw, p=probability)
        a, b = rng.uniform(-1.0, 1.0, size=(2, draw, 1))
        candidate = faces.center[face] + a * faces.u[face] + b * faces.v[face]
        keep = _exposed(scene, candidate, faces.owner[face], faces.normal[face])
        points.append(candidate[keep])
        face_ids.append(face[keep])
        found += int(keep.sum())
    return np.concatenate(points)[:count], np.concatenate(face_ids)[:count]


# --------------------------------------------------------------------------------------------------
# Cameras and ray casting


def _intrinsic(width: int, height: int) -> np.ndarray:
    focal = 0.9 * width
    return np.array(
        [[focal, 0, (width - 1) / 2, 0], [0, focal, (height - 1) / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32
    )


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose with OpenCV axes: x right, y down, z forward."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, np.cross(forward, right), forward, position
    return pose.astype(np.float32)


def _random_pose(scene: _Scene, rng) -> np.ndarray:
    room = scene.room
    for _ in range(200):
        position = np.array([*rng.uniform(0.3, room[:2] - 0.3), rng.uniform(1.2, min(1.8, room[2] - 0.3))])
        target = np.array([*rng.uniform(0.2 * room[:2], 0.8 * room[:2]), rng.uniform(0.2, 1.0)])
        if np.linalg.norm(target[:2] - position[:2]) < 0.8:
            continue
        local = np.einsum("bij,bi->bj", np.stack([_rotation_z(y) for y in scene.yaw]), position - scene.center)
        if not np.any(np.all(np.abs(local) < scene.half + 0.15, axis=1)):  # camera not inside furniture
            return look_at(position, target)
    raise RuntimeError("no free camera position found in the synthetic room")


def _render(scene: _Scene, intrinsic: np.ndarray, pose: np.ndarray, width: int, height: int):
    """Ray cast one view: (face index per pixel, -1 for no surface; z-depth per pixel in metres, 0 for none)."""
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    rotation, origin = pose[:3, :3].astype(float), pose[:3, 3].astype(float)
    # camera-space ray directions are ((column - cx) / fx, (row - cy) / fy, 1): with z = 1 the ray
    # parameter t is the z-depth
    across = (np.arange(width) - cx) / fx
    down = (np.arange(height) - cy) / fy
    direction = rotation @ np.stack([np.tile(across, height), np.repeat(down, width), np.ones(width * height)])

    # the room's inside is convex and holds the camera: each ray ends on the first room plane it
    # crosses; on each axis the positive t of the two planes is the larger one
    depth = np.full(width * height, np.inf)
    face = np.full(width * height, -1)
    for axis, d in enumerate(direction):
        with np.errstate(divide="ignore"):
            t = np.maximum((scene.room[axis] - origin[axis]) / d, -origin[axis] / d)
        nearer = t < depth
        depth[nearer] = t[nearer]
        face[nearer] = 2 * axis + (d[nearer] > 0)
    face[face == ROOM_FACES] = -1  # the ceiling: left open, as in ScanNet meshes
    depth[face < 0] = np.inf

    world_to_camera = np.linalg.inv(pose.astype(float))
    for box in range(len(scene.center)):
        pixels = _box_pixels(scene, box, world_to_camera, intrinsic, width, height)
        if pixels is None:
            continue
        to_box = _rotation_z(scene.yaw[box]).T
        o = to_box @ (origin - scene.center[box])
        d = to_box @ direction[:, pixels]
        # slab test: the ray is inside the box between the last entry and the first exit over the axes
        t_near = np.full(len(pixels), -np.inf)
        t_far = np.full(len(pixels), np.inf)
        entry_face = np.zeros(len(pixels), dtype=np.int64)
        for axis, half in enumerate(scene.half[box]):
            with np.errstate(divide="ignore", invalid="ignore"):
                t_minus, t_plus = (-half - o[axis]) / d[axis], (half - o[axis]) / d[axis]
            enter = np.fmin(t_minus, t_plus)
            later = enter > t_near
            t_near[later] = enter[later]
            entry_face[later] = 2 * axis + (d[axis][later] < 0)  # moving towards -axis enters the + face
            t_far = np.fmin(t_far, np.fmax(t_minus, t_plus))
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < depth[pixels])
        depth[pixels[hit]] = t_near[hit]
        face[pixels[hit]] = ROOM_FACES + 6 * box + entry_face[hit]
    depth[face < 0] = 0.0
    return face.reshape(height, width), depth.reshape(height, width)


def _box_pixels(
    scene: _Scene, box: int, world_to_camera: np.ndarray, intrinsic: np.ndarray, width: int, height: int
) -> np.ndarray | None:
    """Flat indices of the pixels whose rays may hit `box`: its projection's bounding rectangle."""
    corners = _BOX_CORNER_SIGNS * scene.half[box] @ _rotation_z(scene.yaw[box]).T + scene.center[box]
    camera = corners @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    # the part of the box in front of the camera is spanned by the corners there and the points
    # where its edges cross the near plane
    a, b = camera[_BOX_EDGES[:, 0]], camera[_BOX_EDGES[:, 1]]
    crossing = (a[:, 2] > NEAR_M) != (b[:, 2] > NEAR_M)
    fraction = (NEAR_M - a[crossing, 2]) / (b[crossing, 2] - a[crossing, 2])
    visible = np.concatenate([camera[camera[:, 2] > NEAR_M], a[crossing] + fraction[:, None] * (b - a)[crossing]])
    if len(visible) == 0:
        return None
    uv = visible[:, :2] / visible[:, 2:] * np.diag(intrinsic)[:2] + intrinsic[:2, 2]
    c0, r0 = np.maximum(np.floor(uv.min(0)).astype(int) - 1, 0)
    c1, r1 = np.minimum(np.ceil(uv.max(0)).astype(int) + 2, (width, height))
    if c0 >= c1 or r0 >= r1:
        return None
    return (np.arange(r0, r1)[:, None] * width + np.arange(c0, c1)[None, :]).ravel()


# --------------------------------------------------------------------------------------------------
# One synthetic scene, before it is written in a flavour's files


@dataclass
class _View:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth_mm: np.ndarray  # (H, W) uint16, 0 = no surface
    pose: np.ndarray  # (4, 4) float32 camera-to-world
    correspondence: np.ndarray  # (M, 3) float64 [column, row, point index], or no_correspondence()


@dataclass
class _Synthetic:
    coord: np.ndarray  # (N, 3) float32
    color: np.ndarray  # (N, 3) uint8
    normal: np.ndarray  # (N, 3) float32
    label: np.ndarray  # (N,) ScanNet-20 ids
    instance: np.ndarray  # (N,)
    intrinsic: np.ndarray  # (4, 4) float32
    views: list[_View]


def _generate(config: SynthConfig, rng, lifted: bool) -> _Synthetic:
    """A room, points sampled on its surfaces and rendered views; `lifted` makes the points the views' pixels
    instead, as RE10K's video-lifted scenes are (each view's pixels with a surface, in row-major order)."""
    scene = _build_scene(rng)
    faces = _scene_faces(scene)
    points, face = _sample_points(scene, faces, config.points_per_scene, rng)
    coord = (points + rng.normal(0.0, config.coord_noise, points.shape)).astype(np.float32)
    color = np.clip(np.rint(faces.color[face] + rng.normal(0.0, COLOR_NOISE, points.shape)), 0, 255).astype(np.uint8)
    width, height = config.image_width, config.image_height
    intrinsic = _intrinsic(width, height)
    faces_rgb = np.clip(np.rint(faces.color), 0, 255).astype(np.uint8)
    rendered = []
    for _view in range(config.views_per_scene):
        pose = _random_pose(scene, rng)
        pixel_face, depth = _render(scene, intrinsic, pose, width, height)
        # images carry no per-pixel noise: it would only slow PNG encoding and grow the files
        rgb = np.where(pixel_face[..., None] >= 0, faces_rgb[pixel_face], 0).astype(np.uint8)
        depth_mm = np.rint(np.minimum(depth, 65.535) * 1000.0).astype(np.uint16)
        rendered.append((pose, pixel_face, rgb, depth_mm))
    if lifted:
        return _lift(faces, intrinsic, rendered)
    views = [
        _View(
            rgb, depth_mm, pose, projected_correspondences(coord, depth_mm / 1000.0, intrinsic, pose, DEPTH_TOLERANCE_M)
        )
        for pose, _face, rgb, depth_mm in rendered
    ]
    return _Synthetic(
        coord, color, faces.normal[face].astype(np.float32), faces.label[face], faces.instance[face], intrinsic, views
    )


def _lift(faces: _Faces, intrinsic: np.ndarray, rendered: list) -> _Synthetic:
    coords, colors, face_ids, views, count = [], [], [], [], 0
    for pose, pixel_face, rgb, depth_mm in rendered:
        row, column = np.nonzero(depth_mm > 0)
        z = depth_mm[row, column] / 1000.0
        camera = np.stack(
            [(column - intrinsic[0, 2]) * z / intrinsic[0, 0], (row - intrinsic[1, 2]) * z / intrinsic[1, 1], z], axis=1
        )
        coords.append(camera @ pose[:3, :3].T.astype(np.float64) + pose[:3, 3])
        colors.append(rgb[row, column])
        face_ids.append(pixel_face[row, column])
        index = np.arange(count, count + len(row))
        count += len(row)
        table = np.stack([column, row, index], axis=1).astype(np.float64) if len(row) else no_correspondence()
        views.append(_View(rgb, depth_mm, pose, table))
    face = np.concatenate(face_ids)
    return _Synthetic(
        np.concatenate(coords),
        np.concatenate(colors),
        faces.normal[face],
        faces.label[face],
        faces.instance[face],
        intrinsic,
        views,
    )


# --------------------------------------------------------------------------------------------------
# Writing, one function per flavour (see flavors.py for the facts they follow)

# Each flavour's class id of every ScanNet-20 class (in SCANNET20_CLASSES order), then of unannotated clutter;
# classes a dataset lacks become its nearest class, or ignored.
_LABEL_IDS = {
    "scannet200": ((0, 2, 6, 10, 1, 5, 3, 4, 14, 16, 13, 30, 8, 18, 23, 47, 15, 12, 36, 134), IGNORE_INDEX),
    "scannetpp": ((0, 2, 6, 25, 9, 23, 3, 4, 14, 12, 39, 33, 3, 8, 34, 8, 47, 37, IGNORE_INDEX, 18), IGNORE_INDEX),
    "s3dis": ((2, 1, 12, 12, 8, 9, 7, 6, 5, 10, 11, 12, 7, 12, 12, 12, 12, 12, 12, 12), 12),  # no unlabelled points
    "hm3d": ((0, 1, 6, 10, 2, 9, 4, 3, 8, 30, 5, 25, 4, 11, 36, 11, 17, 14, 24, 35), 38),
    "structured3d": ((0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 9, 23, 10, 12, 17, 12, 23, 20, 23, 23), 24),
}
_WALL_HUNG = tuple(class_id(name) for name in ("door", "window", "picture", "curtain", "shower curtain"))


def _labels(flavour: str, label20: np.ndarray) -> np.ndarray:
    ids, clutter = _LABEL_IDS[flavour]
    return np.where(label20 == IGNORE_INDEX, clutter, np.asarray(ids)[label20])


def _npy(root: Path, rel: str, array: np.ndarray) -> str:
    """Save `array` at ROOT/`rel`; returns `rel` (split files hold root-relative paths)."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / rel, array)
    return rel


def _image(root: Path, rel: str, image: np.ndarray) -> str:
    """Save an image at ROOT/`rel`, in the format its suffix names (.png; JPEG for ScanNet++'s .JPG)."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / rel)
    return rel


def _depth(root: Path, rel: str, depth_mm: np.ndarray, none_mm: int = 0) -> None:
    """Depth in uint16 millimetres; `none_mm` marks pixels without a surface (ScanNet 0, ScanNet++ 65535)."""
    _image(root, rel, np.where(depth_mm > 0, depth_mm, none_mm).astype(np.uint16))


def _entries(key: str, pointclouds: str, images: list[str], corrs: list[str], group: int | None) -> dict:
    """Split-file entries: the frames in groups of `group` (Pointcept's splits.py uses 4), or all in one."""
    if group is None:
        return {key: {"pointclouds": pointclouds, "images": images, "correspondences": corrs}}
    return {
        f"{key}_{k}": {
            "pointclouds": pointclouds,
            "images": images[i : i + group],
            "correspondences": corrs[i : i + group],
        }
        for k, i in enumerate(range(0, len(images), group))
    }


def _points(root: Path, cloud: str, **arrays: np.ndarray) -> None:
    for key, array in arrays.items():
        _npy(root, f"{cloud}/{key}.npy", array)


def _labelled(config: SynthConfig, split: str) -> bool:
    return split not in flavor(config.flavor).unlabelled_splits


def _scannet(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """ScanNet (and ScanNet200: the same files): frames named by number, one 4x4 intrinsic per scene."""
    name = f"scene{index:04d}_00"
    cloud, images = f"{split}/{name}", f"images/{split}/{name}"
    _points(root, cloud, coord=scene.coord, color=scene.color, normal=scene.normal)
    if _labelled(config, split):
        _points(
            root,
            cloud,
            segment20=scene.label.astype(np.int64),
            segment200=_labels("scannet200", scene.label).astype(np.int64),
            instance=scene.instance.astype(np.int64),
        )
    _npy(root, f"{images}/intrinsic/intrinsic.npy", scene.intrinsic)
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        colors.append(_image(root, f"{images}/color/{i}.png", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/{i}.png", view.depth_mm)
        _npy(root, f"{images}/pose/{i}.npy", view.pose)
        corrs.append(_npy(root, f"{images}/correspondence/{i}.npy", view.correspondence))
    return _entries(name, cloud, colors, corrs, VIEWS_PER_SAMPLE)


def _scannetpp(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """ScanNet++: DSLR JPEGs keep their camera names, so pose and intrinsic (3x3) files are numbered by position;
    labels are (N, 3): up to three per point, the major (smallest) one first."""
    name = f"{index:010x}"
    cloud, images = f"{split}/{name}", f"images/{split}/{name}"
    _points(root, cloud, coord=scene.coord, color=scene.color, normal=scene.normal)
    if _labelled(config, split):
        segment = np.full((len(scene.label), 3), IGNORE_INDEX, dtype=np.int16)
        instance = np.full((len(scene.label), 3), IGNORE_INDEX, dtype=np.int16)
        segment[:, 0], instance[:, 0] = _labels("scannetpp", scene.label), scene.instance
        on_wall = np.isin(scene.label, _WALL_HUNG)  # a door, window or picture also lies on a wall
        segment[on_wall, 1], instance[on_wall, 1] = _labels("scannetpp", np.array([class_id("wall")]))[0], 0
        _points(root, cloud, segment=segment, instance=instance)
        if split == "train":
            _chunks(
                root,
                name,
                dict(coord=scene.coord, color=scene.color, normal=scene.normal, segment=segment, instance=instance),
                min_points=min(10000, config.points_per_scene // 2),
            )
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        frame = f"DSC{1000 + 20 * i:05d}"  # the preprocessing keeps every 20th image
        colors.append(_image(root, f"{images}/color/{frame}.JPG", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/{frame}.png", view.depth_mm, none_mm=65535)
        _npy(root, f"{images}/pose/{i}.npy", view.pose)
        _npy(root, f"{images}/intrinsic/{i}.npy", scene.intrinsic[:3, :3])
        corrs.append(_npy(root, f"{images}/correspondence/{frame}.npy", view.correspondence))
    return _entries(name, cloud, colors, corrs, VIEWS_PER_SAMPLE)


def _chunks(root: Path, name: str, arrays: dict[str, np.ndarray], min_points: int) -> None:
    """ScanNet++'s chunked training scenes, as Pointcept's README runs sampling_chunking_data.py: one point per
    1 cm voxel (--grid_size 0.01, which the script names "grid1mm"), then 6 x 6 m windows every 3 m over the floor
    plan (both axes spanned by the x extent, as there), each window with at least `min_points` points (there
    10000; capped here at half a synthetic scene) saved as <name>_<k> with the scene's arrays."""
    local = arrays["coord"] - arrays["coord"].min(axis=0)
    _, first = np.unique(np.floor(local / 0.01).astype(np.int64), axis=0, return_index=True)
    local, arrays = local[first], {key: value[first] for key, value in arrays.items()}
    starts = np.arange(0, local[:, 0].max() + 3 - 6, 3)
    k = 0
    for x0 in starts:
        for y0 in starts:
            inside = (local[:, 0] >= x0) & (local[:, 0] < x0 + 6) & (local[:, 1] >= y0) & (local[:, 1] < y0 + 6)
            if inside.sum() < min_points:
                continue
            _points(root, f"{SCANNETPP_CHUNK_SPLIT}/{name}_{k}", **{key: v[inside] for key, v in arrays.items()})
            k += 1


_S3DIS_ROOMS = ("office", "conferenceRoom", "hallway", "storage", "WC", "lobby", "pantry", "copyRoom", "lounge")


def _s3dis(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """S3DIS: rooms under Area_<k>; two cameras per room, each with its own image folder; (N, 1) labels with no
    unlabelled points; per-frame float64 intrinsics (3x3) and world-to-camera poses, numbered by position."""
    room = f"{_S3DIS_ROOMS[index % len(_S3DIS_ROOMS)]}_{index // len(_S3DIS_ROOMS) + 1}"
    cloud = f"{split}/{room}"
    _points(
        root,
        cloud,
        coord=scene.coord,
        color=scene.color,
        segment=_labels("s3dis", scene.label).astype(np.int16)[:, None],
        instance=scene.instance.astype(np.int16)[:, None],
        normal=scene.normal,
    )
    entries = {}
    cameras = min(2, len(scene.views))
    for c in range(cameras):
        camera = f"{index:08x}{c:024x}"
        images = f"images/{split}/{room}/{camera}"
        colors, corrs = [], []
        for i, view in enumerate(scene.views[c::cameras]):
            frame = f"camera_{camera}_{room}_frame_{5 * i}_domain"
            colors.append(_image(root, f"{images}/color/{frame}_rgb.png", view.rgb))
            if config.depth:
                _depth(root, f"{images}/depth/{frame}_depth.png", view.depth_mm)
            _npy(root, f"{images}/pose/{i}.npy", np.linalg.inv(view.pose.astype(np.float64)))
            _npy(root, f"{images}/intrinsic/{i}.npy", scene.intrinsic[:3, :3].astype(np.float64))
            corrs.append(_npy(root, f"{images}/correspondence/{frame}_rgb.npy", view.correspondence))
        entries.update(_entries(f"{room}_{camera}", cloud, colors, corrs, VIEWS_PER_SAMPLE))
    return entries


def _arkitscenes(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """ARKitScenes: no labels; the mesh's vertex table gives float32 colours; frames named
    <video>_<timestamp>, correspondences by timestamp alone; per-frame float64 intrinsics (3x3) and poses."""
    name = f"{41000000 + index}"
    cloud, images = f"{split}/{name}", f"images/{split}/{name}"
    _points(root, cloud, coord=scene.coord, color=scene.color.astype(np.float32), normal=scene.normal)
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        stamp = f"{5000 + 2.5 * i:.3f}"
        frame = f"{name}_{stamp}"
        colors.append(_image(root, f"{images}/color/{frame}.png", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/{frame}.png", view.depth_mm)
        _npy(root, f"{images}/intrinsic/{frame}.npy", scene.intrinsic[:3, :3].astype(np.float64))
        _npy(root, f"{images}/pose/{frame}.npy", view.pose.astype(np.float64))
        corrs.append(_npy(root, f"{images}/correspondence/{stamp}.npy", view.correspondence))
    return _entries(name, cloud, colors, corrs, VIEWS_PER_SAMPLE)


def _hm3d(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """HM3D: one folder per room of a scene; int16 (N,) mpcat40 labels; one intrinsic for the whole dataset."""
    name = f"{index:05d}_synthHM3D{index % 100:02d}_0_0"
    cloud, images = f"{split}/{name}", f"images/{split}/{name}"
    _points(
        root,
        cloud,
        coord=scene.coord,
        color=scene.color,
        normal=scene.normal,
        instance=scene.instance.astype(np.int16),
        segment=_labels("hm3d", scene.label).astype(np.int16),
    )
    _npy(root, "images/intrinsic/K.npy", scene.intrinsic[:3, :3].astype(np.float64))
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        colors.append(_image(root, f"{images}/color/{i}.png", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/{i}.png", view.depth_mm)
        _npy(root, f"{images}/pose/{i}.npy", view.pose.astype(np.float64))
        corrs.append(_npy(root, f"{images}/correspondence/{i}.npy", view.correspondence))
    return _entries(name, cloud, colors, corrs, VIEWS_PER_SAMPLE)


def _structured3d(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """Structured3D: scene_<k>/room_<r> folders, (N, 1) labels and no instances; perspective views under
    color/prsp with int64 correspondences, all of a room's views in one sample. (The panorama the preprocessing
    also writes is not in its split files, and not written here.)"""
    scene_dir, room = f"scene_{index:05d}", f"room_{index % 7}"
    cloud, images = f"{split}/{scene_dir}/{room}", f"images/{split}/{scene_dir}/{room}"
    _points(
        root,
        cloud,
        coord=scene.coord,
        color=scene.color,
        normal=scene.normal,
        segment=_labels("structured3d", scene.label).astype(np.int16)[:, None],
    )
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        colors.append(_image(root, f"{images}/color/prsp/{i}.png", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/prsp/{i}.png", view.depth_mm, none_mm=65535)
        _npy(root, f"{images}/intrinsic/{i}.npy", scene.intrinsic[:3, :3].astype(np.float64))
        _npy(root, f"{images}/pose/{i}.npy", view.pose.astype(np.float64))
        corrs.append(
            _npy(root, f"{images}/correspondence/prsp_correspondence/{i}.npy", view.correspondence.astype(np.int64))
        )
    return _entries(f"{scene_dir}_{room}", cloud, colors, corrs, None)


def _re10k(root: Path, split: str, index: int, scene: _Synthetic, config: SynthConfig) -> dict:
    """RE10K: points lifted from a video's frames (float64 coord and normal, no labels), every pixel of a frame
    corresponding to its own point; float32 3x3 intrinsics; all frames of a clip in one sample."""
    name = f"{index:016x}"
    cloud, images = f"{split}/{name}", f"images/{split}/{name}"
    _points(root, cloud, coord=scene.coord, color=scene.color, normal=scene.normal)
    colors, corrs = [], []
    for i, view in enumerate(scene.views):
        colors.append(_image(root, f"{images}/color/{i}.png", view.rgb))
        if config.depth:
            _depth(root, f"{images}/depth/{i}.png", view.depth_mm)
        _npy(root, f"{images}/pose/{i}.npy", view.pose.astype(np.float64))
        _npy(root, f"{images}/intrinsic/{i}.npy", scene.intrinsic[:3, :3])
        corrs.append(_npy(root, f"{images}/correspondence/{i}.npy", view.correspondence))
    return _entries(name, cloud, colors, corrs, None)


_WRITERS = {
    "scannet": _scannet,
    "scannet200": _scannet,
    "scannetpp": _scannetpp,
    "s3dis": _s3dis,
    "arkitscenes": _arkitscenes,
    "hm3d": _hm3d,
    "structured3d": _structured3d,
    "re10k": _re10k,
}


def _assign_splits(config: SynthConfig) -> list[str]:
    """The split of each scene index: consecutive blocks sized by the split fractions."""
    names = list(config.splits)
    ends = np.rint(np.cumsum(list(config.splits.values())) * config.scenes).astype(int)
    ends[-1] = config.scenes
    return [names[int(np.searchsorted(ends, k, side="right"))] for k in range(config.scenes)]


def _prepare_output(root: Path) -> None:
    """Make `root` an empty directory, clearing it only if it holds nothing but an earlier synthetic dataset."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output {str(root)!r} exists and is not a directory")
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        return
    if not (root / MARKER_FILE).is_file():
        raise FileExistsError(
            f"output directory {str(root)!r} is not empty and holds no {MARKER_FILE}, so it is "
            "not an earlier synthetic dataset; refusing to write into it"
        )
    ours = {*(s for f in FLAVORS.values() for s in f.splits), SCANNETPP_CHUNK_SPLIT, "images", "splits", MARKER_FILE}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
    if foreign:
        raise FileExistsError(
            f"output directory {str(root)!r} holds a synthetic dataset plus other entries "
            f"({', '.join(foreign)}); refusing to overwrite it"
        )
    for entry in root.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_synthetic_dataset(out: str | Path, config: SynthConfig, progress: bool = True) -> Path:
    """Write `config.scenes` synthetic scenes under `out` in the files of `config.flavor` and return that root.

    Scene k is drawn from its own generator seeded by (config.seed, k): the same seed gives
    byte-identical files, and a scene does not change when the number of scenes does.
    """
    root = Path(out)
    _prepare_output(root)
    # written first, so that an interrupted run can be overwritten by the next one
    (root / MARKER_FILE).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    samples: dict[str, dict] = {split: {} for split in config.splits}
    split_of = _assign_splits(config)
    write = _WRITERS[config.flavor]
    for index in tqdm(range(config.scenes), desc="synthetic scenes", unit="scene", disable=not progress):
        scene = _generate(config, np.random.default_rng([config.seed, index]), lifted=config.flavor == "re10k")
        samples[split_of[index]].update(write(root, split_of[index], index, scene, config))
    (root / "splits").mkdir()
    for split, entries in samples.items():
        (root / "splits" / f"{split}.json").write_text(json.dumps(entries, indent=4) + "\n")
    return root
