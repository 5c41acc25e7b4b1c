"""Object-store files and folders fetched once per node into its cache; head-local paths refused on a cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import pytest

from concerto_ray import node_cache
from concerto_ray.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def weights_in_s3(s3_server):
    """A weights folder (two files, one in a subfolder) and a single file in the test bucket."""
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    files = {
        "weights/dinov2/config.json": b'{"hidden_size": 32}',
        "weights/dinov2/sub/model.bin": bytes(range(256)) * 64,
        "lists/scenes.txt": b"scene0000_00\nscene0001_00\n",
    }
    for key, body in files.items():
        s3.put_object(Bucket=s3_server.bucket, Key=key, Body=body)
    return f"s3://{s3_server.bucket}", files


def test_an_s3_folder_and_file_are_copied_into_the_node_cache(cache, weights_in_s3):
    bucket, files = weights_in_s3
    folder = node_cache.local_copy(f"{bucket}/weights/dinov2")
    assert folder.parent == cache and folder.is_dir()
    assert (folder / "config.json").read_bytes() == files["weights/dinov2/config.json"]
    assert (folder / "sub" / "model.bin").read_bytes() == files["weights/dinov2/sub/model.bin"]
    single = node_cache.local_copy(f"{bucket}/lists/scenes.txt")
    assert single.read_bytes() == files["lists/scenes.txt"]
    assert node_cache.local_copy(f"{bucket}/weights/dinov2") == folder  # found again, not fetched again
    with pytest.raises(ConfigError, match=r"model.weights: nothing found at s3://concerto-test/weights/missing"):
        node_cache.local_copy(f"{bucket}/weights/missing", field="model.weights")


def test_concurrent_workers_of_a_node_download_once(cache, weights_in_s3, monkeypatch):
    bucket, files = weights_in_s3
    downloads = []
    real_download = node_cache._download

    def slow_download(*args):
        downloads.append(args[0].uri)
        time.sleep(0.5)  # the other workers arrive while this one is still downloading
        real_download(*args)

    monkeypatch.setattr(node_cache, "_download", slow_download)
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(node_cache.local_copy(f"{bucket}/weights/dinov2")))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert downloads == [f"{bucket}/weights/dinov2"]
    assert len(results) == 4 and len(set(results)) == 1
    assert (results[0] / "sub" / "model.bin").read_bytes() == files["weights/dinov2/sub/model.bin"]


def test_a_download_that_died_half_way_is_redone(cache, weights_in_s3):
    bucket, files = weights_in_s3
    first = node_cache.local_copy(f"{bucket}/lists/scenes.txt")
    first.rename(first.with_name(first.name + ".partial"))  # as if the process died before its rename
    assert node_cache.local_copy(f"{bucket}/lists/scenes.txt").read_bytes() == files["lists/scenes.txt"]


def test_local_paths_are_refused_on_a_cluster(tmp_path):
    assert node_cache.local_copy(str(tmp_path)) == tmp_path  # local paths and hub names are left to the caller
    assert node_cache.local_copy("facebook/dinov2-with-registers-small") == Path("facebook/dinov2-with-registers-small")
    node_cache.check_reachable("pretrained.path", str(tmp_path))  # one node: no Ray, or the tests' local Ray
    node_cache.check_reachable("pretrained.path", "s3://bucket/model.pth", nodes=3)
    with pytest.raises(ConfigError, match=r"pretrained.path: .* this Ray cluster has 3 nodes and .* \(s3://"):
        node_cache.check_reachable("pretrained.path", str(tmp_path), nodes=3)


def test_every_path_field_of_a_config_is_checked(tmp_path):
    config = {
        "model": {"name": "tiny-concerto", "image_encoder_weights": "facebook/dinov2-with-registers-small"},
        "data": {"shards": "s3://bucket/shards", "sources": [{"shards": "s3://bucket/other"}]},
        "run": {"name": "r", "storage_path": "s3://bucket/runs"},
        "pretrained": {"path": "s3://bucket/runs/r/step-00000004"},
        "efficiency": {"label_file": None},
        "mlflow": {"tracking_uri": "http://mlflow.internal:5000"},
    }
    node_cache.check_config_reachable(config, nodes=3)  # URIs and a hub name: fine on any cluster
    local = {"data": {"sources": [{"shards": "s3://bucket/a"}, {"shards": str(tmp_path / "shards")}]}}
    node_cache.check_config_reachable(local, nodes=1)
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].shards: .* 3 nodes"):
        node_cache.check_config_reachable(local, nodes=3)
    for field, value in (
        ("run.storage_path", str(tmp_path / "runs")),
        ("pretrained.path", "/checkpoints/m.pth"),
        ("model.image_encoder_weights", str(tmp_path)),
        ("efficiency.label_file", "/lists/la.pth"),
        ("data.sources_root", str(tmp_path / "shards")),  # PPT's sources under it
        ("ppt.clip_model", str(tmp_path)),
        ("mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"),
    ):
        section, key = field.rsplit(".", 1)
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            node_cache.check_config_reachable({**config, section: {**config.get(section, {}), key: value}}, nodes=2)


def test_workers_load_dinov2_weights_and_scene_lists_from_s3(cache, weights_in_s3, dinov2_dir, s3_server):
    """The load sites read through the node cache: the image encoder from an s3:// folder, a scene list file."""
    import dataclasses

    import torch

    from concerto_ray.finetune.data_efficiency import load_scene_list
    from concerto_ray.model.configs import get_model_config
    from concerto_ray.model.image_encoder import load_image_encoder

    bucket, _ = weights_in_s3
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    for file in dinov2_dir.iterdir():
        s3.upload_file(str(file), s3_server.bucket, f"weights/dinov2-tiny/{file.name}")
    encoder = get_model_config("tiny-concerto").image_encoder
    from_s3 = load_image_encoder(dataclasses.replace(encoder, weights=f"{bucket}/weights/dinov2-tiny"))
    from_disk = load_image_encoder(dataclasses.replace(encoder, weights=str(dinov2_dir)))
    for (name, ours), (_, theirs) in zip(from_s3.state_dict().items(), from_disk.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert load_scene_list(f"{bucket}/lists/scenes.txt") == ["scene0000_00", "scene0001_00"]
