"""Shards: prepare -> manifest -> read_shards, for parquet and webdataset, local and on a moto S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from concerto_ray.data import storage
from concerto_ray.data.record import ARROW_SCHEMA
from concerto_ray.data.shards import DONE_SUFFIX, MANIFEST_NAME, SCENE_SHARDS, prepare, read_manifest, read_shards
from concerto_ray.errors import ConfigError, DataError

NUM_POINTS = 40
SCENES = {"train": ["scene0002_00", "scene0000_00", "scene0001_00"], "val": ["scene0100_00"]}
FRAMES = ["0", "20"]
WIDTH, HEIGHT = 8, 6


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_dataset(root: Path) -> Path:
    """A Pointcept-layout dataset: split files whose paths carry Pointcept's ``data/scannet`` prefix, point assets,
    and per frame color/depth/pose/correspondence plus a shared intrinsic. The last train scene has no depth."""
    rng = np.random.default_rng(0)
    for split, scenes in SCENES.items():
        entries = {}
        for scene in scenes:
            cloud = root / split / scene
            cloud.mkdir(parents=True)
            n = NUM_POINTS + len(entries)  # scenes differ in size
            (cloud / "coord.npy").write_bytes(_npy(rng.normal(size=(n, 3)).astype(np.float32)))
            (cloud / "color.npy").write_bytes(_npy(rng.integers(0, 255, (n, 3)).astype(np.uint8)))
            (cloud / "normal.npy").write_bytes(_npy(rng.normal(size=(n, 3)).astype(np.float32)))
            (cloud / "segment20.npy").write_bytes(_npy(rng.integers(-1, 20, n).astype(np.int16)))
            (cloud / "instance.npy").write_bytes(_npy(rng.integers(-1, 5, n).astype(np.int16)))
            images = root / "images" / split / scene
            for sub in ("color", "depth", "pose", "intrinsic", "correspondence"):
                (images / sub).mkdir(parents=True)
            (images / "intrinsic" / "intrinsic.npy").write_bytes(_npy(np.eye(4)))
            for frame in FRAMES:
                (images / "color" / f"{frame}.png").write_bytes(
                    _png(rng.integers(0, 255, (HEIGHT, WIDTH, 3)).astype(np.uint8))
                )
                if scene != scenes[-1] or split != "train":
                    (images / "depth" / f"{frame}.png").write_bytes(
                        _png(rng.integers(0, 4000, (HEIGHT, WIDTH)).astype(np.uint16))
                    )
                (images / "pose" / f"{frame}.npy").write_bytes(_npy(np.eye(4) + rng.normal(size=(4, 4)) * 0.01))
                corr = np.stack([rng.integers(0, WIDTH, 10), rng.integers(0, HEIGHT, 10), rng.integers(0, n, 10)], 1)
                (images / "correspondence" / f"{frame}.npy").write_bytes(_npy(corr.astype(np.float32)))
            prefix = f"data/scannet/images/{split}/{scene}"
            entries[scene] = {
                "pointclouds": f"data/scannet/{split}/{scene}",
                "images": [f"{prefix}/color/{f}.png" for f in FRAMES],
                "correspondences": [f"{prefix}/correspondence/{f}.npy" for f in FRAMES],
            }
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "scannet")


def _expected_files(root: Path, row: dict) -> dict[str, bytes]:
    """What each payload of a shard row must equal: the bytes of the file on disk (absent optional file: b"")."""
    cloud = root / row["source"]
    expected = {f"point {p.stem}": p.read_bytes() for p in cloud.glob("*.npy")}
    for i, (frame, color, corr) in enumerate(
        zip(row["frame_names"], row["frame_color_paths"], row["frame_correspondence_paths"])
    ):
        images = (root / color).parent.parent
        depth = images / "depth" / f"{frame}.png"
        expected[f"frame {i} color"] = (root / color).read_bytes()
        expected[f"frame {i} correspondence"] = (root / corr).read_bytes()
        expected[f"frame {i} depth"] = depth.read_bytes() if depth.exists() else b""
        expected[f"frame {i} pose"] = (images / "pose" / f"{frame}.npy").read_bytes()
        expected[f"frame {i} intrinsic"] = (images / "intrinsic" / "intrinsic.npy").read_bytes()
    return expected


def _payloads(row: dict) -> dict[str, bytes]:
    payloads = {f"point {n}": bytes(b) for n, b in zip(row["point_asset_names"], row["point_asset_npy"])}
    for key in ("color", "correspondence", "depth", "pose", "intrinsic"):
        payloads.update({f"frame {i} {key}": bytes(b) for i, b in enumerate(row[f"frame_{key}"])})
    return payloads


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_round_trip_is_byte_exact(dataset, tmp_path, s3_server, ray_local, fmt, where):
    if where == "s3":
        dest, endpoint = f"s3://{s3_server.bucket}/{fmt}-{uuid.uuid4().hex[:8]}", s3_server.endpoint_url
    else:
        dest, endpoint = str(tmp_path / "shards"), None
    manifest = prepare(dataset, dest, format=fmt, target_shard_mb=0.01, endpoint_url=endpoint, progress=False)
    assert manifest.splits["train"].samples == 3 and len(manifest.splits["train"].shards) > 1

    ds = read_shards(dest, endpoint_url=endpoint)
    assert ds.schema().names == ARROW_SCHEMA.names
    rows = ds.take_all()
    assert sorted((r["split"], r["name"]) for r in rows) == sorted(
        (split, scene) for split, scenes in SCENES.items() for scene in scenes
    )
    for row in rows:
        assert row["dataset"] == "scannet"
        assert list(row["frame_names"]) == FRAMES
        expected = _expected_files(dataset, row)
        assert _payloads(row) == expected, row["name"]
    no_depth = next(r for r in rows if r["name"] == SCENES["train"][-1])
    assert all(bytes(b) == b"" for b in no_depth["frame_depth"])
    assert [r["name"] for r in read_shards(dest, splits=["val"], endpoint_url=endpoint).take_all()] == SCENES["val"]


def test_manifest_records_counts_sizes_and_checksums(dataset, tmp_path):
    dest = tmp_path / "shards"
    manifest = prepare(dataset, str(dest), target_shard_mb=0.01, progress=False)
    assert manifest == read_manifest(dest)
    on_disk = json.loads((dest / MANIFEST_NAME).read_text())
    assert on_disk["format"] == "parquet" and on_disk["dataset"] == "scannet"
    assert manifest.source == str(dataset.resolve())
    for split, scenes in SCENES.items():
        info = manifest.splits[split]
        assert info.samples == len(scenes)
        assert [n for shard in info.shards for n in shard.samples] == sorted(scenes)
        for shard in info.shards:
            data = (dest / shard.path).read_bytes()
            assert shard.bytes == len(data)
            assert shard.sha256 == hashlib.sha256(data).hexdigest()
            assert shard.path.startswith(f"{split}/part-") and shard.path.endswith(".parquet")
            assert pq.read_table(dest / shard.path).column("name").to_pylist() == shard.samples
    for split, scenes in SCENES.items():  # the scene folders, for segmentation: in shards of their own
        info = manifest.scenes[split]
        assert [n for shard in info.shards for n in shard.samples] == sorted(scenes)
        assert all(shard.path.startswith(f"{SCENE_SHARDS}{split}/part-") for shard in info.shards)
    every = {s.path: s for listing in (manifest.splits, manifest.scenes) for i in listing.values() for s in i.shards}
    assert manifest.total_samples == sum(map(len, SCENES.values()))
    assert manifest.total_shards == len(every) > sum(len(s.shards) for s in manifest.splits.values())
    assert manifest.total_bytes == sum(s.bytes for s in every.values())
    assert manifest.skipped == []


def _sample_bytes(root: Path, split: str, scene: str) -> int:
    """On-disk size of a sample as stored in a shard: the shared intrinsic once per frame."""
    images = root / "images" / split / scene
    frames = [
        p
        for f in FRAMES
        for p in (
            images / "color" / f"{f}.png",
            images / "depth" / f"{f}.png",
            images / "pose" / f"{f}.npy",
            images / "correspondence" / f"{f}.npy",
            images / "intrinsic" / "intrinsic.npy",
        )
        if p.exists()
    ]
    return sum(p.stat().st_size for p in [*(root / split / scene).glob("*.npy"), *frames])


def test_target_shard_size_packs_greedily(dataset, tmp_path):
    one_each = prepare(dataset, str(tmp_path / "tiny"), target_shard_mb=1e-6, progress=False)
    assert [s.samples for s in one_each.splits["train"].shards] == [[n] for n in sorted(SCENES["train"])]

    sizes = {n: _sample_bytes(dataset, "train", n) for n in SCENES["train"]}
    target = max(sizes.values()) * 2 - 1  # never room for three samples, at most one pair fits
    packed = prepare(dataset, str(tmp_path / "packed"), target_shard_mb=target / 2**20, progress=False)
    groups = [s.samples for s in packed.splits["train"].shards]
    assert 1 < len(groups) < len(SCENES["train"])
    for group, following in zip(groups, groups[1:]):  # greedy: the next sample would not have fit
        assert sum(sizes[n] for n in group) <= target < sum(sizes[n] for n in group + following[:1])


def _age_all(dest: Path) -> None:
    for path in dest.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(10**18, 10**18))


def _touched(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and p.stat().st_mtime_ns != 10**18}


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_prepare_resumes_and_rerun_writes_nothing(dataset, tmp_path, fmt):
    dest = tmp_path / "shards"
    first = prepare(dataset, str(dest), format=fmt, target_shard_mb=1e-6, progress=False)
    shards = [s.path for s in first.splits["train"].shards]
    assert len(shards) == 3

    _age_all(dest)
    assert prepare(dataset, str(dest), format=fmt, target_shard_mb=1e-6, progress=False) == first
    assert _touched(dest) == set()

    (dest / shards[0]).unlink()  # interrupted before this shard was written ...
    (dest / (shards[0] + DONE_SUFFIX)).unlink()
    (dest / (shards[1] + DONE_SUFFIX)).unlink()  # ... and after this one was written but not marked finished
    assert prepare(dataset, str(dest), format=fmt, target_shard_mb=1e-6, progress=False) == first
    assert _touched(dest) == {shards[0], shards[0] + DONE_SUFFIX, shards[1], shards[1] + DONE_SUFFIX}


def _cloud(root: Path, scene: str = "scene0001_00") -> Path:
    return root / "train" / scene


def _save(path: Path, array: np.ndarray) -> None:
    path.write_bytes(_npy(array))


def _break_coord_nan(root):
    coord = np.load(_cloud(root) / "coord.npy")
    coord[3, 1] = np.nan
    _save(_cloud(root) / "coord.npy", coord)


def _break_zero_points(root):
    for path in _cloud(root).glob("*.npy"):
        array = np.load(path)
        _save(path, array[:0])


def _break_lengths(root):
    _save(_cloud(root) / "color.npy", np.load(_cloud(root) / "color.npy")[:-1])


def _break_corr_index(root):
    path = root / "images/train/scene0001_00/correspondence/20.npy"
    corr = np.load(path)
    corr[2, 2] = len(np.load(_cloud(root) / "coord.npy"))
    _save(path, corr)


BAD_INPUTS = {
    # case: (how to break scene0001_00, file named in the error, field named in the error)
    "missing coord.npy": (lambda r: (_cloud(r) / "coord.npy").unlink(), "train/scene0001_00", "coord"),
    "missing correspondence file": (
        lambda r: (r / "images/train/scene0001_00/correspondence/0.npy").unlink(),
        "splits/train.json",
        "correspondences",
    ),
    "malformed .npy": (
        lambda r: (_cloud(r) / "normal.npy").write_bytes(b"\x93NUMPY garbage"),
        "train/scene0001_00/normal.npy",
        None,
    ),
    "NaN coordinates": (_break_coord_nan, "train/scene0001_00/coord.npy", "coord"),
    "zero points": (_break_zero_points, "train/scene0001_00/coord.npy", "coord"),
    "mismatched lengths": (_break_lengths, "train/scene0001_00/color.npy", "color"),
    "correspondence index out of range": (
        _break_corr_index,
        "images/train/scene0001_00/correspondence/20.npy",
        "correspondence",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_sample_file_and_field(dataset, tmp_path, case):
    breaker, file, field = BAD_INPUTS[case]
    breaker(dataset)
    with pytest.raises(DataError) as err:
        prepare(dataset, str(tmp_path / "shards"), progress=False)
    assert err.value.sample == "scene0001_00"
    assert err.value.file.endswith(file)
    assert err.value.field == field
    assert "scene0001_00" in str(err.value) and file in str(err.value)
    assert not (tmp_path / "shards" / MANIFEST_NAME).exists()


def test_skip_bad_lists_the_bad_sample_and_writes_the_good_ones(dataset, tmp_path, caplog):
    _break_lengths(dataset)
    dest = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        manifest = prepare(dataset, str(dest), format="webdataset", skip_bad=True, progress=False)
    assert [(s.sample, s.split) for s in manifest.skipped] == [("scene0001_00", "train")]
    assert "color.npy" in manifest.skipped[0].error
    assert any("scene0001_00" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert manifest.splits["train"].samples == 2 and manifest.total_samples == 3
    written = [n for shard in manifest.splits["train"].shards for n in shard.samples]
    assert written == ["scene0000_00", "scene0002_00"]
    assert read_manifest(dest).skipped == manifest.skipped

    # A run that does not allow skipping must not accept the shard that left the sample out.
    with pytest.raises(DataError, match="scene0001_00"):
        prepare(dataset, str(dest), format="webdataset", progress=False)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_truncated_shard_is_named_at_read_time(dataset, tmp_path, fmt):
    dest = tmp_path / "shards"
    manifest = prepare(dataset, str(dest), format=fmt, progress=False)
    shard = dest / manifest.splits["train"].shards[0].path
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated") as err:
        read_shards(dest, verify=False)
    assert err.value.file == shard.as_posix()


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_corrupt_shard_fails_checksum_with_its_name(dataset, tmp_path, ray_local, fmt):
    dest = tmp_path / "shards"
    manifest = prepare(dataset, str(dest), format=fmt, progress=False)
    shard = dest / manifest.splits["val"].shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # same size, damaged middle
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256") as err:
        read_shards(dest)
    assert err.value.file == shard.as_posix()


def test_storage_resolves_s3_with_the_endpoint_from_the_environment(s3_server):
    location = storage.resolve(f"s3://{s3_server.bucket}/some/prefix/")  # endpoint from AWS_ENDPOINT_URL
    assert (location.root, location.uri) == (f"{s3_server.bucket}/some/prefix", f"s3://{s3_server.bucket}/some/prefix")
    location.write_bytes("a/b.bin", b"payload")
    assert location.read_bytes("a/b.bin") == b"payload" and location.exists("a/b.bin")
    assert location.uri_of_path(location.path("a/b.bin")) == f"s3://{s3_server.bucket}/some/prefix/a/b.bin"


@pytest.mark.parametrize("uri", ["s3:///no-bucket", "gs://bucket/prefix"])
def test_storage_rejects_unusable_uris(uri):
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        storage.resolve(uri)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(DataError, match="run prepare") as err:
        read_manifest(tmp_path)
    assert err.value.file == (tmp_path / MANIFEST_NAME).as_posix()


def test_prepare_of_more_splits_adds_them_and_another_dataset_is_refused(dataset, tmp_path):
    dest = tmp_path / "shards"
    train = prepare(dataset, str(dest), splits=["train"], progress=False)
    both = prepare(dataset, str(dest), splits=["val"], progress=False)
    assert list(both.splits) == ["train", "val"] and both.splits["train"] == train.splits["train"]
    assert both.total_samples == 4 and both.total_shards == 4 and read_manifest(dest) == both  # + scene shards
    with pytest.raises(ConfigError, match=f"{dest} already holds parquet shards of dataset 'scannet'") as err:
        prepare(dataset, str(dest), dataset_name="s3dis", progress=False)
    assert f"{dest}/s3dis" in str(err.value) and read_manifest(dest) == both
    with pytest.raises(ConfigError, match="already holds parquet shards"):
        prepare(dataset, str(dest), format="webdataset", progress=False)
