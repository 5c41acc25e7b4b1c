"""Every dataset flavour, written by `synth --flavor`, read back by our loader as Pointcept's dataset classes read it.

CI has no Pointcept checkout, so the expected arrays here are built from the raw files with the rules of the
reference's `get_data` methods (cited at each rule). The same comparison against the reference's own classes runs
when POINTCEPT_SRC names an extracted Pointcept source tree: `test_loader_matches_the_reference_classes` runs this
file as a script (see `_compare_with_reference`), which imports those classes read-only beside ours.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concerto_ray.data.flavors import FLAVORS, SCANNETPP_CHUNK_SPLIT, flavor, label_asset
from concerto_ray.data.layout import list_samples, read_sample
from concerto_ray.data.record import decode_record
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import DataError
from concerto_ray.finetune.configs import load_finetune_config
from concerto_ray.finetune.run_config import load_finetune_run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SPLITS = {"scannet": {"train": 0.5, "val": 0.25, "test": 0.25}, "s3dis": {"Area_1": 0.5, "Area_5": 0.5}}


def _config(name: str) -> SynthConfig:
    return SynthConfig(
        scenes=4,
        seed=3,
        points_per_scene=600,
        views_per_scene=5,
        image_width=48,
        image_height=32,
        splits=SPLITS.get(name),
        flavor=name,
    )


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("flavors")
    return {name: write_synthetic_dataset(base / name, _config(name), progress=False) for name in FLAVORS}


def _expected_points(name: str, cloud: Path) -> dict[str, np.ndarray]:
    """What the reference's dataset class returns for a scene folder, from the raw files."""
    arrays = {p.stem: np.load(p) for p in cloud.glob("*.npy")}
    n = len(arrays["coord"])
    # Every class casts coord / color / normal to float32 (pointcept/datasets/defaults.py DefaultDataset.get_data,
    # scannet.py ScanNetDataset.get_data, scannetpp.py ScanNetPPDataset.get_data).
    expected = {k: arrays[k].astype(np.float32) for k in ("coord", "color", "normal") if k in arrays}
    asset = flavor(name).label_asset
    for key, source in (("segment", asset), ("instance", "instance")):
        if source not in arrays:  # no labels: all -1 (DefaultDataset.get_data)
            expected[key] = np.full(n, -1, dtype=np.int32)
        elif arrays[source].shape[1:] != ((flavor(name).label_columns,) if flavor(name).label_columns else ()):
            raise AssertionError(f"{name} {source}.npy has shape {arrays[source].shape}")
        elif name == "scannetpp":  # ScanNetPPDataset.get_data: column 0 of the (N, 3) arrays
            expected[key] = arrays[source][:, 0].astype(np.int32)
        else:  # ScanNetDataset (segment20 / segment200) and DefaultDataset: reshape([-1]) of (N,) or (N, 1)
            expected[key] = arrays[source].reshape([-1]).astype(np.int32)
    return expected


