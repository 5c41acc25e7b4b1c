"""Pictures of per-point features: PCA colours and the similarity to one point, as PNG images.

The PCA picture maps each point's feature to RGB through the first three principal components (each scaled to 0..1
between its 1st and 99th percentile), as the Sonata / Concerto papers show their features; points of similar
features get similar colours. The similarity picture colours each point by the cosine similarity of its feature to
the feature of one query point (marked). Both render the scene from above or obliquely, with matplotlib's Agg
backend (no display needed).

`FeatureImages` gives training runs a picture of a fixed scene at every evaluation, in MLflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from concerto_ray.data.presets import FEAT_KEYS
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.sources import SourceConfig, load_sources, read_sample_row
from concerto_ray.embed import load_backbone_spec, read_scene_features, scene_features
from concerto_ray.errors import DataError

View = Literal["top", "oblique"]
MAX_PCA_FIT_POINTS = 50_000  # the components are fitted on a random subset of this size: fast, and as good
MAX_DRAWN_POINTS = 200_000
# The oblique camera: turned this far about z, and looking down at this elevation (degrees).
OBLIQUE_AZIMUTH, OBLIQUE_ELEVATION = -35.0, 35.0


def pca_colors(feat: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 3) RGB in 0..1 from (N, C) features: their first three principal components."""
    feat = np.asarray(feat, dtype=np.float64)
    if feat.ndim != 2 or len(feat) < 2:
        raise DataError(f"PCA needs at least 2 points of (N, C) features, got shape {feat.shape}", field="feat")
    rng = np.random.default_rng(seed)
    fit = feat[rng.choice(len(feat), MAX_PCA_FIT_POINTS, replace=False)] if len(feat) > MAX_PCA_FIT_POINTS else feat
    mean = fit.mean(axis=0)
    _, _, components = np.linalg.svd(fit - mean, full_matrices=False)
    projection = (feat - mean) @ components[:3].T
    if projection.shape[1] < 3:  # fewer than 3 channels (or points): the missing components stay dark
        projection = np.pad(projection, ((0, 0), (0, 3 - projection.shape[1])))
    low, high = np.percentile(projection, 1, axis=0), np.percentile(projection, 99, axis=0)
    return np.clip((projection - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)


def cosine_similarity(feat: np.ndarray, query: int) -> np.ndarray:
    """(N,) cosine similarity of every point's feature to that of point `query`."""
    feat = np.asarray(feat, dtype=np.float64)
    if not 0 <= query < len(feat):
        raise DataError(f"query point {query} is out of range (the scene has {len(feat)} points)", field="query")
    unit = feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)
    return unit @ unit[query]


def central_point(coord: np.ndarray) -> int:
    """The point nearest the centre of the scene's bounding box: a default query point."""
    centre = (coord.min(axis=0) + coord.max(axis=0)) / 2
    return int(np.argmin(((coord - centre) ** 2).sum(axis=1)))


