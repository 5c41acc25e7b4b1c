"""Sonata/Concerto multi-view generation: overlapping global and local crops of one scene.

Follows Pointcept's MultiViewGenerator (as configured for Concerto, i.e. with image correspondences):

* the major global view holds the `enc2d_max_size` points nearest to the mean of the points seen in every frame;
  frames that see none of its points are dropped from the sample. A sample without frames (no `correspondence`:
  a model without the 2D-3D term) gets Sonata's major view instead, as the reference's generator does: a crop of
  `global_view_scale` around a random point within `center_height_scale` of the height range;
* further global views and all local views are crops (nearest points to a centre) centred on points of the major
  view; local centres avoid points already covered by earlier local views;
* global views are cut from the cloud after `global_shared_transforms` (colour augmentation applied once, shared by
  all global views), local views from the cloud before it; each view then gets its own augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concerto_ray.data.transforms import Transform, apply_transforms, nearest_indices

VIEW_KEYS = ("coord", "origin_coord", "color", "normal", "correspondence")


@dataclass(frozen=True)
class MultiViewGenerator:
    global_view_num: int = 2
    global_view_scale: tuple[float, float] = (0.4, 1.0)
    local_view_num: int = 4
    local_view_scale: tuple[float, float] = (0.1, 0.4)
    max_size: int = 65536
    enc2d_max_size: int = 65536
    center_height_scale: tuple[float, float] = (0.0, 1.0)
    global_shared_transforms: tuple[Transform, ...] = ()
    global_transforms: tuple[Transform, ...] = ()
    local_transforms: tuple[Transform, ...] = ()

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        """Adds global_/local_ + VIEW_KEYS (views concatenated), global_/local_offset (cumulative sizes), and, with
        frames, narrows `images`, `img_num` and `correspondence` to the frames the major view sees."""
        coord = data["coord"]
        shared = apply_transforms(self.global_shared_transforms, data, rng)

        if "correspondence" in data:
            major_index = nearest_indices(coord, self._major_center(data, rng), self.enc2d_max_size)
            seen_frames = np.flatnonzero(np.any(data["correspondence"][major_index] != -1, axis=(0, 2)))
            data = {
                **data,
                "images": data["images"][seen_frames],
                "img_num": len(seen_frames),
                "correspondence": data["correspondence"][:, seen_frames],
            }
            shared = {**shared, "correspondence": data["correspondence"]}
        else:
            center = self._height_band_point(coord, rng)
            major_index = nearest_indices(coord, center, self._random_size(len(coord), rng, self.global_view_scale))
        major_coord = coord[major_index]

        global_indices = [major_index] + [
            nearest_indices(
                coord,
                major_coord[rng.integers(len(major_coord))],
                self._random_size(len(coord), rng, self.global_view_scale),
            )
            for _ in range(self.global_view_num - 1)
        ]
        local_indices = []
        covered = np.zeros(len(major_index), dtype=bool)
        for _ in range(self.local_view_num):
            if covered.all():
                covered[:] = False
            center = major_coord[rng.choice(np.flatnonzero(~covered))]
            index = nearest_indices(coord, center, self._random_size(len(coord), rng, self.local_view_scale))
            local_indices.append(index)
            covered |= np.isin(major_index, index)

        globals_ = [apply_transforms(self.global_transforms, _view(shared, index), rng) for index in global_indices]
        locals_ = [apply_transforms(self.local_transforms, _view(data, index), rng) for index in local_indices]
        for prefix, views in (("global", globals_), ("local", locals_)):
            for key in (key for key in VIEW_KEYS if key in data):
                data[f"{prefix}_{key}"] = np.concatenate([view[key] for view in views], axis=0)
            data[f"{prefix}_offset"] = np.cumsum([len(view["coord"]) for view in views])
        return data

    def _major_center(self, data: dict, rng: np.random.Generator) -> np.ndarray:
        coord = data["coord"]
        correspondence = data["correspondence"]
        # Pointcept centres on points that every frame sees (with no frames at all, that is every point).
        seen_everywhere = np.all(correspondence.reshape(len(coord), -1) != -1, axis=1)
        if seen_everywhere.any():
            return coord[seen_everywhere].mean(axis=0)
        return self._height_band_point(coord, rng)

    def _height_band_point(self, coord: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random point whose height lies within `center_height_scale` of the cloud's height range."""
        z = coord[:, 2]
        z_low = z.min() + (z.max() - z.min()) * self.center_height_scale[0]
        z_high = z.min() + (z.max() - z.min()) * self.center_height_scale[1]
        return coord[rng.choice(np.flatnonzero((z >= z_low) & (z <= z_high)))]

    def _random_size(self, num_points: int, rng: np.random.Generator, scale: tuple[float, float]) -> int:
        limit = min(self.max_size, num_points)
        for _ in range(10):
            size = int(rng.uniform(*scale) * limit)
            if size > 0:
                return size
        return int(max(10, scale[1] * limit))


def _view(data: dict, index: np.ndarray) -> dict:
    return {key: data[key][index] for key in VIEW_KEYS if key in data}  # colours and normals where the scene has them
