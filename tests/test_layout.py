"""The Pointcept layout reader and the record decoder, on a tiny synthetic dataset."""

import json
import shutil

import numpy as np
import pytest

from concerto_ray.data.layout import list_samples, read_sample
from concerto_ray.data.record import decode_record, record_to_row, row_to_record
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import DataError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "scannet"
    write_synthetic_dataset(
        root,
        SynthConfig(
            scenes=2,
            points_per_scene=2000,
            views_per_scene=4,
            image_width=64,
            image_height=48,
            splits={"train": 0.5, "val": 0.5},
        ),
        progress=False,
    )
    return root


@pytest.fixture
def copy(dataset, tmp_path):
    root = tmp_path / "scannet"
    shutil.copytree(dataset, root)
    return root


def test_reads_every_file_of_a_sample(dataset):
    samples = list_samples(dataset)
    assert sorted(s.split for s in samples) == ["train", "val"]
    sample = samples[0]
    record = read_sample(sample, "scannet")
    assert set(record.point_assets) == {p.stem for p in sample.pointcloud_dir.glob("*.npy")}
    for key, blob in record.point_assets.items():
        assert blob == (sample.pointcloud_dir / f"{key}.npy").read_bytes()
    assert [f.name for f in record.frames] == ["0", "1", "2", "3"]
    image_dir = sample.frames[0].color.parent.parent
    frame = record.frames[1]
    assert frame.color == (image_dir / "color" / "1.png").read_bytes()
    assert frame.depth == (image_dir / "depth" / "1.png").read_bytes()
    assert frame.pose == (image_dir / "pose" / "1.npy").read_bytes()
    assert frame.intrinsic == (image_dir / "intrinsic" / "intrinsic.npy").read_bytes()
    assert frame.correspondence == (image_dir / "correspondence" / "1.npy").read_bytes()


def test_row_round_trip_and_decode(dataset):
    record = read_sample(list_samples(dataset)[0], "scannet")
    again = row_to_record(record_to_row(record))
    assert again == record
    data = decode_record(again)
    n = data["coord"].shape[0]
    assert data["coord"].dtype == np.float32 and data["color"].dtype == np.float32
    assert data["segment"].dtype == np.int32 and data["segment"].shape == (n,)
    assert np.array_equal(data["segment"], data["segment20"].astype(np.int32))  # ScanNet's label file
    assert len(data["frames_color"]) == len(data["frames_correspondence"]) == 4
    assert data["frames_color"][0].shape == (48, 64, 3) and data["frames_color"][0].dtype == np.uint8


def test_pointcept_path_prefixes_and_per_frame_intrinsics(copy):
    # Pointcept writes split paths relative to its checkout ("data/scannet/...") and some datasets keep one
    # intrinsic file per frame.
    split_file = copy / "splits" / "train.json"
    entries = json.loads(split_file.read_text())
    for entry in entries.values():
        entry["pointclouds"] = "data/scannet/" + entry["pointclouds"]
        entry["images"] = ["data/scannet/" + p for p in entry["images"]]
        entry["correspondences"] = ["data/scannet/" + p for p in entry["correspondences"]]
    split_file.write_text(json.dumps(entries))
    sample = list_samples(copy, ["train"])[0]
    intrinsic_dir = sample.frames[0].color.parent.parent / "intrinsic"
    shared = np.load(intrinsic_dir / "intrinsic.npy")
    np.save(intrinsic_dir / "2.npy", shared * 2)
    sample = list_samples(copy, ["train"])[0]
    assert sample.pointcloud_dir == copy / "train" / sample.pointcloud_dir.name
    record = read_sample(sample, "scannet")
    assert record.frames[2].intrinsic == (intrinsic_dir / "2.npy").read_bytes()
    assert record.frames[1].intrinsic == (intrinsic_dir / "intrinsic.npy").read_bytes()


def test_plain_segmentation_layout_without_split_files(copy):
    shutil.rmtree(copy / "splits")
    shutil.rmtree(copy / "images")
    samples = list_samples(copy)
    assert {s.split for s in samples} == {"train", "val"}
    record = read_sample(samples[0], "scannet")
    assert record.frames == [] and "coord" in record.point_assets


def test_missing_point_cloud_folder_names_sample_and_file(copy):
    sample = list_samples(copy, ["train"])[0]
    shutil.rmtree(sample.pointcloud_dir)
    with pytest.raises(DataError) as err:
        list_samples(copy, ["train"])
    assert sample.name in str(err.value) and "pointclouds" in str(err.value)


def test_malformed_split_file(copy):
    (copy / "splits" / "val.json").write_text("{not json")
    with pytest.raises(DataError, match=r"val\.json.*not a readable JSON"):
        list_samples(copy, ["val"])


def test_unknown_split(copy):
    with pytest.raises(DataError, match="split 'test'"):
        list_samples(copy, ["test"])


def test_bad_pose_matrix_names_the_frame(copy):
    sample = list_samples(copy, ["train"])[0]
    np.save(sample.frames[0].pose, np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError) as err:
        read_sample(sample, "scannet")
    assert "pose of frame images/train/" in str(err.value) and "field 'pose'" in str(err.value)


def test_segmentation_requires_labels(dataset):
    record = read_sample(list_samples(dataset)[0], "scannet")
    del record.point_assets["segment20"]
    assert (decode_record(record, with_frames=False)["segment"] == -1).all()  # pre-training: no labels needed
    with pytest.raises(DataError) as err:
        decode_record(record, with_frames=False, require_labels=True)
    assert err.value.field == "segment20" and err.value.sample == record.name


def test_untracked_frame_pose_is_accepted(copy):
    # ScanNet writes an all -inf pose for frames its tracking lost, S3DIS a NaN [R|t] (their correspondence is the
    # (-1, -1, -1) row); Pointcept never reads poses, so such a frame must not fail the sample. A non-finite pose
    # of a frame with correspondences still does.
    sample = list_samples(copy, ["train"])[0]
    correspondence = sample.frames[0].correspondence.read_bytes()
    np.save(sample.frames[0].pose, np.full((4, 4), -np.inf, dtype=np.float32))
    np.save(sample.frames[0].correspondence, -np.ones((1, 3)))
    assert read_sample(sample, "scannet").frames[0].pose == sample.frames[0].pose.read_bytes()
    pose = np.eye(4)
    pose[:3] = np.nan
    np.save(sample.frames[0].pose, pose)
    assert read_sample(sample, "scannet").frames[0].pose == sample.frames[0].pose.read_bytes()
    sample.frames[0].correspondence.write_bytes(correspondence)
    with pytest.raises(DataError, match="field 'pose'"):
        read_sample(sample, "scannet")
