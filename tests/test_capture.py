"""Own RGB-D captures in: `ingest --adapter capture` writes frames, poses, intrinsics and depth-based
correspondences (checked by brute force), fuses a cloud when none is given (nothing invented), and the root
pre-trains Concerto on its own frames and `embed`s with that checkpoint, on a local Ray. (Fine-tuning reads a
capture root's scene folders as it reads any ingested root: test_ingest.py fine-tunes on own clouds.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scannet_raw_fixture import write_raw_scannet
from scipy.spatial import cKDTree
from test_ingest import write_ply
from test_pretrain import TINY_CONFIG, tiny_overrides

from concerto_ray.data.raycast import mesh_depth_image
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.scannet_raw import read_mesh, read_sens
from concerto_ray.data.shards import prepare, read_shards
from concerto_ray.embed import EmbedConfig, read_scene_features, run_embed
from concerto_ray.errors import DataError
from concerto_ray.ingest import IngestConfig, run_ingest
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.trainer import run_pretrain

FRAMES = ("frame_2", "frame_10", "frame_1", "frame_7", "frame_30")  # natural order: 1, 2, 7, 10, 30


def write_capture(folder: Path, raw: Path, with_cloud: bool) -> dict:
    """A capture of the fixture's room: its frames' colour as PNG, depth cast from the mesh in millimetres, poses
    as text, one intrinsic.txt; with `with_cloud`, the mesh's vertices (with normals) as cloud.ply."""
    scene = raw / "scans" / "scene0000_00"
    coord, color, faces = read_mesh(scene / "scene0000_00_vh_clean_2.ply")
    sens = read_sens(scene / "scene0000_00.sens", 1)
    frames = [f for f in sens.frames if np.isfinite(f.camera_to_world).all()][: len(FRAMES)]
    K = sens.intrinsic_color[:3, :3]
    for name, frame in zip(FRAMES, frames, strict=True):
        depth = sensor_depth(coord, faces, K, frame.camera_to_world, *sens.color_size)
        depth_mm = np.where(np.isfinite(depth), np.round(depth * 1000), 0).astype(np.uint16)
        for sub in ("color", "depth", "pose"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(frame.color_jpeg)).save(folder / "color" / f"{name}.png")
        Image.fromarray(depth_mm).save(folder / "depth" / f"{name}.png")
        np.savetxt(folder / "pose" / f"{name}.txt", frame.camera_to_world)
    np.savetxt(folder / "intrinsic.txt", K)
    if with_cloud:
        normal = np.random.default_rng(0).normal(size=coord.shape).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        write_ply(folder / "cloud.ply", {"coord": coord, "color": color, "normal": normal}, with_labels=False)
    return {"coord": coord}


def sensor_depth(coord, faces, K, pose, height: int, width: int) -> np.ndarray:
    """z-depth along each pixel's ray K^-1 [column, row, 1], as a depth camera reports it. `mesh_depth_image` casts
    through pixel centres (column + 0.5) and scales as the reference does; a K shifted by half a pixel casts the
    pixel's own ray, and the ratio of the two rays' lengths turns its value into that ray's z."""
    shifted = K.astype(np.float64).copy()
    shifted[:2, 2] += 0.5
    cast = mesh_depth_image(coord, faces, shifted, pose, height, width)
    column, row = np.meshgrid(np.arange(width), np.arange(height))

    def length(k):
        return np.sqrt(((column - k[0, 2]) / k[0, 0]) ** 2 + ((row - k[1, 2]) / k[1, 1]) ** 2 + 1)

    return cast * length(shifted) / length(K)