def _expected_frames(root: Path, entry: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """DefaultImagePointDataset.get_data: the entry's images opened with PIL (RGB) and its correspondence files
    as float32 (defaults.py)."""
    colors = [np.asarray(Image.open(root / p).convert("RGB")) for p in entry["images"]]
    corrs = [np.load(root / p).astype(np.float32) for p in entry["correspondences"]]
    return colors, corrs


@pytest.mark.parametrize("name", list(FLAVORS))
def test_loader_yields_the_reference_arrays(roots, name):
    root = roots[name]
    entries = {
        k: v
        for split_file in sorted((root / "splits").glob("*.json"))
        for k, v in json.loads(split_file.read_text()).items()
    }
    samples = list_samples(root, sorted(p.stem for p in (root / "splits").glob("*.json")))
    assert [s.name for s in samples] == list(entries) and samples
    asset = flavor(name).label_asset
    for files in samples:
        labelled = files.split not in flavor(name).unlabelled_splits
        data = decode_record(read_sample(files, name), segment_asset=asset if labelled else None)
        expected = _expected_points(name, root / entries[files.name]["pointclouds"])
        for key, value in expected.items():
            assert data[key].dtype == value.dtype and np.array_equal(data[key], value), (files.name, key)
        assert (data["segment"] >= 0).any() == (labelled and asset is not None)
        colors, corrs = _expected_frames(root, entries[files.name])
        assert len(data["frames_color"]) == len(colors) > 0
        for ours, theirs in zip(data["frames_color"] + data["frames_correspondence"], colors + corrs):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def _frame_file(name: str, image_dir: Path, kind: str, stem: str, position: int) -> Path:
    """Where the flavour's preprocessing writes a frame's pose or intrinsic (preprocessing/concerto/<dataset>/)."""
    shared = {
        "scene": image_dir / "intrinsic" / "intrinsic.npy",
        "dataset": image_dir.parent.parent / "intrinsic" / "K.npy",
    }  # HM3D: ROOT/images/intrinsic/K.npy
    if kind == "intrinsic" and flavor(name).intrinsics in shared:
        return shared[flavor(name).intrinsics]
    if name in ("scannetpp", "s3dis"):  # numbered by the frame's position: preprocess_scannetpp/s3dis.py
        return image_dir / kind / f"{position}.npy"
    return image_dir / kind / f"{Path(stem).name}.npy"


@pytest.mark.parametrize("name", list(FLAVORS))
def test_each_frame_gets_its_own_pose_intrinsic_and_depth(roots, name):
    root = roots[name]
    for files in list_samples(root):
        record = read_sample(files, name)
        positions = {}
        for frame, frame_files in zip(record.frames, files.frames):
            color = frame_files.color
            image_dir = next(p for p in color.parents if p.name == "color").parent
            # the preprocessing's frame order: S3DIS by frame number, the others by name
            order = (lambda p: int(p.stem.split("_frame_")[1].split("_")[0])) if name == "s3dis" else (lambda p: p.stem)
            folder = positions.setdefault(color.parent, sorted(color.parent.iterdir(), key=order))
            position = folder.index(color)
            for kind in ("pose", "intrinsic"):
                assert getattr(frame, kind) == _frame_file(name, image_dir, kind, frame.name, position).read_bytes()
            assert frame.depth and np.asarray(Image.open(frame_files.depth)).dtype == np.uint16


def test_scannetpp_labels_are_column_0_of_three(roots):
    # Pointcept's ScanNet++ segment.npy / instance.npy are (N, 3); a flattened array gave points wrong labels.
    files = list_samples(roots["scannetpp"], ["train"])[0]
    raw = np.load(files.pointcloud_dir / "segment.npy")
    assert raw.shape[1] == 3 and (raw[:, 1] != -1).any()  # a second label on some points: the test can tell
    data = decode_record(read_sample(files, "scannetpp"), segment_asset="segment", with_frames=False)
    assert np.array_equal(data["segment"], raw[:, 0])
    assert np.array_equal(data["instance"], np.load(files.pointcloud_dir / "instance.npy")[:, 0])


def test_scannetpp_chunked_training_split(roots):
    # The ScanNet++ fine-tuning configs train on sampling_chunking_data.py's chunks of the train scenes.
    assert load_finetune_config("semseg-ptv3-large-v1m1-2c-scannetpp-ft").train_split == (SCANNETPP_CHUNK_SPLIT,)
    chunks = list_samples(roots["scannetpp"], [SCANNETPP_CHUNK_SPLIT])
    assert chunks
    for files in chunks:
        scene = roots["scannetpp"] / "train" / files.name.rsplit("_", 1)[0]
        data = decode_record(read_sample(files, "scannetpp"), segment_asset="segment", with_frames=False)
        index = {tuple(c): i for i, c in enumerate(np.load(scene / "coord.npy"))}
        rows = [index[tuple(c)] for c in np.load(files.pointcloud_dir / "coord.npy")]  # each a point of the scene
        assert np.array_equal(data["segment"], np.load(scene / "segment.npy")[rows, 0])
        extent = np.ptp(data["coord"][:, :2], axis=0)
        assert (extent < 6).all() and len(rows) >= _config("scannetpp").points_per_scene // 2


@pytest.mark.parametrize("shape, dtype", [((2,), "int16"), ((4,), "int16"), ((1, 1), "int16"), ((1,), "float32")])
def test_a_label_array_of_no_flavours_shape_names_the_file_and_field(roots, tmp_path, shape, dtype):
    root = tmp_path / "scannetpp"
    shutil.copytree(roots["scannetpp"], root)
    files = list_samples(root, ["train"])[0]
    n = len(np.load(files.pointcloud_dir / "coord.npy"))
    np.save(files.pointcloud_dir / "segment.npy", np.zeros((n, *shape), dtype=dtype))
    with pytest.raises(DataError, match=r"segment\.npy.*field 'segment'.*(shape|dtype)") as err:  # prepare validates
        read_sample(files, "scannetpp")
    assert err.value.file == f"{files.rel(files.pointcloud_dir)}/segment.npy"
    assert (f"{(n, *shape)}" if dtype == "int16" else "float32") in str(err.value)
    record = read_sample(files, "scannetpp", validate=False)  # and decoding a shard row checks again
    with pytest.raises(DataError) as err:
        decode_record(record, segment_asset="segment", with_frames=False)
    assert err.value.field == "segment" and err.value.file == f"{record.source}/segment.npy"


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("semseg-ptv3-*.yaml")))
def test_segmentation_configs_read_their_datasets_labels(roots, tmp_path, config):
    # The reference's ScanNet200Dataset reads segment200.npy; ours used segment20 for the scannet200 configs.
    dataset = load_finetune_config(config).dataset
    assert load_finetune_config(config).num_classes == flavor(dataset).num_classes
    run = load_finetune_run(
        config, {"data.shards": str(tmp_path), "run.name": "labels", "run.storage_path": str(tmp_path / "runs")}
    )
    assert run.data.segment_asset == label_asset(dataset) == flavor(dataset).label_asset
    files = list_samples(roots[dataset], [flavor(dataset).splits[0]])[0]
    data = decode_record(read_sample(files, dataset), segment_asset=run.data.segment_asset, with_frames=False)
    assert np.array_equal(data["segment"], _expected_points(dataset, files.pointcloud_dir)["segment"])


