"""Depth images of a triangle mesh seen by a pinhole camera, as Pointcept's Concerto preprocessing casts them.

The reference (ScanNet, S3DIS) casts one ray per pixel through the pixel's centre (column + 0.5, row + 0.5) with
Open3D's RaycastingScene, turns the hit's distance from the camera into a "depth" by dividing by the length of
K^-1 [column, row, 1] (the integer pixel, camtools' `im_distance_to_im_depth`), and later lifts that depth along the
integer pixel's ray. `mesh_depth_image` returns exactly that depth, so that `correspondence.nearest_point_
correspondences` lifts the same 3-D points as the reference: the hit's distance, along the integer pixel's ray.

Hits are found with torch (on the CPU or a GPU): each triangle is projected to the image (clipped at a near plane
when it crosses it), the pixel centres in its bounding rectangle are its candidate rays, and a Moller-Trumbore test
in float64 on the reference's float32 rays and vertices gives each ray's nearest hit.
"""

from __future__ import annotations

import numpy as np

# Candidate (triangle, pixel) pairs per step: bounds the memory a step holds (about 200 bytes a pair).
_PAIRS_PER_STEP = 1 << 20
# Triangle parts closer to the camera than this (metres) are not cast: no real capture has a surface there.
_NEAR = 1e-3


def mesh_depth_image(
    vertices: np.ndarray,
    faces: np.ndarray,
    intrinsic: np.ndarray,
    pose: np.ndarray,
    height: int,
    width: int,
    device: str = "cpu",
) -> np.ndarray:
    """(height, width) float32 "depth" of the mesh seen from the camera-to-world `pose` (4x4) with the intrinsic
    K (3x3, or 4x4 with K top left); inf where a pixel's ray hits nothing. See the module's note on what depth
    means here. `device`: the torch device that casts ("cuda" where there is one)."""
    import torch

    K = np.asarray(intrinsic)[:3, :3]
    world_to_camera = np.linalg.inv(np.asarray(pose)).astype(np.float64)  # in the pose's own dtype, as the reference
    rotation, translation = world_to_camera[:3, :3], world_to_camera[:3, 3]
    # Open3D's rays: origin C = -R^T t, direction (R^T K^-1, rounded to float32) [column + .5, row + .5, 1] in float32
    origin = (-rotation.T @ translation).astype(np.float32)
    to_world = (rotation.T @ np.linalg.inv(K.astype(np.float64))).astype(np.float32)
    row, column = np.divmod(np.arange(height * width, dtype=np.float32), np.float32(width))
    centres = np.stack([column + np.float32(0.5), row + np.float32(0.5), np.ones_like(column)], axis=1)
    directions = centres @ to_world.T  # float32

    tv = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device).double()
    tf = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
    rays = torch.as_tensor(directions, device=device).double()
    t_hit = _nearest_hits(
        tv[tf],  # (F, 3 corners, 3)
        torch.as_tensor(origin, device=device).double(),
        rays,
        torch.as_tensor(world_to_camera, device=device),
        torch.as_tensor(K.astype(np.float64), device=device),
        height,
        width,
    )
    # distance = t_hit * |direction| in float32, as Open3D returns t_hit and camtools multiplies
    length = np.linalg.norm(directions, axis=1)
    distance = (t_hit.float().cpu().numpy() * length).reshape(height, width)
    u = (np.arange(width) - K[0, 2]) / K[0, 0]
    v = (np.arange(height) - K[1, 2]) / K[1, 1]
    return (distance / np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + 1)).astype(np.float32)