@pytest.fixture(scope="module")
def raw_room(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    write_raw_scannet(raw)
    return raw


def test_capture_frames_correspondences_and_a_fused_cloud(ray_local, raw_room, tmp_path):
    src, out = tmp_path / "captures", tmp_path / "root"
    room = write_capture(src / "train" / "kitchen", raw_room, with_cloud=True)
    write_capture(src / "train" / "hall", raw_room, with_cloud=False)
    write_capture(src / "train" / "askew", raw_room, with_cloud=False)
    Image.new("I;16", (10, 10)).save(src / "train" / "askew" / "depth" / "frame_7.png")  # not registered to colour

    with pytest.raises(DataError, match=r"sample 'train/askew'.*askew/depth/frame_7.png.*depth is 10x10 but"):
        run_ingest(IngestConfig(str(src), str(out), adapter="capture", depth=True), progress=False)
    summary = run_ingest(IngestConfig(str(src), str(out), adapter="capture", depth=True, skip_bad=True), progress=False)
    assert (summary.already_done, len(summary.skipped)) == (2, 1)

    # the given cloud is kept as it is; frames in natural order, four per split-file sample
    np.testing.assert_array_equal(np.load(out / "train/kitchen/coord.npy"), room["coord"])
    entries = json.loads((out / "splits/train.json").read_text())
    assert entries["kitchen_0"]["images"] == [f"images/train/kitchen/color/frame_{i}.png" for i in (1, 2, 7, 10)]
    assert entries["kitchen_1"]["correspondences"] == ["images/train/kitchen/correspondence/frame_30.npy"]
    images = out / "images/train/kitchen"
    K = np.loadtxt(src / "train/kitchen/intrinsic.txt")
    for name in FRAMES:
        depth_mm = np.asarray(Image.open(src / "train/kitchen/depth" / f"{name}.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(images / "depth" / f"{name}.png")), depth_mm)
        assert (images / "color" / f"{name}.png").read_bytes() == (
            src / "train/kitchen/color" / f"{name}.png"
        ).read_bytes()
        pose = np.load(images / "pose" / f"{name}.npy")
        np.testing.assert_allclose(pose, np.loadtxt(src / "train/kitchen/pose" / f"{name}.txt"), atol=1e-7)
        # by brute force: each row's pixel, lifted with its depth, is within 1 cm of its point, and that point is
        # the nearest; the pixels left out are those with no point within 1 cm
        table = np.load(images / "correspondence" / f"{name}.npy")
        column, row, index = table[:, 0].astype(int), table[:, 1].astype(int), table[:, 2].astype(int)
        rows, columns = np.nonzero(depth_mm)
        z = depth_mm[rows, columns] / 1000.0
        camera = np.stack([(columns - K[0, 2]) / K[0, 0] * z, (rows - K[1, 2]) / K[1, 1] * z, z], axis=1)
        world = camera @ pose[:3, :3].T + pose[:3, 3]
        distance = np.linalg.norm(world[:, None, :] - room["coord"][None, :, :], axis=2)
        near = distance.min(1) < 0.01
        assert 100 < near.sum() < len(near)
        assert sorted(zip(row, column, strict=True)) == sorted(zip(rows[near], columns[near], strict=True))
        at = {(r, c): i for r, c, i in zip(rows, columns, distance.argmin(1), strict=True)}
        assert [at[(r, c)] for r, c in zip(row, column, strict=True)] == index.tolist()

    # no cloud: one fused from the depth, one point per 1 cm cell, colour and nothing else
    fused = np.load(out / "train/hall/coord.npy")
    assert sorted(p.name for p in (out / "train/hall").iterdir()) == ["color.npy", "coord.npy"]
    assert len(np.unique(np.floor(fused / 0.01), axis=0)) == len(fused) > 1000
    from_room, _ = cKDTree(room["coord"]).query(fused)
    # on the room's surfaces: a surface point is within 1.42 cm of a vertex of the 2 cm mesh
    assert np.median(from_room) < 0.01 and np.percentile(from_room, 99) < 0.0142


def test_a_capture_pretrains_concerto_on_its_own_frames_and_embeds(
    ray_local, raw_room, dinov2_dir, mlflow_server, tmp_path
):
    src, root, shards = tmp_path / "captures", tmp_path / "root", tmp_path / "shards"
    for name in ("kitchen", "hall"):
        write_capture(src / "train" / name, raw_room, with_cloud=True)
    write_capture(src / "val" / "office", raw_room, with_cloud=True)
    run_ingest(IngestConfig(str(src), str(root), adapter="capture"), progress=False)
    prepare(root, str(shards), progress=False)
    (row,) = [r for r in read_shards(str(shards), splits=["train"]).take_all() if r["name"] == "kitchen_0"]
    assert [len(c) > 100 for c in decode_record(row_to_record(row))["frames_correspondence"]] == [True] * 4

    overrides = tiny_overrides(shards, dinov2_dir, "own-capture", str(tmp_path / "runs"))
    config = load_pretrain_config(TINY_CONFIG, [*overrides, f"mlflow.tracking_uri={mlflow_server}", "run.epochs=1"])
    pretrained = run_pretrain(config)
    assert pretrained.metrics["step"] > 0 and np.isfinite(pretrained.metrics["loss"])

    summary = run_embed(
        EmbedConfig(pretrained.checkpoint.path, str(shards), str(tmp_path / "features")), progress=False
    )
    assert summary.embedded == 3
    _, coord, feat = read_scene_features(str(tmp_path / "features"), "kitchen")
    assert coord.shape == (7191, 3) and len(feat) == 7191
