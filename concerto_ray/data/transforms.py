"""Point-cloud transforms with Pointcept's semantics and parameters, in plain numpy.

A sample is a dict of numpy arrays (`coord`, `color` in 0..255, `normal`, `segment`, ...). Every transform is a
small frozen dataclass called as `transform(data, rng) -> data`: it returns a new dict and never writes into the
arrays it was given (samples coming from Ray Data / Arrow may be read-only), and it draws all randomness from the
explicit `numpy.random.Generator`, so a sample's augmentations are reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.interpolate import RegularGridInterpolator
from scipy.ndimage import uniform_filter1d

Transform = Callable[[dict, np.random.Generator], dict]

# Per-point arrays: selecting a subset of points (voxelisation, dropout, cropping) indexes exactly these.
# `origin_coord` and `origin_segment` are deliberately absent, as in Pointcept: `origin_segment` must keep the
# full-resolution labels that `inverse` maps back to.
POINT_KEYS = ("coord", "color", "normal", "segment", "instance", "correspondence", "grid_coord")


def apply_transforms(transforms: Sequence[Transform], data: dict, rng: np.random.Generator) -> dict:
    for transform in transforms:
        data = transform(data, rng)
    return data


# Indices of the labelled points of a limited-annotation scene (Pointcept's key). Voxelisation and dropout keep
# these points whatever they draw (`with_labelled`), so that every labelled point reaches the loss.
SAMPLED_INDEX = "sampled_index"


def select_points(data: dict, index: np.ndarray) -> dict:
    """The points `index` of the sample; `sampled_index`, if present, is remapped to the labelled points kept."""
    out = {key: value[index] if key in POINT_KEYS else value for key, value in data.items()}
    if SAMPLED_INDEX in data:
        out[SAMPLED_INDEX] = np.flatnonzero(_labelled_mask(data)[index])
    return out


def with_labelled(data: dict, index: np.ndarray) -> np.ndarray:
    """`index` plus the labelled points (`sampled_index`) it misses, in ascending point order as in Pointcept;
    `index` itself when the sample has no `sampled_index`."""
    if SAMPLED_INDEX not in data:
        return index
    return np.unique(np.concatenate([index, np.flatnonzero(_labelled_mask(data))]))


def _labelled_mask(data: dict) -> np.ndarray:
    mask = np.zeros(len(data["coord"]), dtype=bool)
    mask[data[SAMPLED_INDEX]] = True
    return mask


# ---------------------------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class Copy:
    source: str
    target: str

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        return {**data, self.target: np.array(data[self.source], copy=True)}


@dataclass(frozen=True)
class NormalizeColor:
    """0..255 colours -> 0..1."""

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if "color" not in data:
            return data
        return {**data, "color": data["color"] / np.float32(255)}


# ------------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class CenterShift:
    """Centre x/y on the bounding box; with `apply_z`, also put the lowest point at z = 0."""

    apply_z: bool = True

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        coord = data["coord"]
        low, high = coord.min(axis=0), coord.max(axis=0)
        shift = np.array(
            [(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2] if self.apply_z else 0], dtype=coord.dtype
        )
        return {**data, "coord": coord - shift}


def _rotation_matrix(angle: float, axis: str) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rotate(data: dict, angle: float, axis: str, center: tuple[float, float, float] | None) -> dict:
    rotation_t = _rotation_matrix(angle, axis).T
    coord = data["coord"]
    if center is None:  # Pointcept rotates about the bounding-box centre unless a centre is given
        pivot = (coord.min(axis=0) + coord.max(axis=0)) / 2
    else:
        pivot = np.asarray(center, dtype=np.float64)
    out = {**data, "coord": ((coord - pivot) @ rotation_t + pivot).astype(coord.dtype)}
    if "normal" in data:
        out["normal"] = (data["normal"] @ rotation_t).astype(data["normal"].dtype)
    return out


@dataclass(frozen=True)
class RandomRotate:
    """With probability p, rotate about `axis` by an angle drawn uniformly from `angle` (in units of pi)."""

    angle: tuple[float, float] = (-1.0, 1.0)
    axis: Literal["x", "y", "z"] = "z"
    center: tuple[float, float, float] | None = None
    p: float = 0.5

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if rng.random() > self.p:
            return data
        return _rotate(data, rng.uniform(*self.angle) * np.pi, self.axis, self.center)


@dataclass(frozen=True)
class RandomRotateTargetAngle:
    """With probability p, rotate about `axis` by one of the listed angles (in units of pi)."""

    angles: tuple[float, ...] = (0.5, 1.0, 1.5)
    axis: Literal["x", "y", "z"] = "z"
    center: tuple[float, float, float] | None = None
    p: float = 0.75

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if rng.random() > self.p:
            return data
        return _rotate(data, rng.choice(self.angles) * np.pi, self.axis, self.center)


@dataclass(frozen=True)
class RandomScale:
    scale: tuple[float, float] = (0.95, 1.05)
    anisotropic: bool = False

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        factor = rng.uniform(self.scale[0], self.scale[1], 3 if self.anisotropic else 1)
        return {**data, "coord": (data["coord"] * factor).astype(data["coord"].dtype)}


@dataclass(frozen=True)
class RandomFlip:
    """Mirror x with probability p, then (independently) y."""

    p: float = 0.5

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        sign = np.ones(3, dtype=np.float32)
        for axis in (0, 1):
            if rng.random() < self.p:
                sign[axis] = -1
        out = {**data, "coord": data["coord"] * sign}
        if "normal" in data:
            out["normal"] = data["normal"] * sign
        return out


@dataclass(frozen=True)
class RandomJitter:
    sigma: float = 0.01
    clip: float = 0.05

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        coord = data["coord"]
        noise = np.clip(self.sigma * rng.standard_normal((len(coord), 3)), -self.clip, self.clip)
        return {**data, "coord": (coord + noise).astype(coord.dtype)}


@dataclass(frozen=True)
class ElasticDistortion:
    """With probability 0.95, warp space by smoothed Gaussian noise, once per (granularity, magnitude) pair."""

    params: tuple[tuple[float, float], ...] = ((0.2, 0.4), (0.8, 1.6))

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= 0.95:
            return data
        coord = data["coord"]
        for granularity, magnitude in self.params:
            coord = _elastic_warp(coord, granularity, magnitude, rng)
        return {**data, "coord": coord}


def _elastic_warp(coord: np.ndarray, granularity: float, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    low = coord.min(axis=0)
    grid_shape = ((coord - low).max(axis=0) // granularity).astype(int) + 3
    noise = rng.standard_normal((*grid_shape, 3)).astype(np.float32)
    for _ in range(2):  # two passes of a 3-wide box blur per axis, zero outside the grid
        for axis in range(3):
            noise = uniform_filter1d(noise, size=3, axis=axis, mode="constant", cval=0.0)
    axes = [np.linspace(lo - granularity, lo + granularity * (n - 2), n) for lo, n in zip(low, grid_shape)]
    interpolate = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0)
    return (coord + interpolate(coord) * magnitude).astype(coord.dtype)


# ------------------------------------------------------------------------------------------ point subsets


@dataclass(frozen=True)
class RandomDropout:
    """With probability `application_ratio`, keep a random (shuffled) `1 - dropout_ratio` of the points."""

    dropout_ratio: float = 0.2
    application_ratio: float = 0.5

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.application_ratio:
            return data
        n = len(data["coord"])
        keep = rng.choice(n, int(n * (1 - self.dropout_ratio)), replace=False)
        return select_points(data, with_labelled(data, keep))


@dataclass(frozen=True)
class SphereCrop:
    """Keep the `point_max` points (with `sample_rate`: that share of the points) nearest to a random point
    (no-op for smaller clouds). A crop may cut off labelled points: `sampled_index` then lists the kept ones."""

    point_max: int = 80000
    sample_rate: float | None = None

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        coord = data["coord"]
        point_max = self.point_max if self.sample_rate is None else int(self.sample_rate * len(coord))
        if len(coord) <= point_max:
            return data
        center = coord[rng.integers(len(coord))]
        return select_points(data, nearest_indices(coord, center, point_max))


def nearest_indices(coord: np.ndarray, center: np.ndarray, size: int) -> np.ndarray:
    """Indices of the `size` points nearest to `center`, nearest first; equal to
    `np.argsort(distance, kind="stable")[:size]`, but only the kept points are sorted."""
    distance = np.sum(np.square(coord - center), axis=1)
    if size >= len(distance):
        return np.argsort(distance, kind="stable")
    cutoff = np.partition(distance, size - 1)[size - 1]
    closer = np.flatnonzero(distance < cutoff)
    # Points at exactly the cutoff distance: the lowest indices, as the stable sort would keep them.
    at_cutoff = np.flatnonzero(distance == cutoff)[: size - len(closer)]
    kept = np.concatenate([closer, at_cutoff])
    return kept[np.argsort(distance[kept], kind="stable")]


def fnv_hash(grid_coord: np.ndarray) -> np.ndarray:
    """64-bit FNV-1 hash of each row of non-negative integer voxel coordinates (Pointcept's voxel key)."""
    keys = np.full(len(grid_coord), 14695981039346656037, dtype=np.uint64)
    for column in grid_coord.astype(np.uint64).T:
        keys = np.bitwise_xor(keys * np.uint64(1099511628211), column)
    return keys


@dataclass(frozen=True)
class GridSample:
    """Voxelise with cubes of `grid_size`.

    Called (training mode), it keeps one random point per occupied voxel, ordered by voxel key; `grid_coord` is
    then the kept points' integer voxel coordinates and `inverse` maps every input point to its kept point.
    `fragments` (test mode) instead returns as many fragments as the fullest voxel has points, each holding one
    point of every voxel (fragment i takes a voxel's point i modulo its count), so together they hold every point
    at least once.
    """

    grid_size: float = 0.05
    return_grid_coord: bool = False
    return_inverse: bool = False

    def _voxels(self, coord: np.ndarray):
        grid_coord = np.floor(coord / np.array(self.grid_size)).astype(np.int64)
        grid_coord -= grid_coord.min(axis=0)
        key = fnv_hash(grid_coord)
        order = np.argsort(key)  # points of one voxel become contiguous
        # Voxels straight from the sorted keys: a new voxel starts wherever the key changes.
        first = np.concatenate([[0], np.flatnonzero(np.diff(key[order])) + 1])
        count = np.diff(first, append=len(key))
        inverse = np.empty(len(key), dtype=np.intp)
        inverse[order] = np.repeat(np.arange(len(first)), count)
        return grid_coord, order, first, count, inverse

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        grid_coord, order, first, count, inverse = self._voxels(data["coord"])
        # Pointcept's draw: an integer below the largest voxel's count, wrapped into each voxel's count.
        keep = with_labelled(data, order[first + rng.integers(0, count.max(), count.size) % count])
        out = select_points(data, keep)
        if self.return_grid_coord:
            out["grid_coord"] = grid_coord[keep]
        if self.return_inverse:
            out["inverse"] = inverse
        return out

    def fragments(self, data: dict) -> list[dict]:
        grid_coord, order, first, count, _ = self._voxels(data["coord"])
        parts = []
        for i in range(count.max()):
            index = order[first + i % count]
            part = select_points(data, index)
            part["index"] = index
            if self.return_grid_coord:
                part["grid_coord"] = grid_coord[index]
            parts.append(part)
        return parts


# ------------------------------------------------------------------------------------------------- colour


@dataclass(frozen=True)
class RandomDropColor:
    """With probability `application_ratio`, set the colour of a random `drop_ratio` of the points to 0."""

    drop_ratio: float = 0.2
    application_ratio: float = 0.5

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        return _drop_rows(data, "color", self.drop_ratio, self.application_ratio, rng)


@dataclass(frozen=True)
class RandomDropNormal:
    """With probability `application_ratio`, zero the normal of a random `drop_ratio` of the points."""

    drop_ratio: float = 0.2
    application_ratio: float = 0.5

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        return _drop_rows(data, "normal", self.drop_ratio, self.application_ratio, rng)


def _drop_rows(data: dict, key: str, drop_ratio: float, application_ratio: float, rng: np.random.Generator) -> dict:
    if key not in data or rng.random() >= application_ratio:
        return data
    if drop_ratio >= 1.0:  # every row: no need to draw which (Pointcept's draws come from np.random anyway)
        return {**data, key: np.zeros_like(data[key])}
    values = np.array(data[key], copy=True)
    n = len(values)
    values[rng.choice(n, int(n * drop_ratio), replace=False)] = 0
    return {**data, key: values}


@dataclass(frozen=True)
class ChromaticAutoContrast:
    """With probability p, blend colours with their per-channel min-max stretched version."""

    p: float = 0.2
    blend_factor: float | None = None  # None: drawn uniformly from [0, 1)

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if "color" not in data or rng.random() >= self.p:
            return data
        color = data["color"]
        low, high = color.min(axis=0, keepdims=True), color.max(axis=0, keepdims=True)
        spread = high - low
        if not np.any(spread > 0):
            return data
        gain = np.divide(255, spread, out=np.ones_like(spread), where=spread > 0)
        blend = rng.random() if self.blend_factor is None else self.blend_factor
        stretched = (color - low) * gain
        return {**data, "color": ((1 - blend) * color + blend * stretched).astype(color.dtype)}


@dataclass(frozen=True)
class ChromaticTranslation:
    """With probability p, shift all colours by one random RGB offset of at most `ratio` * 255."""

    p: float = 0.95
    ratio: float = 0.05

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if "color" not in data or rng.random() >= self.p:
            return data
        offset = (rng.random((1, 3)) - 0.5) * 255 * 2 * self.ratio
        return {**data, "color": np.clip(data["color"] + offset, 0, 255).astype(data["color"].dtype)}


@dataclass(frozen=True)
class ChromaticJitter:
    """With probability p, add per-point Gaussian colour noise of std `std` * 255."""

    p: float = 0.95
    std: float = 0.005

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if "color" not in data or rng.random() >= self.p:
            return data
        color = data["color"]
        noise = rng.standard_normal((len(color), 3)) * (self.std * 255)
        return {**data, "color": np.clip(color + noise, 0, 255).astype(color.dtype)}


@dataclass(frozen=True)
class RandomColorJitter:
    """torchvision-style ColorJitter on 0..255 point colours.

    Factors are drawn once (brightness, contrast, saturation in [1 - x, 1 + x], hue in [-h, h]); the four
    adjustments then run in a random order, each with probability p.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    p: float = 0.95

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        if "color" not in data:
            return data
        order = rng.permutation(4)
        factors = [
            None if x == 0 else rng.uniform(max(1 - x, 0.0), 1 + x)
            for x in (self.brightness, self.contrast, self.saturation)
        ]
        factors.append(None if self.hue == 0 else rng.uniform(-self.hue, self.hue))
        adjustments = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
        color = data["color"]
        for which in order:
            if factors[which] is not None and rng.random() < self.p:
                color = adjustments[which](color, factors[which])
        return {**data, "color": color}


def _blend(color: np.ndarray, other, ratio: float) -> np.ndarray:
    return (ratio * color + (1.0 - ratio) * other).clip(0, 255).astype(color.dtype)


def _gray(color: np.ndarray) -> np.ndarray:
    return (0.2989 * color[:, 0:1] + 0.587 * color[:, 1:2] + 0.114 * color[:, 2:3]).astype(color.dtype)


def _adjust_brightness(color: np.ndarray, factor: float) -> np.ndarray:
    return _blend(color, 0.0, factor)


def _adjust_contrast(color: np.ndarray, factor: float) -> np.ndarray:
    return _blend(color, np.mean(_gray(color)), factor)


def _adjust_saturation(color: np.ndarray, factor: float) -> np.ndarray:
    return _blend(color, _gray(color), factor)


def _adjust_hue(color: np.ndarray, shift: float) -> np.ndarray:
    hsv = _rgb_to_hsv(color / 255.0)
    hsv[:, 0] = (hsv[:, 0] + shift) % 1.0
    return (_hsv_to_rgb(hsv) * 255.0).astype(color.dtype)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    value = rgb.max(axis=1)
    chroma = value - rgb.min(axis=1)
    has_hue = chroma > 0
    saturation = np.where(has_hue, chroma / np.where(value > 0, value, 1), 0.0)
    safe_chroma = np.where(has_hue, chroma, 1)
    rc, gc, bc = (value - r) / safe_chroma, (value - g) / safe_chroma, (value - b) / safe_chroma
    hue = np.select([~has_hue, value == r, value == g], [0.0, bc - gc, 2.0 + rc - bc], 4.0 + gc - rc)
    return np.stack([(hue / 6.0 + 1.0) % 1.0, saturation, value], axis=1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=1)