def _nearest_hits(triangles, origin, rays, world_to_camera, K, height: int, width: int):
    """Per pixel ray: the smallest positive ray parameter t of a hit (inf: none)."""
    import torch

    first, last = _pixel_rectangles(triangles, world_to_camera, K, height, width)  # (F, 2) inclusive, [col, row]
    extent = (last - first + 1).clamp(min=0)
    counts = extent[:, 0] * extent[:, 1]
    t_hit = torch.full((height * width,), torch.inf, dtype=torch.float64, device=rays.device)
    candidates = torch.nonzero(counts).squeeze(1)
    # steps of whole triangles, each step at most _PAIRS_PER_STEP pairs (or one triangle that alone has more)
    ends = torch.cumsum(counts[candidates], 0)
    start = 0
    while start < len(candidates):
        budget = (ends[start - 1] if start else 0) + _PAIRS_PER_STEP
        stop = max(int(torch.searchsorted(ends, budget, right=True)), start + 1)
        tri = candidates[start:stop]
        start = stop
        n = counts[tri]
        pair_tri = tri.repeat_interleave(n)
        within = torch.arange(int(n.sum()), device=rays.device) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
        w = extent[pair_tri, 0]
        pixel = (first[pair_tri, 1] + within // w) * width + first[pair_tri, 0] + within % w
        t = _intersect(triangles[pair_tri], origin, rays[pixel])
        hit = torch.isfinite(t)
        t_hit.scatter_reduce_(0, pixel[hit], t[hit], reduce="amin")
    return t_hit


def _intersect(corners, origin, direction):
    """Moller-Trumbore: t of each ray's hit with its triangle, both faces, inf for a miss or t <= 0."""
    import torch

    v0, e1, e2 = corners[:, 0], corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    p = torch.linalg.cross(direction, e2)
    det = (e1 * p).sum(1)
    inv = 1.0 / det
    s = origin - v0
    u = (s * p).sum(1) * inv
    q = torch.linalg.cross(s, e1)
    v = (direction * q).sum(1) * inv
    t = (e2 * q).sum(1) * inv
    hit = (det != 0) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    return torch.where(hit, t, torch.inf)


def _pixel_rectangles(triangles, world_to_camera, K, height: int, width: int):
    """(first, last) pixel [column, row] of the rectangle around each triangle's projection, one pixel wider on
    every side against rounding, clipped to the image; empty (last < first) for triangles wholly behind the near
    plane or outside the image. A triangle crossing the near plane is clipped there first: its visible part's
    corners are the corners in front and the points where its edges cross the plane."""
    import torch

    camera = triangles @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]  # (F, 3, 3)
    z = camera[..., 2]
    a, b = camera, camera.roll(-1, dims=1)  # the three edges a -> b
    za, zb = z, z.roll(-1, dims=1)
    crosses = (za - _NEAR) * (zb - _NEAR) < 0
    s = ((_NEAR - za) / torch.where(crosses, zb - za, 1.0)).unsqueeze(-1)
    points = torch.cat([camera, a + s * (b - a)], dim=1)  # (F, 6, 3): corners, then edge crossings
    keep = torch.cat([z >= _NEAR, crosses], dim=1)
    depth = points[..., 2].clamp(min=_NEAR)
    pixel = torch.stack([K[0, 0] * points[..., 0] / depth + K[0, 2], K[1, 1] * points[..., 1] / depth + K[1, 2]], -1)
    low = torch.where(keep.unsqueeze(-1), pixel, torch.inf).amin(1)
    high = torch.where(keep.unsqueeze(-1), pixel, -torch.inf).amax(1)
    # a pixel's ray passes through its centre, column + 0.5: the columns c with low <= c + 0.5 <= high, widened
    size = torch.tensor([width - 1, height - 1], device=K.device)
    bound = float(max(width, height) + 2)  # far-off projections are clamped before the conversion to integers
    first = torch.floor(low.clamp(-2.0, bound) - 0.5).long() - 1
    last = torch.ceil(high.clamp(-2.0, bound) - 0.5).long() + 1
    first = torch.maximum(first, torch.zeros_like(first))
    last = torch.minimum(last, size.expand_as(last))
    empty = ~keep.any(1)
    last[empty] = -1
    return first, last
