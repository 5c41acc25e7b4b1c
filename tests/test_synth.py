"""The synthetic generator writes Pointcept's ScanNet layout, consistently and deterministically."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concerto_ray.config import from_dict
from concerto_ray.data.scannet_classes import SCANNET20_CLASSES
from concerto_ray.data.synth import DEPTH_TOLERANCE_M, SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError

CONFIG = SynthConfig(scenes=3, seed=7, points_per_scene=3000, views_per_scene=5, image_width=64, image_height=48)
SPLIT_OF_SCENE = {"scene0000_00": "train", "scene0001_00": "train", "scene0002_00": "val"}  # 0.75 / 0.25 of 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "out", CONFIG, progress=False)


def _scenes():
    return [(split, name) for name, split in SPLIT_OF_SCENE.items()]


def _views(root: Path, split: str, name: str):
    """(color, depth, pose, intrinsic, correspondence) of every view of a scene."""
    images = root / "images" / split / name
    intrinsic = np.load(images / "intrinsic" / "intrinsic.npy")
    for view in range(CONFIG.views_per_scene):
        yield (
            np.array(Image.open(images / "color" / f"{view}.png")),
            np.array(Image.open(images / "depth" / f"{view}.png")),
            np.load(images / "pose" / f"{view}.npy"),
            intrinsic,
            np.load(images / "correspondence" / f"{view}.npy"),
        )


def _project(coord, pose, intrinsic):
    world_to_camera = np.linalg.inv(pose.astype(np.float64))
    camera = coord.astype(np.float64) @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    z = camera[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        column = intrinsic[0, 0] * camera[:, 0] / z + intrinsic[0, 2]
        row = intrinsic[1, 1] * camera[:, 1] / z + intrinsic[1, 2]
    return column, row, z


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_point_cloud_files_have_pointcept_names_dtypes_and_shapes(root):
    assert sorted(p.name for p in root.iterdir()) == ["images", "splits", "synth_config.json", "train", "val"]
    for split, name in _scenes():
        cloud = root / split / name
        assert sorted(p.name for p in cloud.iterdir()) == [
            "color.npy",
            "coord.npy",
            "instance.npy",
            "normal.npy",
            "segment20.npy",
            "segment200.npy",
        ]
        n = CONFIG.points_per_scene
        arrays = {p.stem: np.load(p) for p in cloud.iterdir()}
        expected = {
            "coord": (np.float32, (n, 3)),
            "color": (np.uint8, (n, 3)),
            "normal": (np.float32, (n, 3)),
            "segment20": (np.int64, (n,)),
            "segment200": (np.int64, (n,)),
            "instance": (np.int64, (n,)),
        }
        for key, (dtype, shape) in expected.items():
            assert arrays[key].dtype == dtype and arrays[key].shape == shape, key
        np.testing.assert_allclose(np.linalg.norm(arrays["normal"], axis=1), 1.0, atol=1e-5)
        assert np.all(np.isfinite(arrays["coord"]))
        # walls and floor bound the room, which starts at the origin
        assert arrays["coord"].min() > -0.05 and 2.0 < arrays["coord"][:, 2].max() < 3.1


def test_image_files_have_pointcept_names_dtypes_and_shapes(root):
    for split, name in _scenes():
        images = root / "images" / split / name
        assert sorted(p.name for p in images.iterdir()) == ["color", "correspondence", "depth", "intrinsic", "pose"]
        assert sorted(p.name for p in (images / "color").iterdir()) == [f"{i}.png" for i in range(5)]
        for color, depth, pose, intrinsic, correspondence in _views(root, split, name):
            assert color.dtype == np.uint8 and color.shape == (48, 64, 3)
            assert depth.dtype == np.uint16 and depth.shape == (48, 64)
            assert 0 < np.count_nonzero(depth) and depth.max() < 10_000  # millimetres inside a room
            assert pose.dtype == np.float32 and pose.shape == (4, 4)
            np.testing.assert_allclose(pose[3], [0, 0, 0, 1])
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-5)
            assert intrinsic.dtype == np.float32 and intrinsic.shape == (4, 4)
            assert intrinsic[0, 0] == pytest.approx(0.9 * 64) and intrinsic[1, 1] == pytest.approx(0.9 * 64)
            assert correspondence.dtype == np.float64 and correspondence.ndim == 2 and correspondence.shape[1] == 3


def test_labels_are_scannet20_ids_and_several_classes_occur(root):
    labels, instances = [], []
    for split, name in _scenes():
        labels.append(np.load(root / split / name / "segment20.npy"))
        instances.append(np.load(root / split / name / "instance.npy"))
    labels = np.concatenate(labels)
    assert labels.min() >= -1 and labels.max() < len(SCANNET20_CLASSES)
    present = {SCANNET20_CLASSES[i] for i in np.unique(labels[labels >= 0])}
    assert {"wall", "floor", "door"} <= present and len(present) >= 6
    for label, instance in zip(labels.reshape(3, -1), instances):
        assert len(np.unique(instance[label >= 0])) >= 5  # walls, floor and objects are separate instances
        assert np.all((instance == -1) == (label == -1))


def test_correspondences_point_at_the_pixel_they_project_to_and_skip_occluded_points(root):
    occluded_total, matched_total = 0, 0
    for split, name in _scenes():
        coord = np.load(root / split / name / "coord.npy")
        point_color = np.load(root / split / name / "color.npy").astype(float)
        for color, depth, pose, intrinsic, correspondence in _views(root, split, name):
            column, row, z = _project(coord, pose, intrinsic)
            pixel_x, pixel_y = np.rint(column), np.rint(row)
            in_image = np.flatnonzero((z > 0) & (pixel_x >= 0) & (pixel_x < 64) & (pixel_y >= 0) & (pixel_y < 48))
            surface = depth[pixel_y[in_image].astype(int), pixel_x[in_image].astype(int)] / 1000.0
            # clearly behind the surface the view shows at its pixel
            occluded = set(in_image[(surface > 0) & (z[in_image] > surface + 0.1)].tolist())
            occluded_total += len(occluded)
            if np.array_equal(correspondence, -np.ones((1, 3))):
                continue
            pixel_column, pixel_row, index = correspondence.T
            assert np.all(index == np.round(index)) and index.min() >= 0 and index.max() < len(coord)
            index = index.astype(int)
            assert len(np.unique(index)) == len(index)
            np.testing.assert_array_less(np.abs(column[index] - pixel_column), 0.51)
            np.testing.assert_array_less(np.abs(row[index] - pixel_row), 0.51)
            seen_depth = depth[pixel_row.astype(int), pixel_column.astype(int)] / 1000.0
            assert np.all(seen_depth > 0)
            np.testing.assert_array_less(np.abs(z[index] - seen_depth), DEPTH_TOLERANCE_M)
            assert not occluded & set(index.tolist())
            # the image shows the surface the point lies on
            pixel_color = color[pixel_row.astype(int), pixel_column.astype(int)].astype(float)
            assert np.abs(pixel_color - point_color[index]).mean() < 20
            matched_total += len(index)
    assert occluded_total > 0, "no view had a point hidden behind another surface: the occlusion check is vacuous"
    assert matched_total > 100


def test_split_files_group_views_by_four_with_paths_relative_to_root(root):
    seen_scenes = set()
    for split in ("train", "val"):
        entries = json.loads((root / "splits" / f"{split}.json").read_text())
        for key, entry in entries.items():
            scene, group = key.rsplit("_", 1)
            seen_scenes.add(scene)
            assert SPLIT_OF_SCENE[scene] == split and entry["pointclouds"] == f"{split}/{scene}"
            views = [0, 1, 2, 3] if group == "0" else [4]
            assert entry["images"] == [f"images/{split}/{scene}/color/{v}.png" for v in views]
            assert entry["correspondences"] == [f"images/{split}/{scene}/correspondence/{v}.npy" for v in views]
            assert (root / entry["pointclouds"] / "coord.npy").is_file()
            assert all((root / p).is_file() for p in entry["images"] + entry["correspondences"])
        assert len(entries) == 2 * sum(s == split for s in SPLIT_OF_SCENE.values())
    assert seen_scenes == set(SPLIT_OF_SCENE)


def test_same_seed_gives_identical_bytes_and_scenes_do_not_depend_on_the_scene_count(root, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", CONFIG, progress=False)
    assert _tree(again) == _tree(root)

    single = write_synthetic_dataset(tmp_path / "single", SynthConfig(**{**vars(CONFIG), "scenes": 1}), progress=False)
    assert _tree(single / "train" / "scene0000_00") == _tree(root / "train" / "scene0000_00")

    other = write_synthetic_dataset(
        tmp_path / "other", SynthConfig(**{**vars(CONFIG), "scenes": 1, "seed": 8}), progress=False
    )
    assert (other / "train/scene0000_00/coord.npy").read_bytes() != (root / "train/scene0000_00/coord.npy").read_bytes()


def test_refuses_foreign_directories_and_replaces_an_earlier_synthetic_dataset(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_dataset(foreign, CONFIG, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

    small = SynthConfig(
        scenes=2, points_per_scene=200, views_per_scene=1, image_width=16, image_height=16, splits={"train": 1.0}
    )
    out = write_synthetic_dataset(tmp_path / "out", small, progress=False)
    write_synthetic_dataset(out, SynthConfig(**{**vars(small), "scenes": 1}), progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["scene0000_00"]
    assert list(json.loads((out / "splits" / "train.json").read_text())) == ["scene0000_00_0"]

    (out / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_synthetic_dataset(out, small, progress=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("scenes", 0),
        ("seed", -1),
        ("points_per_scene", 10),
        ("views_per_scene", 0),
        ("image_width", 8),
        ("image_height", True),
        ("coord_noise", 0.05),
        ("splits", {"train": 0.5, "val": 0.4}),
        ("splits", {"train": 0.5, "holdout": 0.5}),
        ("splits", {"train": 1.0, "val": 0.0}),
        ("splits", {}),
        ("flavor", "scannet300"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**{field: value})


def test_config_from_yaml_dict_is_validated():
    assert from_dict(SynthConfig, {"scenes": 2, "splits": {"train": 1}}).splits == {"train": 1.0}
    with pytest.raises(ConfigError, match="image_width"):
        from_dict(SynthConfig, {"image_width": 4})


def test_cli_flavor_writes_that_datasets_files(tmp_path):
    from concerto_ray.cli import main

    out = tmp_path / "s3dis"
    assert (
        main(
            [
                "synth",
                str(out),
                "--flavor",
                "s3dis",
                "--scenes",
                "1",
                "--points",
                "300",
                "--views",
                "2",
                "--image-size",
                "32x24",
                "--no-depth",
            ]
        )
        == 0
    )
    assert json.loads((out / "synth_config.json").read_text())["flavor"] == "s3dis"
    (room,) = out.glob("Area_*/office_1")  # one scene: in one of the six areas, all of whose split files exist
    area = room.parent.name
    assert sorted(p.stem for p in (out / "splits").iterdir()) == [f"Area_{i}" for i in range(1, 7)]
    assert np.load(room / "segment.npy").shape == (300, 1) and np.load(room / "segment.npy").dtype == np.int16
    cameras = sorted((out / "images" / area / "office_1").iterdir())
    assert len(cameras) == 2 and not any(out.rglob("depth"))
    assert sorted(json.loads((out / "splits" / f"{area}.json").read_text())) == [
        f"office_1_{c.name}_0" for c in cameras
    ]
