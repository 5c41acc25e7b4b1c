"""Plain point-cloud files in: each format read exactly (nothing invented), and `ingest` on a local Ray writes a
dataset root that `prepare` shards and the loader decodes back to the files' own arrays."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import laspy
import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from concerto_ray.cli import main as cli_main
from concerto_ray.data import storage
from concerto_ray.data.point_files import read_point_file
from concerto_ray.data.presets import SemsegTransformConfig, semseg_val_transform
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.shards import read_shards
from concerto_ray.embed import EmbedConfig, read_scene_features, run_embed
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.run_config import load_finetune_run
from concerto_ray.finetune.trainer import run_finetune
from concerto_ray.ingest import IngestConfig, IngestScene, run_ingest


def cloud(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n, 3))
    return {
        "coord": rng.uniform(0, 4, (n, 3)).astype(np.float32),
        "color": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "normal": (normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32),
        "segment": rng.integers(-1, 5, n),
    }


def write_ply(path: Path, arrays: dict[str, np.ndarray], with_normals: bool = True, with_labels: bool = True) -> None:
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    fields += [("nx", "f4"), ("ny", "f4"), ("nz", "f4")] if with_normals else []
    fields += [("label", "i4")] if with_labels else []
    vertex = np.empty(len(arrays["coord"]), dtype=fields)
    for i, axis in enumerate("xyz"):
        vertex[axis] = arrays["coord"][:, i]
        if with_normals:
            vertex[f"n{axis}"] = arrays["normal"][:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = arrays["color"][:, i]
    if with_labels:
        vertex["label"] = arrays["segment"]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(path))


def write_las(path: Path, xyz: np.ndarray, rgb16: np.ndarray, classification: np.ndarray) -> None:
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.offsets = np.floor(xyz.min(axis=0))
    header.scales = np.array([0.001, 0.001, 0.001])
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.red, las.green, las.blue = rgb16[:, 0], rgb16[:, 1], rgb16[:, 2]
    las.classification = classification
    path.parent.mkdir(parents=True, exist_ok=True)
    las.write(str(path))


def test_each_format_is_read_exactly_and_nothing_is_invented(tmp_path):
    arrays = cloud(300, 0)
    write_ply(tmp_path / "a.ply", arrays)
    found = read_point_file(tmp_path / "a.ply", labels=True)
    for key in ("coord", "color", "normal", "segment"):
        np.testing.assert_array_equal(found.arrays[key], arrays[key])
        assert found.arrays[key].dtype == arrays[key].dtype
    assert found.shift == (0.0, 0.0, 0.0)
    write_ply(tmp_path / "b.ply", arrays, with_normals=False, with_labels=False)
    assert set(read_point_file(tmp_path / "b.ply").arrays) == {"coord", "color"}
    assert "segment" not in read_point_file(tmp_path / "a.ply").arrays  # labels only when asked for

    np.save(tmp_path / "c.npy", np.concatenate([arrays["coord"], arrays["color"]], axis=1).astype(np.float32))
    found = read_point_file(tmp_path / "c.npy")
    assert set(found.arrays) == {"coord", "color"}
    np.testing.assert_array_equal(found.arrays["color"], arrays["color"])
    np.savez(tmp_path / "d.npz", coord=arrays["coord"], segment=arrays["segment"])
    assert set(read_point_file(tmp_path / "d.npz", labels=True).arrays) == {"coord", "segment"}

    # A georeferenced lidar tile (UTM metres, 16-bit colours): moved by its floored minimum corner, millimetres kept.
    rng = np.random.default_rng(1)
    xyz = np.round(rng.uniform(0, 50, (200, 3)) + [512_345.0, 5_402_100.0, 230.0], 3)
    rgb16 = rng.integers(0, 256, (200, 3)) * 257  # 8-bit colours as LAS stores them
    write_las(tmp_path / "e.las", xyz, rgb16, rng.integers(0, 7, 200).astype(np.uint8))
    found = read_point_file(tmp_path / "e.las", labels=True)
    shift = np.floor(xyz.min(axis=0))
    assert found.shift == tuple(shift)
    np.testing.assert_allclose(found.arrays["coord"] + shift, xyz, atol=5e-4)  # float32 near the origin: < 1 mm
    np.testing.assert_array_equal(found.arrays["color"], rgb16 // 257)
    assert "normal" not in found.arrays and found.arrays["segment"].dtype == np.int64

    np.save(tmp_path / "f.npy", np.zeros((10, 4)))
    with pytest.raises(DataError, match=r"f.npy.*expected \(N, 3\) coordinates or \(N, 6\)"):
        read_point_file(tmp_path / "f.npy")
    with pytest.raises(DataError, match=r"b.ply', field 'segment': labels were asked for.*label"):
        read_point_file(tmp_path / "b.ply", labels=True)
    bad = {**arrays, "coord": arrays["coord"].copy()}
    bad["coord"][5, 1] = np.nan
    write_ply(tmp_path / "g.ply", bad)
    with pytest.raises(DataError, match=r"g.ply', field 'coord': coordinates hold NaN"):
        read_point_file(tmp_path / "g.ply")


def test_ingest_writes_a_root_that_prepare_shards_and_the_loader_reads_back(ray_local, tmp_path, capsys):
    src, out = tmp_path / "scans", tmp_path / "root"
    clouds = {f"room{i}": cloud(200 + 10 * i, i) for i in range(3)}
    for name, arrays in clouds.items():
        write_ply(src / ("val" if name == "room2" else "train") / f"{name}.ply", arrays, with_normals=False)
    (src / "train" / "broken.ply").write_bytes(b"ply\nformat nonsense\n")

    with pytest.raises(DataError, match=r"sample 'train/broken'.*broken.ply.*cannot be read as PLY"):
        run_ingest(IngestConfig(str(src), str(out), labels=True), progress=False)
    summary = run_ingest(IngestConfig(str(src), str(out), labels=True, skip_bad=True), progress=False)
    assert summary.skipped and summary.skipped[0].startswith("train/broken: ")
    assert (summary.ingested, summary.already_done) == (0, 3)  # the first run wrote the good files, then stopped
    recorded = json.loads((out / "ingest.json").read_text())["scenes"]
    assert recorded["train/room0"]["arrays"] == ["color", "coord", "segment"]
    assert sorted(p.name for p in (out / "train" / "room1").iterdir()) == ["color.npy", "coord.npy", "segment.npy"]
    (out / "train" / "room1" / "coord.npy").unlink()  # an interrupted scene: its folder lacks coord.npy
    again = run_ingest(IngestConfig(str(src), str(out), labels=True, skip_bad=True), progress=False)
    assert (again.ingested, again.already_done) == (1, 2)

    # ingest, then prepare, through the CLI; the decoded scenes are the files' arrays
    shards = tmp_path / "shards"
    (src / "train" / "broken.ply").unlink()
    assert cli_main(["ingest", str(src), str(out), "--labels", "--shards", str(shards)]) == 0
    assert "ingested 0 scenes; 3 were already done" in capsys.readouterr().out
    rows = read_shards(str(shards), splits=["train", "val"], scenes=True).take_all()
    assert sorted(row["name"] for row in rows) == sorted(clouds)
    for row in rows:
        data = decode_record(row_to_record(row), with_frames=False)
        expected = clouds[row["name"]]
        for key in ("coord", "color", "segment"):
            np.testing.assert_array_equal(data[key], expected[key].astype(data[key].dtype))
        assert "normal" not in data  # the files had none: none is made up
    scene = decode_record(row_to_record(rows[0]), with_frames=False)
    with pytest.raises(DataError, match="no normal.npy"):
        semseg_val_transform(SemsegTransformConfig(num_classes=5))(scene, np.random.default_rng(0))
    sample = semseg_val_transform(SemsegTransformConfig(num_classes=5, feat_keys=("coord", "color")))(
        scene, np.random.default_rng(0)
    )
    assert sample["feat"].shape[1] == 6


def test_a_scene_file_a_node_cannot_see_stops_the_task_instead_of_counting_as_bad(tmp_path):
    out = storage.resolve(tmp_path / "out")
    row = {"split": "train", "scene": "a", "source": str(tmp_path / "elsewhere" / "a.ply")}
    with pytest.raises(FileNotFoundError, match=r"elsewhere/a.ply is not on the node .*: SRC must be a folder"):
        IngestScene(out, labels=False)(row)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.ply").write_bytes(b"")
    shared = (("--frames-src", tmp_path / "2d3ds"),)
    with pytest.raises(FileNotFoundError, match=r"2d3ds is not on the node .*: --frames-src must be a folder"):
        IngestScene(out, labels=False, shared=shared)(row)


def test_ingest_refuses_what_it_cannot_map_to_scenes(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match=r"no point-cloud files .* as .*/<split>/<scene>.<ext>"):
        run_ingest(IngestConfig(str(tmp_path), str(tmp_path / "out")), progress=False)
    np.save(tmp_path / "a" / "x.npy", np.zeros((5, 3)))
    np.savez(tmp_path / "a" / "x.npz", coord=np.zeros((5, 3)))
    with pytest.raises(ConfigError, match=r"scenes \['x'\] have more than one file"):
        run_ingest(IngestConfig(str(tmp_path), str(tmp_path / "out")), progress=False)


def test_clouds_without_normals_fine_tune_and_embed_on_their_own_inputs(ray_local, mlflow_server, tmp_path):
    """Own PLY scans (colours and labels, no normals) -> ingest -> prepare -> a fine-tuning run reading
    [coord, color] into a 6-channel backbone -> embed with its checkpoint; nothing stands in for the normals."""
    src, shards = tmp_path / "scans", tmp_path / "shards"
    for i in range(4):
        write_ply(src / ("val" if i == 3 else "train") / f"room{i}.ply", cloud(1500, i), with_normals=False)
    assert cli_main(["ingest", str(src), str(tmp_path / "root"), "--labels", "--shards", str(shards)]) == 0
    run = load_finetune_run(
        "semseg-tiny-lin",
        {
            "data.shards": str(shards),
            "data.segment_asset": "segment",  # ingest's label array (a ScanNet config reads segment20)
            "run.name": "own-scans",
            "run.storage_path": str(tmp_path / "runs"),
            "run.cpus_per_worker": 0.5,
            "mlflow.tracking_uri": mlflow_server,
            "mix_prob": 0.0,
            "epochs": 2,
            "eval_epochs": 1,
            "num_classes": 5,
            "class_names": ["a", "b", "c", "d", "e"],
            "transform.feat_keys": ["coord", "color"],
            "backbone.in_channels": 6,
            "transform.test_rotations": [0.0],
            "transform.test_scales": [],
            "transform.test_flip": False,
        },
    )
    result = run_finetune(run)
    assert 0 <= result.metrics["test_miou"] <= 1
    checkpoint = Path(result.checkpoint.path)
    stem = torch.load(checkpoint / "model.pt", weights_only=True)["state_dict"]["backbone.embedding.stem.linear.weight"]
    assert stem.shape[1] == 6
    config = EmbedConfig(str(checkpoint), str(shards), str(tmp_path / "features"), model="tiny-sonata")
    with pytest.raises(ConfigError, match=r"reads 6 input channels; feat_keys \['coord', 'color', 'normal'\] make 9"):
        run_embed(config, progress=False)
    summary = run_embed(dataclasses.replace(config, feat_keys=("coord", "color")), progress=False)
    assert summary.embedded == 4
    name, coord, feat = read_scene_features(str(tmp_path / "features"), "room0")
    assert coord.shape == (1500, 3) and len(feat) == 1500