def test_scannet200_labels_differ_from_scannet20(roots):
    # Otherwise the config test above could not tell segment200 from segment20.
    cloud = list_samples(roots["scannet200"], ["train"])[0].pointcloud_dir
    assert not np.array_equal(np.load(cloud / "segment20.npy"), np.load(cloud / "segment200.npy"))


def test_unlabelled_splits_and_flavours_have_no_label_files(roots):
    for name, f in FLAVORS.items():
        for files in list_samples(roots[name]):
            has_labels = {p.stem for p in files.pointcloud_dir.glob("*.npy")} & {"segment", "segment20"}
            assert bool(has_labels) == (files.split not in f.unlabelled_splits), (name, files.name)


def test_plain_layout_of_nested_structured3d_rooms(roots, tmp_path):
    # Pointcept's Structured3D segmentation layout nests rooms in scenes: <split>/scene_*/room_*/ (structure3d.py).
    root = tmp_path / "s3d"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for scene in (roots["structured3d"] / split).iterdir():
            (root / split / scene.name).symlink_to(scene)
    names = [(s.split, s.name) for s in list_samples(root)]
    expected = sorted(
        (split, f"{scene.name}_{room.name}")
        for split in ("train", "val")
        for scene in (roots["structured3d"] / split).iterdir()
        for room in scene.iterdir()
    )
    assert sorted(names) == expected and names


def test_re10k_points_are_the_frames_pixels(roots):
    files = list_samples(roots["re10k"])[0]
    data = decode_record(read_sample(files, "re10k"))
    corr = np.concatenate(data["frames_correspondence"])
    assert np.array_equal(corr[:, 2], np.arange(len(data["coord"])))  # each point is one pixel of one frame
    pixels = np.concatenate(
        [
            image[c[:, 1].astype(int), c[:, 0].astype(int)]
            for image, c in zip(data["frames_color"], data["frames_correspondence"])
        ]
    )
    assert np.array_equal(pixels, data["color"])
    assert np.load(files.pointcloud_dir / "coord.npy").dtype == np.float64


