"""Raw ScanNet in: `ingest --adapter scannet` on a local Ray writes what Pointcept's own Concerto ScanNet
preprocessing writes for the same raw files, and `prepare` shards it into pre-training samples.

tests/data/scannet_raw_reference.npz holds the reference's output for the fixture of tests/scannet_raw_fixture.py,
written once by tests/data/make_scannet_raw_reference.py with Pointcept's code, Open3D and camtools (none exist in
CI). So the arrays here are checked against the reference's code, not against our reading of it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scannet_raw_fixture import FRAME_SKIP, write_raw_scannet

from concerto_ray.cli import main as cli_main
from concerto_ray.data.correspondence import nearest_point_correspondences
from concerto_ray.data.raycast import mesh_depth_image
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.scannet_raw import read_mesh, read_sens, scene_labels
from concerto_ray.data.shards import read_shards
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.ingest import IngestConfig, run_ingest

REFERENCE = Path(__file__).resolve().parent / "data" / "scannet_raw_reference.npz"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as arrays:
        return dict(arrays)


def test_ingest_writes_what_pointcepts_preprocessing_writes(ray_local, reference, tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "root"
    write_raw_scannet(src)
    broken = src / "scans_test" / "scene0800_00"  # a test scene whose stream was cut short
    broken.mkdir()
    (broken / "scene0800_00_vh_clean_2.ply").write_bytes(
        (src / "scans_test/scene0707_00/scene0707_00_vh_clean_2.ply").read_bytes()
    )
    (broken / "scene0800_00.sens").write_bytes((src / "scans_test/scene0707_00/scene0707_00.sens").read_bytes()[:5000])

    config = IngestConfig(str(src), str(out), adapter="scannet", frame_skip=FRAME_SKIP, depth=True)
    with pytest.raises(DataError, match=r"sample 'test/scene0800_00'.*scene0800_00.sens.*the file ends inside frame"):
        run_ingest(config, progress=False)
    summary = run_ingest(IngestConfig(**{**config.__dict__, "skip_bad": True}), progress=False)
    assert (summary.ingested, summary.already_done, len(summary.skipped)) == (0, 3, 1)

    for key, expected in reference.items():
        path = out / key
        if key.endswith(".json"):
            assert json.loads(path.read_text()) == json.loads(str(expected)), key
            continue
        ours = np.asarray(Image.open(path)) if key.endswith(".png") else np.load(path)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, key
        np.testing.assert_array_equal(ours, expected, err_msg=key)
    ours = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "/color/" not in p.as_posix()}
    assert ours - set(reference) == {"ingest.json"}  # nothing beyond the reference's files
    for split, scene in (("train", "scene0000_00"), ("val", "scene0100_00"), ("test", "scene0707_00")):
        raw = src / ("scans_test" if split == "test" else "scans") / scene
        for frame in read_sens(raw / f"{scene}.sens", FRAME_SKIP).frames:  # colour: the frame's JPEG, decoded
            png = np.asarray(Image.open(out / f"images/{split}/{scene}/color/{frame.index}.png"))
            np.testing.assert_array_equal(png, np.asarray(Image.open(io.BytesIO(frame.color_jpeg))))

    # then prepare: pre-training samples of four frames, their correspondences the reference's
    shards = tmp_path / "shards"
    assert cli_main(["prepare", str(out), str(shards), "--splits", "train"]) == 0
    capsys.readouterr()
    (row,) = read_shards(str(shards), splits=["train"]).take_all()
    data = decode_record(row_to_record(row))
    np.testing.assert_array_equal(data["coord"], reference["train/scene0000_00/coord.npy"])
    assert data["segment"].tolist() == reference["train/scene0000_00/segment20.npy"].tolist()
    for i, frame in enumerate(("0", "3", "6")):
        expected = reference[f"images/train/scene0000_00/correspondence/{frame}.npy"]
        np.testing.assert_array_equal(data["frames_correspondence"][i], expected.astype(np.float32))


def test_the_mesh_cast_is_the_same_on_a_torch_device_and_refuses_bad_inputs(tmp_path):
    write_raw_scannet(tmp_path)
    scene = tmp_path / "scans" / "scene0000_00"
    coord, _, faces = read_mesh(scene / "scene0000_00_vh_clean_2.ply")
    sens = read_sens(scene / "scene0000_00.sens", FRAME_SKIP)
    K, pose = sens.intrinsic_color[:3, :3], sens.frames[0].camera_to_world
    depth = mesh_depth_image(coord, faces, K, pose, *sens.color_size)
    # the torch search on "cpu" stands for the GPU path: the same table as scipy's k-d tree
    np.testing.assert_array_equal(
        nearest_point_correspondences(coord, depth, K, pose, device="cpu"),
        nearest_point_correspondences(coord, depth, K, pose),
    )
    (scene / "scene0000_00.aggregation.json").write_text('{"sceneId": "scene0000_00"}')
    with pytest.raises(DataError, match=r"scene0000_00.aggregation.json', field 'segGroups': missing from the file"):
        scene_labels(scene, "scene0000_00", len(coord), {})
    (scene / "scene0000_00.sens").write_bytes(b"\x05\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"scene0000_00.sens.*version 5, expected 4"):
        read_sens(scene / "scene0000_00.sens", FRAME_SKIP)
    with pytest.raises(ConfigError, match="--adapter scannet does not take split, labels"):
        IngestConfig(str(tmp_path), str(tmp_path / "out"), adapter="scannet", split="train", labels=True)
    (tmp_path / "scannetv2_val.txt").unlink()
    with pytest.raises(ConfigError, match=r"scannetv2_val.txt is missing \(Tasks/Benchmark"):
        run_ingest(IngestConfig(str(tmp_path), str(tmp_path / "out"), adapter="scannet"), progress=False)
