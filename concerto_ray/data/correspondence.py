"""Which pixel of a camera frame sees which point of a cloud: the correspondence tables of Pointcept's Concerto data.

A table holds rows [column, row, point index] as float64 (M, 3); a frame that sees no point gets the single row
`no_correspondence()`. Two rules build one from a depth image (H, W, metres; 0 or non-finite = no surface), the
intrinsic K (3x3, or 4x4 with K in its top left) and the camera-to-world pose (4x4, OpenCV axes):

- `nearest_point_correspondences`: the rule of Pointcept's Concerto preprocessing for ScanNet and S3DIS. Every pixel
  with a surface is lifted to 3-D; it corresponds to the cloud point nearest to it when that point is closer than
  `max_distance` (1 cm). The nearest-point search runs on the CPU with scipy's k-d tree, or with torch on a device
  (the GPU path), with the same result (but for a pixel exactly as far from two points: each search keeps one).
- `projected_correspondences`: the synthetic writer's rule (`synth.py`). Every point is projected to a pixel and
  corresponds to it when the depth image there agrees with the point's depth, so occluded points are left out.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.spatial import cKDTree

# Queries per torch search step: bounds the memory of the (query, candidate point) pairs a step holds.
_TORCH_QUERY_CHUNK = 1 << 16


def no_correspondence() -> np.ndarray:
    """The table Pointcept writes for a frame that sees no point: the single row (-1, -1, -1)."""
    return -np.ones((1, 3))


def nearest_point_correspondences(
    coord: np.ndarray,
    depth: np.ndarray,
    intrinsic: np.ndarray,
    pose: np.ndarray,
    max_distance: float = 0.01,
    device: str | None = None,
) -> np.ndarray:
    """Rows [column, row, point index] of the pixels whose lifted 3-D point has a cloud point closer than
    `max_distance` metres, that point being the nearest; rows in row-major pixel order (none: a (0, 3) table, as
    the reference's). A pose with NaN or inf, or a depth image without a surface, gives `no_correspondence()`.
    Depth 0 or NaN is no surface, as inf is in the reference's ray-cast depth (a depth camera writes 0 there).

    `device` None searches with scipy's cKDTree on the CPU; a torch device ("cuda", or "cpu") searches with torch
    there. Both give the same table, except where a lifted pixel is exactly as far from two points: scipy's tree
    and the torch search may each keep a different one (both nearest; scipy's is the reference's).
    """
    pose = np.asarray(pose)
    if not np.isfinite(pose).all():
        return no_correspondence()
    pixel, lifted = lift_pixels(depth, intrinsic, pose)
    if len(lifted) == 0 or len(coord) == 0:
        return no_correspondence()
    if device is None:
        distance, index = cKDTree(coord).query(lifted, k=1)
    else:
        distance, index = _nearest_torch(coord, lifted, max_distance, device)
    near = distance < max_distance
    # no pixel near the cloud: an empty (0, 3) table, as the reference writes (not `no_correspondence()`)
    return np.column_stack([pixel[near], index[near]]).astype(np.float64)


def lift_pixels(depth: np.ndarray, intrinsic: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [column, row] (M, 2) float64, their world points (M, 3) float32) of the pixels with a surface, in
    row-major order: point = R (depth K^-1 [column, row, 1]) + t.

    The arithmetic follows the reference's: K^-1 in K's dtype, the camera point and then the world point stored
    in float32, the rotation in float32 for a float32 pose and in float64 for a float64 one. So a pixel within
    rounding of the 1 cm limit falls on the same side as in Pointcept's files.
    """
    height, width = depth.shape
    row, column = np.divmod(np.arange(height * width), width)
    flat = depth.reshape(-1)
    surface = np.isfinite(flat) & (flat > 0)
    homogeneous = np.stack([column, row, np.ones_like(column)], axis=1)[surface].astype(np.float64)
    rays = (np.linalg.inv(np.asarray(intrinsic)[:3, :3]) @ homogeneous.T).T
    camera = (flat[surface, None] * rays).astype(np.float32)
    world = (camera @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)
    return homogeneous[:, :2], world


def _nearest_torch(
    coord: np.ndarray, queries: np.ndarray, max_distance: float, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Like cKDTree.query(queries, k=1), (distance, index), for the queries with a point closer than
    `max_distance`; the others may get a farther point, or (inf, len(coord)) when none is near.

    Points are bucketed in cubic cells a little wider than `max_distance` (so that rounding cannot put a point
    within `max_distance` of a query two cells away from it): the points that can answer a query lie in the
    3 x 3 x 3 cells around the query's, and their exact float64 distances give the nearest.
    """
    # imported here so that the NumPy rules, and synth.py which uses them, do not pay for importing torch
    import torch

    points = torch.as_tensor(np.asarray(coord, dtype=np.float64), device=device)
    targets = torch.as_tensor(np.asarray(queries, dtype=np.float64), device=device)
    cell = 1.01 * max_distance
    origin = torch.minimum(points.min(0).values, targets.min(0).values)
    point_cell = torch.floor((points - origin) / cell).long()
    target_cell = torch.floor((targets - origin) / cell).long()
    # one integer key per cell, with a free cell on every side so that neighbour keys stay unique
    extent = torch.maximum(point_cell.max(0).values, target_cell.max(0).values) + 3

    def key(cells):
        return ((cells[:, 0] + 1) * extent[1] + cells[:, 1] + 1) * extent[2] + cells[:, 2] + 1

    point_key = key(point_cell)
    order = torch.argsort(point_key)
    cell_keys, cell_sizes = torch.unique_consecutive(point_key[order], return_counts=True)
    cell_starts = torch.cumsum(cell_sizes, 0) - cell_sizes
    steps = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), device=device)
    neighbour_offsets = (steps[:, 0] * extent[1] + steps[:, 1]) * extent[2] + steps[:, 2]

    distance, index = [], []
    for start in range(0, len(targets), _TORCH_QUERY_CHUNK):
        chunk = slice(start, start + _TORCH_QUERY_CHUNK)
        neighbour_keys = key(target_cell[chunk])[:, None] + neighbour_offsets[None, :]
        pair_query, pair_point = _candidate_pairs(neighbour_keys, cell_keys, cell_starts, cell_sizes, order)
        d, i = _nearest_of_pairs(targets[chunk], points, pair_query, pair_point)
        distance.append(d)
        index.append(i)
    return torch.cat(distance).cpu().numpy(), torch.cat(index).cpu().numpy()


def _candidate_pairs(neighbour_keys, cell_keys, cell_starts, cell_sizes, order):
    """(query, point) index pairs: every point of every existing cell among each query's neighbour keys (Q, 27)."""
    import torch

    slot = torch.searchsorted(cell_keys, neighbour_keys).clamp(max=len(cell_keys) - 1)
    sizes = torch.where(cell_keys[slot] == neighbour_keys, cell_sizes[slot], 0).reshape(-1)
    first = cell_starts[slot].reshape(-1)
    queries = torch.arange(len(neighbour_keys), device=sizes.device).repeat_interleave(neighbour_keys.shape[1])
    pair_query = queries.repeat_interleave(sizes)
    # position of each pair inside its cell: a running count that restarts at every (query, cell)
    pair_start = (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)
    within = torch.arange(len(pair_query), device=sizes.device) - pair_start
    return pair_query, order[first.repeat_interleave(sizes) + within]


def _nearest_of_pairs(targets, points, pair_query, pair_point):
    """Per query: (distance to its nearest candidate, that candidate's index), (inf, len(points)) without one;
    of equally near candidates, the lowest index."""
    import torch

    diff = targets[pair_query] - points[pair_point]
    # summed in the order scipy sums, so that both give the same distances
    squared = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
    nearest = torch.full((len(targets),), torch.inf, dtype=squared.dtype, device=squared.device)
    nearest = nearest.scatter_reduce(0, pair_query, squared, reduce="amin")
    best = squared == nearest[pair_query]
    index = torch.full((len(targets),), len(points), dtype=pair_point.dtype, device=pair_point.device)
    index = index.scatter_reduce(0, pair_query[best], pair_point[best], reduce="amin")
    return nearest.sqrt(), index


def projected_correspondences(
    coord: np.ndarray, depth: np.ndarray, intrinsic: np.ndarray, pose: np.ndarray, tolerance: float
) -> np.ndarray:
    """Rows [column, row, point index] of the points the frame sees, in point order, or `no_correspondence()`.

    A point is seen at the pixel it projects to (nearest pixel centre) when its camera depth agrees with the
    depth image there within `tolerance` metres; a point behind another surface does not agree, so is not seen.
    """
    world_to_camera = np.linalg.inv(pose.astype(np.float64))
    camera = coord.astype(np.float64) @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    z = camera[:, 2]
    in_front = z > 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        column = np.rint(intrinsic[0, 0] * camera[:, 0] / z + intrinsic[0, 2])
        row = np.rint(intrinsic[1, 1] * camera[:, 1] / z + intrinsic[1, 2])
    height, width = depth.shape
    index = np.flatnonzero(in_front & (column >= 0) & (column < width) & (row >= 0) & (row < height))
    column, row = column[index].astype(np.int64), row[index].astype(np.int64)
    surface = depth[row, column]
    seen = (surface > 0) & (np.abs(z[index] - surface) < tolerance)
    if not seen.any():
        return no_correspondence()
    return np.stack([column[seen], row[seen], index[seen]], axis=1).astype(np.float64)