@pytest.mark.skipif(not os.environ.get("POINTCEPT_SRC"), reason="set POINTCEPT_SRC to an extracted Pointcept tree")
def test_loader_matches_the_reference_classes(roots, tmp_path):
    for name, root in roots.items():
        result = subprocess.run(
            [sys.executable, __file__, os.environ["POINTCEPT_SRC"], str(root), name, str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr


REFERENCE_CLASSES = {
    "scannet": ("scannet", "ScanNetDataset"),
    "scannet200": ("scannet", "ScanNet200Dataset"),
    "scannetpp": ("scannetpp", "ScanNetPPDataset"),
    "s3dis": ("s3dis", "S3DISDataset"),
    "hm3d": ("hm3d", "HM3DDataset"),
    "structured3d": ("structure3d", "Structured3DDataset"),
}


def _compare_with_reference(checkout: Path, root: Path, name: str, scratch: Path) -> None:
    """Our loader beside Pointcept's classes on the same files: the segmentation class over the scene folders, and
    DefaultImagePointDataset (pre-training) over the split files, image and correspondence tensors included."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _reference_shim import _install_stand_ins, write_absolute_splits

    from concerto_ray.data.image_views import prepare_frames

    _install_stand_ins(checkout)
    defaults = importlib.import_module("pointcept.datasets.defaults")
    ours = {s.name: s for s in list_samples(root)}
    checked = 0
    if name in REFERENCE_CLASSES:
        module, cls = REFERENCE_CLASSES[name]
        reference = getattr(importlib.import_module(f"pointcept.datasets.{module}"), cls)(
            split=[s for s in flavor(name).splits if (root / s).is_dir()], data_root=str(root)
        )
        plain = {
            (s.split, s.name): s
            for s in list_samples(root, [p.name for p in root.iterdir() if p.name in flavor(name).splits])
        }
        for i in range(len(reference.data_list)):
            theirs = reference.get_data(i)
            folder = Path(reference.data_list[i])
            files = next(s for s in plain.values() if s.pointcloud_dir == folder)
            labelled = files.split not in flavor(name).unlabelled_splits
            data = decode_record(
                read_sample(files, name),
                segment_asset=flavor(name).label_asset if labelled else None,
                with_frames=False,
            )
            for key in ("coord", "color", "normal", "segment", "instance"):
                if key in theirs:
                    assert theirs[key].dtype == data[key].dtype and np.array_equal(theirs[key], data[key]), key
            print(
                f"{name}: {cls} {theirs['name']!r} (ours {files.name!r}) split {theirs.get('split')!r} "
                f"(ours {files.split!r}): equal"
            )
            checked += 1
    splits = write_absolute_splits(root, scratch)
    crop_h, crop_w, patch = 28, 42, 14
    reference = defaults.DefaultImagePointDataset(
        split=splits, data_root=str(scratch), crop_h=crop_h, crop_w=crop_w, patch_size=patch
    )
    for i in range(len(reference)):
        theirs = reference.get_data(i)
        data = decode_record(read_sample(ours[theirs["name"]], name))
        assert theirs["split"] == data["split"]
        for key in ("coord", "color", "normal"):
            assert theirs[key].dtype == data[key].dtype and np.array_equal(theirs[key], data[key]), key
        images, corr = prepare_frames(
            data["frames_color"],
            data["frames_correspondence"],
            len(data["coord"]),
            crop_h,
            crop_w,
            patch,
            sample=data["name"],
        )
        assert np.array_equal(corr, theirs["correspondence"])
        assert np.allclose(images, theirs["images"].numpy(), atol=1e-6)
        checked += 1
    print(f"{name}: DefaultImagePointDataset, {len(reference)} samples: equal")
    assert checked


if __name__ == "__main__":
    _compare_with_reference(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