def project(coord: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Image-plane (N, 2) positions and a depth per point (larger = nearer the camera)."""
    coord = np.asarray(coord, dtype=np.float64)
    if view == "top":
        return coord[:, :2], coord[:, 2]
    azimuth, elevation = np.radians(OBLIQUE_AZIMUTH), np.radians(OBLIQUE_ELEVATION)
    right = coord[:, 0] * np.cos(azimuth) - coord[:, 1] * np.sin(azimuth)
    forward = coord[:, 0] * np.sin(azimuth) + coord[:, 1] * np.cos(azimuth)  # away from the camera
    up = coord[:, 2] * np.cos(elevation) + forward * np.sin(elevation)
    depth = coord[:, 2] * np.sin(elevation) - forward * np.cos(elevation)
    return np.stack([right, up], axis=1), depth


def render(
    coord: np.ndarray,
    colors: np.ndarray,
    path: str | Path,
    *,
    title: str,
    view: View = "oblique",
    marker: int | None = None,
    colorbar: str | None = None,
    seed: int = 0,
) -> Path:
    """Scatter the points in `colors` ((N, 3) RGB, or (N,) values drawn with a colour map and a colour bar labelled
    `colorbar`) to a PNG; nearer points are drawn over farther ones; `marker` rings one point."""
    coord = np.asarray(coord)
    index = np.arange(len(coord))
    if len(index) > MAX_DRAWN_POINTS:
        index = np.sort(np.random.default_rng(seed).choice(len(index), MAX_DRAWN_POINTS, replace=False))
    xy, depth = project(coord[index], view)
    order = np.argsort(depth, kind="stable")
    figure = Figure(figsize=(8, 7), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    size = float(np.clip(30000 / len(index), 0.5, 12))
    values = np.asarray(colors)[index][order]
    if values.ndim == 1:
        scatter = axes.scatter(xy[order, 0], xy[order, 1], c=values, cmap="inferno", s=size, linewidths=0)
        figure.colorbar(scatter, ax=axes, label=colorbar, shrink=0.8)
    else:
        axes.scatter(xy[order, 0], xy[order, 1], c=values, s=size, linewidths=0)
    if marker is not None:
        point, _ = project(coord[marker : marker + 1], view)
        axes.scatter(point[:, 0], point[:, 1], s=250, facecolors="none", edgecolors="cyan", linewidths=2.5)
    axes.set_aspect("equal")
    axes.set_axis_off()
    axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def save_feature_images(
    coord: np.ndarray,
    feat: np.ndarray,
    out_dir: str | Path,
    *,
    scene: str,
    query: int | None = None,
    view: View = "oblique",
) -> dict[str, Path]:
    """`pca.png` and `similarity.png` of one scene in `out_dir`; `query` defaults to the most central point."""
    coord, feat = np.asarray(coord), np.asarray(feat)
    if len(coord) != len(feat):
        raise DataError(f"{len(coord)} coordinates but {len(feat)} feature rows", sample=scene)
    query = central_point(coord) if query is None else query
    out_dir = Path(out_dir)
    return {
        "pca": render(coord, pca_colors(feat), out_dir / "pca.png", title=f"{scene}: feature PCA", view=view),
        "similarity": render(
            coord,
            cosine_similarity(feat, query),
            out_dir / "similarity.png",
            title=f"{scene}: similarity to point {query}",
            view=view,
            marker=query,
            colorbar="cosine similarity",
        ),
    }


def images_from_features(
    features: str,
    out_dir: str | Path,
    *,
    scene: str | None = None,
    split: str | None = None,
    query: int | None = None,
    view: View = "oblique",
    endpoint_url: str | None = None,
) -> dict[str, Path]:
    """The pictures of a scene (default: the first) from the output of `concerto-ray embed`."""
    scene, coord, feat = read_scene_features(features, scene, split, endpoint_url)
    return save_feature_images(coord, feat, out_dir, scene=scene, query=query, view=view)


def images_from_checkpoint(
    checkpoint: str,
    shards: str,
    out_dir: str | Path,
    *,
    model: str | None = None,
    source: str = "student",
    scene: str | None = None,
    split: str | None = None,
    query: int | None = None,
    view: View = "oblique",
    grid_size: float = 0.02,
    up_cast_levels: int | None = None,
    endpoint_url: str | None = None,
    feat_keys: tuple[str, ...] = FEAT_KEYS,
) -> dict[str, Path]:
    """The pictures of a scene (default: the first by name) of a shard set, embedded by a checkpoint's backbone
    exactly as `concerto-ray embed` does."""
    spec = load_backbone_spec(checkpoint, model, source, up_cast_levels, endpoint_url, feat_keys)
    data = load_scene(shards, scene, split, endpoint_url)
    feat = scene_features(spec.build(), data, spec.up_cast_levels, grid_size, feat_keys=feat_keys)
    return save_feature_images(data["coord"], feat, out_dir, scene=data["name"], query=query, view=view)


def load_scene(
    shards: str, scene: str | None = None, split: str | None = None, endpoint_url: str | None = None
) -> dict:
    """One decoded scene (without camera frames) of a shard set: `scene`, or the first by name; read alone."""
    (source,) = load_sources(
        [SourceConfig(shards, [split] if split else None)],
        endpoint_url,
        where="shards",
        scenes=frozenset([scene]) if scene else None,
        listing="scenes",
    )
    ref = min(source.samples, key=lambda r: r.name)
    row = read_sample_row(source.location, source.format, ref, with_frames=False)
    return decode_record(row_to_record(row), with_frames=False)


class FeatureImages:
    """A training run's picture of one fixed scene (the first by name of `split`, read straight from the shards on
    first use) at every evaluation: the PCA picture of the backbone's features, logged to MLflow."""

    def __init__(
        self,
        shards: str,
        split: str | None = None,
        endpoint_url: str | None = None,
        *,
        up_cast_levels: int,
        grid_size: float = 0.02,
        feat_keys: tuple[str, ...] = FEAT_KEYS,
        view: View = "oblique",
    ):
        self.shards = shards
        self.split = split
        self.endpoint_url = endpoint_url
        self.up_cast_levels = up_cast_levels
        self.grid_size = grid_size
        self.feat_keys = feat_keys
        self.view = view
        self.scene: dict | None = None

    def log(self, client, run_id: str, backbone, artifact_path: str) -> None:
        """`<artifact_path>/pca.png` on MLflow run `run_id`, from `backbone` (its mode is left as it was)."""
        if self.scene is None:
            self.scene = load_scene(self.shards, None, self.split, self.endpoint_url)
        log_feature_image(
            client,
            run_id,
            backbone,
            self.scene,
            artifact_path,
            up_cast_levels=self.up_cast_levels,
            grid_size=self.grid_size,
            feat_keys=self.feat_keys,
            view=self.view,
        )


def log_feature_image(
    client,
    run_id: str,
    backbone,
    scene: dict,
    artifact_path: str,
    *,
    up_cast_levels: int,
    grid_size: float = 0.02,
    feat_keys: tuple[str, ...] = FEAT_KEYS,
    view: View = "oblique",
) -> None:
    """Render the PCA picture of `backbone`'s features of `scene` (a decoded scene: name, coord, color, optional
    normal) and log it to MLflow run `run_id` as `<artifact_path>/pca.png`. The backbone's train/eval mode and order
    shuffling are left as they were."""
    feat = scene_features(backbone, scene, up_cast_levels, grid_size, feat_keys=feat_keys)
    name = str(scene["name"])
    with tempfile.TemporaryDirectory() as folder:
        png = render(
            scene["coord"], pca_colors(feat), Path(folder) / "pca.png", title=f"{name}: feature PCA", view=view
        )
        client.log_artifact(run_id, str(png), artifact_path)
