"""Plain point-cloud files (PLY, LAS/LAZ, NPY, NPZ) -> the point arrays of Pointcept's processed scene folders.

One file is one scene. What a file has is what the scene gets, nothing invented:
- `coord` float32 (N, 3), always;
- `color` uint8 (N, 3) 0..255, where the file has colours (PLY red/green/blue, LAS RGB, the NPY's columns 4-6);
- `normal` float32 (N, 3), where the file has normals (PLY nx/ny/nz, an NPZ's `normal`);
- `segment` int64 (N,), only when labels are asked for: the PLY's `segment`/`label`/`class` property, LAS
  classification, an NPZ's `segment`; -1 is "ignore", as in Pointcept's datasets.

Georeferenced clouds (lidar in UTM, photogrammetry in a national grid) hold coordinates whose float32 rounding
exceeds a millimetre; such a cloud is moved so that its minimum corner (floored to the metre) is the origin, and the
shift is returned, so that nothing is lost silently. The model sees coordinates relative to the scene anyway (every
pipeline centres the scene first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concerto_ray.errors import DataError

POINT_FILE_SUFFIXES = (".ply", ".las", ".laz", ".npy", ".npz")
PLY_LABEL_PROPERTIES = ("segment", "label", "class")
# float32 has a 24-bit mantissa: beyond 2**24 mm (16.7 km) from the origin its spacing exceeds a millimetre.
FLOAT32_MM_LIMIT_M = 2**24 * 0.001


@dataclass
class PointCloud:
    arrays: dict[str, np.ndarray]  # coord, and color / normal / segment where the file has them
    shift: tuple[float, float, float]  # subtracted from the file's coordinates (zeros unless georeferenced)


def read_point_file(path: Path, labels: bool = False) -> PointCloud:
    """The scene of one point-cloud file; with `labels`, its per-point labels too (an error where it has none)."""
    suffix = path.suffix.lower()
    readers = {".ply": _read_ply, ".las": _read_las, ".laz": _read_las, ".npy": _read_npy, ".npz": _read_npz}
    if suffix not in readers:
        raise DataError(f"not a point-cloud file; expected one of {', '.join(POINT_FILE_SUFFIXES)}", file=str(path))
    try:
        arrays = readers[suffix](path, labels)
    except DataError:
        raise
    except Exception as exc:  # the format libraries raise many types for damaged files
        raise DataError(
            f"cannot be read as {suffix[1:].upper()} ({type(exc).__name__}: {exc})", file=str(path)
        ) from exc
    if labels and "segment" not in arrays:
        raise DataError(_no_labels(suffix), file=str(path), field="segment")
    return _checked(arrays, path)


def _no_labels(suffix: str) -> str:
    where = {
        ".ply": f"a vertex property named one of {', '.join(PLY_LABEL_PROPERTIES)}",
        ".npz": "an array named segment",
    }.get(suffix, "per-point labels (LAS: classification)")
    return f"labels were asked for, but the file has no {where}"


def _read_ply(path: Path, labels: bool) -> dict[str, np.ndarray]:
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = set(vertex.data.dtype.names)
    arrays = {"coord": _columns(vertex, ("x", "y", "z"), path)}
    if {"red", "green", "blue"} <= names:
        arrays["color"] = _columns(vertex, ("red", "green", "blue"), path)
    if {"nx", "ny", "nz"} <= names:
        arrays["normal"] = _columns(vertex, ("nx", "ny", "nz"), path)
    if labels:
        found = [name for name in PLY_LABEL_PROPERTIES if name in names]
        if found:
            arrays["segment"] = np.asarray(vertex[found[0]])
    return arrays


def _columns(vertex, names: tuple[str, ...], path: Path) -> np.ndarray:
    missing = [name for name in names if name not in vertex.data.dtype.names]
    if missing:
        raise DataError(f"the vertex element has no {', '.join(missing)}", file=str(path))
    return np.stack([np.asarray(vertex[name]) for name in names], axis=1)


def _read_las(path: Path, labels: bool) -> dict[str, np.ndarray]:
    import laspy

    las = laspy.read(str(path))
    arrays = {"coord": np.asarray(las.xyz, dtype=np.float64)}
    if {"red", "green", "blue"} <= set(las.point_format.dimension_names):
        # LAS stores 16-bit colours; 8-bit sources are scaled by 256 by convention (max 65280)
        rgb = np.stack([np.asarray(las[c]) for c in ("red", "green", "blue")], axis=1).astype(np.float64)
        arrays["color"] = rgb / 257.0 if rgb.max() > 255 else rgb
    if labels:
        arrays["segment"] = np.asarray(las.classification)
    return arrays


def _read_npy(path: Path, labels: bool) -> dict[str, np.ndarray]:
    data = np.load(path, allow_pickle=False)
    if data.ndim != 2 or data.shape[1] not in (3, 6):
        raise DataError(
            f"expected (N, 3) coordinates or (N, 6) coordinates and 0..255 colours, got shape {data.shape}; "
            f"an .npz names its arrays (coord, color, normal, segment)",
            file=str(path),
        )
    arrays = {"coord": data[:, :3]}
    if data.shape[1] == 6:
        arrays["color"] = data[:, 3:]
    return arrays


def _read_npz(path: Path, labels: bool) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        unknown = sorted(set(archive.files) - {"coord", "color", "normal", "segment"})
        if unknown:
            raise DataError(f"unknown arrays {unknown}; an .npz holds coord, color, normal, segment", file=str(path))
        if "coord" not in archive.files:
            raise DataError("no array named coord", file=str(path), field="coord")
        return {key: archive[key] for key in archive.files if key != "segment" or labels}


def _checked(arrays: dict[str, np.ndarray], path: Path) -> PointCloud:
    coord = np.asarray(arrays["coord"], dtype=np.float64)
    n = len(coord)
    if coord.ndim != 2 or coord.shape[1] != 3 or n == 0:
        raise DataError(
            f"expected (N, 3) coordinates with N > 0, got shape {coord.shape}", file=str(path), field="coord"
        )
    if not np.isfinite(coord).all():
        raise DataError("coordinates hold NaN or inf", file=str(path), field="coord")
    shift = np.zeros(3)
    if np.abs(coord).max() > FLOAT32_MM_LIMIT_M:
        shift = np.floor(coord.min(axis=0))
    out = {"coord": (coord - shift).astype(np.float32)}
    for key in ("color", "normal"):
        if key in arrays:
            value = np.asarray(arrays[key], dtype=np.float64)
            if value.shape != (n, 3) or not np.isfinite(value).all():
                raise DataError(f"expected finite ({n}, 3) values, got shape {value.shape}", file=str(path), field=key)
            out[key] = value
    if "color" in out:
        if out["color"].min() < 0 or out["color"].max() > 255:
            raise DataError("colours must lie in 0..255", file=str(path), field="color")
        out["color"] = np.rint(out["color"]).astype(np.uint8)
    if "normal" in out:
        out["normal"] = out["normal"].astype(np.float32)
    if "segment" in arrays:
        segment = np.asarray(arrays["segment"])
        if segment.shape != (n,) or not np.issubdtype(segment.dtype, np.integer):
            raise DataError(
                f"expected ({n},) integer labels, got shape {segment.shape} of {segment.dtype}",
                file=str(path),
                field="segment",
            )
        out["segment"] = segment.astype(np.int64)
    return PointCloud(out, (float(shift[0]), float(shift[1]), float(shift[2])))
