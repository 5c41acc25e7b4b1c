"""Raw S3DIS in: `ingest --adapter s3dis` on a local Ray writes what Pointcept's own Concerto S3DIS preprocessing
writes for the same raw files, and `prepare` shards it into pre-training samples.

tests/data/s3dis_raw_reference.npz holds the reference's output for the fixture of tests/s3dis_raw_fixture.py,
written once by tests/data/make_s3dis_raw_reference.py with Pointcept's code, Open3D, camtools and trimesh (only
trimesh exists in CI). So the arrays here are checked against the reference's code, not against our reading of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from s3dis_raw_fixture import write_raw_s3dis

from concerto_ray.cli import main as cli_main
from concerto_ray.data import storage
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.s3dis_raw import FRAME_SKIP, S3disRoom, area_mesh, read_obj
from concerto_ray.data.shards import read_shards
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.ingest import IngestConfig, run_ingest

REFERENCE = Path(__file__).resolve().parent / "data" / "s3dis_raw_reference.npz"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as arrays:
        return dict(arrays)


def test_ingest_writes_what_pointcepts_s3dis_preprocessing_writes(ray_local, reference, tmp_path, capsys):
    src, frames = write_raw_s3dis(tmp_path / "raw")
    out = tmp_path / "root"
    # a room with a stray byte inside a number, as Area_5/office_19's ceiling in the public download
    (src / "Area_1" / "office_2" / "Annotations").mkdir(parents=True)
    (src / "Area_1" / "office_2" / "Annotations" / "ceiling_1.txt").write_text("1.0 2.0 103.0\x100000 1 2 3\n")
    with open(src / "Area_1" / "Area_1_alignmentAngle.txt", "a") as f:
        f.write("office_2 0\n")

    config = IngestConfig(str(src), str(out), adapter="s3dis", frames_src=str(frames), depth=True)
    with pytest.raises(DataError, match=r"sample 'Area_1/office_2'.*ceiling_1.txt'.*not a table of numbers"):
        run_ingest(config, progress=False)
    summary = run_ingest(IngestConfig(**{**config.__dict__, "skip_bad": True}), progress=False)
    assert (summary.ingested, summary.already_done, len(summary.skipped)) == (0, 5, 1)
    assert "1 scenes have no frames (Concerto pre-training has no sample of them):\n  Area_1/WC_1" in summary.text()

    compared = set()
    for key, expected in reference.items():
        if key.startswith("aligned/") or key == "copied":
            continue
        compared.add(key)
        if key.endswith(".json"):
            assert json.loads((out / key).read_text()) == json.loads(str(expected)), key
            continue
        ours = np.load(out / key)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, key
        np.testing.assert_array_equal(ours, expected, err_msg=key)  # NaN poses equal NaN
    copied = set(json.loads(str(reference["copied"])))
    ours = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert ours - compared - copied == {"ingest.json"} and copied <= ours  # the reference's files, nothing more
    for rel in copied:  # colour and depth: the source files, byte for byte
        area, kind = rel.split("/")[1].lower(), "rgb" if "/color/" in rel else "depth"
        (source,) = frames.glob(f"{area}*/data/{kind}/{Path(rel).name}")
        assert (out / rel).read_bytes() == source.read_bytes(), rel

    # then prepare: pre-training samples of up to four frames of one camera, their correspondences the reference's
    shards = tmp_path / "shards"
    assert cli_main(["prepare", str(out), str(shards), "--splits", "Area_1"]) == 0
    capsys.readouterr()
    rows = {row["name"]: row for row in read_shards(str(shards), splits=["Area_1"]).take_all()}
    assert sorted(rows) == sorted(json.loads(str(reference["splits/Area_1.json"])))
    data = decode_record(row_to_record(rows["office_1_a0b1c2_0"]))
    np.testing.assert_array_equal(data["coord"], reference["Area_1/office_1/coord.npy"])
    images = "images/Area_1/office_1/a0b1c2/correspondence"
    for i, frame in enumerate((0, 5, 10)):
        expected = reference[f"{images}/camera_a0b1c2_office_1_frame_{frame}_domain_rgb.npy"]
        np.testing.assert_array_equal(data["frames_correspondence"][i], expected.astype(np.float32))


def test_align_angle_turns_rooms_as_the_reference_and_bad_inputs_are_named(reference, tmp_path):
    src, frames = write_raw_s3dis(tmp_path)
    out = storage.resolve(str(tmp_path / "out"), None)
    aligned = S3disRoom(out, frames, FRAME_SKIP, False, True, "cpu")
    for area, room in (("Area_1", "office_1"), ("Area_5", "hallway_1")):  # turned by 90 and 270 degrees
        aligned.convert(area, room, src / area / room)
        for key in ("coord", "normal"):
            expected = reference[f"aligned/{area}/{room}/{key}.npy"]
            np.testing.assert_array_equal(np.load(tmp_path / "out" / area / room / f"{key}.npy"), expected)
    images = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "images").rglob("*.npy")}
    assert len(images) == 30 and not list((tmp_path / "out").rglob("depth"))
    for key in images:  # poses, intrinsics, correspondences in the rooms' own frame: those of the unturned run
        np.testing.assert_array_equal(np.load(tmp_path / "out" / key), reference[key], err_msg=key)
    next(frames.glob("area_1/data/depth/camera_a0b1c2_office_1_frame_5_*")).unlink()
    with pytest.raises(DataError, match=r"camera_a0b1c2_office_1_frame_5_domain_rgb.png'.*missing: the frame's depth"):
        S3disRoom(out, frames, FRAME_SKIP, True, False, "cpu").convert(
            "Area_1", "office_1", src / "Area_1" / "office_1"
        )

    with pytest.raises(ConfigError, match="--adapter s3dis needs --frames-src"):
        IngestConfig(str(src), str(tmp_path / "o"), adapter="s3dis")
    with pytest.raises(ConfigError, match="--adapter s3dis does not take split, label_map"):
        IngestConfig(str(src), str(tmp_path / "o"), adapter="s3dis", frames_src=str(frames), split="a", label_map="m")
    with pytest.raises(ConfigError, match="--adapter scannet does not take frames_src, align_angle"):
        IngestConfig(str(src), str(tmp_path / "o"), adapter="scannet", frames_src=str(frames), align_angle=True)
    quad = tmp_path / "quad.obj"
    quad.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n")
    with pytest.raises(DataError, match=r"quad.obj.*a face that is not a triangle"):
        read_obj(quad)
    (frames / "area_5b" / "3d" / "rgb.obj").unlink()
    with pytest.raises(ConfigError, match=r"frames_src: .*area_5b/3d/rgb.obj missing"):
        run_ingest(IngestConfig(str(src), str(tmp_path / "o"), adapter="s3dis", frames_src=str(frames)))
    (frames / "area_1" / "3d" / "rgb.obj").unlink()
    area_mesh.cache_clear()  # area 1's mesh was read above
    with pytest.raises(DataError, match=r"area_1/3d/rgb.obj.*missing: the area's mesh"):
        S3disRoom(out, frames, FRAME_SKIP, False, False, "cpu").convert(
            "Area_1", "hallway_1", src / "Area_1" / "hallway_1"
        )
