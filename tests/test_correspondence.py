"""Correspondence tables: Pointcept's nearest-point rule (scipy and torch searches alike), synth's projection rule."""

import numpy as np
import pytest
import torch

from concerto_ray.data.correspondence import (
    nearest_point_correspondences,
    no_correspondence,
    projected_correspondences,
)

DEVICES = [None, "cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # None: scipy's k-d tree

# A 6 x 4 camera whose pixels, on the plane 2 m in front of it, lie 0.2 m apart: far more than 1 cm.
WIDTH, HEIGHT, PLANE_DEPTH = 6, 4, 2.0
K = np.array([[10.0, 0.0, 2.5], [0.0, 10.0, 1.5], [0.0, 0.0, 1.0]])


def _pose(axis, angle: float, translation) -> np.ndarray:
    """Camera-to-world pose rotating by `angle` about `axis` (Rodrigues' formula), then translating."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    pose = np.eye(4)
    pose[:3, :3] = np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross
    pose[:3, 3] = translation
    return pose


POSE = _pose((1.0, 2.0, 3.0), 0.7, (1.0, -2.0, 0.5))


def _camera_point(column: int, row: int, depth: float) -> np.ndarray:
    """The camera-frame point that pixel (column, row) sees at z-depth `depth`."""
    return depth * np.array([(column - K[0, 2]) / K[0, 0], (row - K[1, 2]) / K[1, 1], 1.0])


def _to_world(camera_points, pose=POSE) -> np.ndarray:
    return np.asarray(camera_points) @ pose[:3, :3].T + pose[:3, 3]


def _offset(length: float, seed: int) -> np.ndarray:
    direction = np.random.default_rng(seed).normal(size=3)
    return length * direction / np.linalg.norm(direction)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_point_rule_on_a_plane_built_by_hand(device):
    depth = np.full((HEIGHT, WIDTH), PLANE_DEPTH)
    depth[0, 0], depth[1, 4], depth[2, 1] = np.inf, 0.0, np.nan  # no surface
    depth[3, 5] = PLANE_DEPTH + 0.5  # a surface 0.5 m behind the plane, where the cloud has no point
    # cloud point offsets from the plane point of their pixel: under 1 cm corresponds, over does not
    offsets = {(c, r): _offset(0.004, seed=10 * r + c) for r in range(HEIGHT) for c in range(WIDTH)}
    offsets[(4, 0)] = _offset(0.009, seed=1)
    offsets[(2, 2)] = _offset(0.015, seed=2)
    del offsets[(1, 3)]  # a plane pixel without a cloud point
    pixels = list(offsets)
    camera = [_camera_point(c, r, PLANE_DEPTH) + offsets[(c, r)] for c, r in pixels]
    camera.append(np.zeros(3))  # at the camera centre, where a 0-depth pixel would be lifted to
    camera.append(np.array([5.0, 5.0, 5.0]))  # far from everything
    order = np.random.default_rng(0).permutation(len(camera))  # point index != pixel order
    coord = np.empty((len(camera), 3), dtype=np.float32)
    coord[order] = _to_world(camera)
    index_of_pixel = {pixel: order[k] for k, pixel in enumerate(pixels)}

    unseen = {(0, 0), (4, 1), (1, 2), (5, 3), (2, 2)}  # no surface, the far surface, the 1.5 cm point
    expected = [
        [c, r, index_of_pixel[(c, r)]]
        for r in range(HEIGHT)
        for c in range(WIDTH)
        if (c, r) in index_of_pixel and (c, r) not in unseen
    ]
    assert len(expected) == WIDTH * HEIGHT - 6
    table = nearest_point_correspondences(coord, depth, K, POSE, device=device)
    assert table.dtype == np.float64
    np.testing.assert_array_equal(table, np.array(expected, dtype=np.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_point_rule_keeps_only_points_strictly_closer_than_the_limit(device):
    # with f = 1 and no principal offset every number here is exact: pixel (1, 0) at depth 2 is (2, 0, 2)
    intrinsic, depth = np.eye(3), np.full((1, 2), 2.0)
    coord = np.array([[2.0, 0.0, 2.5]], dtype=np.float32)  # exactly 0.5 m from pixel (1, 0)'s point
    exactly_at_limit = nearest_point_correspondences(coord, depth, intrinsic, np.eye(4), 0.5, device)
    assert exactly_at_limit.shape == (0, 3)  # a surface, but no point near it: an empty table, as the reference
    inside_limit = nearest_point_correspondences(coord, depth, intrinsic, np.eye(4), 0.5000001, device)
    np.testing.assert_array_equal(inside_limit, [[1.0, 0.0, 0.0]])


def _random_scene(seed: int):
    """A 64 x 48 ScanNet-like frame (float32 4x4 intrinsic and pose) and a cloud of about 2400 points: half the
    lifted pixels jittered by about 6 mm, so that many distances fall near 1 cm, plus 1000 random points."""
    rng = np.random.default_rng(seed)
    width, height = 64, 48
    intrinsic = np.eye(4, dtype=np.float32)
    intrinsic[:3, :3] = [[57.8, 0.0, 31.5], [0.0, 57.8, 23.5], [0.0, 0.0, 1.0]]
    pose = _pose(rng.normal(size=3), 2.0, rng.uniform(-3.0, 3.0, 3)).astype(np.float32)
    depth = rng.uniform(0.5, 4.0, (height, width)).astype(np.float32)
    depth[rng.random((height, width)) < 0.05] = np.inf
    depth[rng.random((height, width)) < 0.05] = 0.0
    row, column = np.nonzero(np.isfinite(depth) & (depth > 0))
    camera = (
        np.stack([(column - 31.5) / 57.8, (row - 23.5) / 57.8, np.ones(len(row))], axis=1) * depth[row, column, None]
    )
    lifted = _to_world(camera, pose.astype(np.float64))
    picked = lifted[rng.random(len(lifted)) < 0.5]
    jittered = picked + rng.normal(0.0, 0.006, picked.shape)
    scattered = rng.uniform(lifted.min(0), lifted.max(0), (1000, 3))
    coord = rng.permutation(np.concatenate([jittered, scattered])).astype(np.float32)
    return coord, depth, intrinsic, pose


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("max_distance", [0.01, 0.05])
def test_torch_search_gives_the_scipy_table(device, max_distance):
    coord, depth, intrinsic, pose = _random_scene(seed=3)
    expected = nearest_point_correspondences(coord, depth, intrinsic, pose, max_distance)
    assert 500 < len(expected) < np.isfinite(depth).sum()  # both near and far pixels are there
    table = nearest_point_correspondences(coord, depth, intrinsic, pose, max_distance, device=device)
    np.testing.assert_array_equal(table, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_point_rule_without_a_correspondence(device):
    coord = _to_world([_camera_point(2, 1, PLANE_DEPTH)]).astype(np.float32)
    plane = np.full((HEIGHT, WIDTH), PLANE_DEPTH)
    nowhere = np.where(np.arange(WIDTH) % 2 == 0, np.inf, 0.0)[None, :].repeat(HEIGHT, axis=0)
    broken = {"nan": POSE.copy(), "inf": POSE.copy()}
    broken["nan"][0, 3], broken["inf"][2, 2] = np.nan, np.inf
    cases = {
        "no surface": (coord, nowhere, POSE),
        "empty cloud": (coord[:0], plane, POSE),
        "NaN in the pose": (coord, plane, broken["nan"]),
        "inf in the pose": (coord, plane, broken["inf"]),
    }
    for name, (points, depth, pose) in cases.items():
        table = nearest_point_correspondences(points, depth, K, pose, device=device)
        np.testing.assert_array_equal(table, no_correspondence(), err_msg=name)
    assert nearest_point_correspondences(coord, plane, K, POSE, device=device).tolist() == [[2.0, 1.0, 0.0]]
    far = nearest_point_correspondences(coord + np.float32(0.1), plane, K, POSE, device=device)
    assert far.shape == (0, 3) and far.dtype == np.float64  # a surface far from the cloud: an empty table


def test_projected_rule_sees_visible_points_and_not_hidden_ones():
    depth = np.zeros((HEIGHT, WIDTH))  # no surface, but at the two pixels below
    depth[1, 1], depth[2, 4] = 1.0, 2.0
    camera = [
        _camera_point(1, 1, 2.0),  # 0: behind the surface 1 m away at pixel (1, 1): hidden
        _camera_point(1, 1, 1.0),  # 1: on that surface: seen
        np.array([0.0, 0.0, -1.0]),  # 2: behind the camera
        _camera_point(4, 2, 2.0) + [0.0, 0.0, 0.02],  # 3: 2 cm off the surface at pixel (4, 2): seen
        _camera_point(10, 1, 1.0),  # 4: outside the image
        _camera_point(3, 0, 1.0),  # 5: at a pixel without a surface
    ]
    coord = _to_world(camera).astype(np.float32)
    table = projected_correspondences(coord, depth, K, POSE, tolerance=0.03)
    np.testing.assert_array_equal(table, [[1.0, 1.0, 1.0], [4.0, 2.0, 3.0]])
    hidden_only = projected_correspondences(coord[[0, 2, 4, 5]], depth, K, POSE, tolerance=0.03)
    np.testing.assert_array_equal(hidden_only, no_correspondence())
