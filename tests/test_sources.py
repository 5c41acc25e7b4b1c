"""Sources of a stream: the per-epoch order, the multi-source mix, the paper configs' mixes, reading less."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from concerto_ray.config import from_dict
from concerto_ray.data.pipeline import StreamConfig
from concerto_ray.data.record import FRAME_FILES
from concerto_ray.data.shards import VerifiedShards, prepare
from concerto_ray.data.sources import (
    FRAME_COLUMNS,
    EpochPlan,
    SampleRef,
    Source,
    SourceConfig,
    load_sources,
    read_sample_row,
)
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.train.config import keeps_short_batch, load_pretrain_config, steps_per_epoch

REPO = Path(__file__).resolve().parents[1]
FRAME_PAYLOADS = [f"frame_{k}" for k in FRAME_FILES]


def fake_source(name: str, samples: list[str], index: int = 0, loop: int = 1, weight: float | None = None) -> Source:
    """A source as the plan sees it (names and places only), without shards behind it."""
    refs = [SampleRef(index, f"train/part-{i // 4:05d}.parquet", i % 4, s) for i, s in enumerate(samples)]
    return Source(name, None, "parquet", refs, [], loop, weight)


def rooms(count: int, scans: int = 3) -> list[str]:
    """ScanNet's naming: scene<room>_<scan>, several scans of one room, sorted as shards hold them."""
    return [f"scene{room:04d}_{scan:02d}" for room in range(count) for scan in range(scans)]


def test_every_epoch_is_a_fresh_uniform_permutation_of_all_scenes():
    plan = EpochPlan([fake_source("scannet", rooms(20))], seed=0)
    orders = [[ref.name for ref, _ in plan.order(epoch)] for epoch in range(50)]
    assert all(sorted(order) == rooms(20) for order in orders)
    assert orders[0] == [ref.name for ref, _ in EpochPlan([fake_source("scannet", rooms(20))], 0).order(0)]
    assert len({tuple(order) for order in orders}) == 50
    assert orders[0] != [ref.name for ref, _ in EpochPlan([fake_source("scannet", rooms(20))], 1).order(0)]
    # Batches of 4 of 60 scans (20 rooms x 3): a uniform permutation puts two scans of one room into a batch with
    # probability 1 - (57/59)(54/58)(51/57) = 0.195; name order (or a small buffer over it) almost always does.
    batches = [order[i : i + 4] for order in orders for i in range(0, 60, 4)]
    shared = sum(max(Counter(name[:9] for name in batch).values()) > 1 for batch in batches) / len(batches)
    assert shared < 0.3
    # Every position is uniform: the first batch of an epoch is not biased towards the first shard's scenes.
    first_rooms = Counter(int(name[5:9]) for order in orders for name in order[:4])
    assert len(first_rooms) >= 15


def test_sources_mix_as_concat_dataset_with_loop_factors():
    a, b = fake_source("a", ["a0", "a1", "a2"], 0, loop=2), fake_source("b", ["b0", "b1"], 1)
    plan = EpochPlan([a, b], seed=3)
    assert plan.counts() == {"a": 6, "b": 2} and plan.epoch_size() == 8
    order = plan.order(0)
    assert sorted((ref.name, draw) for ref, draw in order) == sorted(
        [(f"a{i}", d) for i in range(3) for d in (0, 1)] + [("b0", 0), ("b1", 0)]
    )
    # the two sources are interleaved, not one after the other
    sources = [ref.source for ref, _ in order]
    assert sum(x != y for x, y in itertools.pairwise(sources)) > 1


def test_weights_set_each_sources_share_of_an_epoch():
    a = fake_source("a", [f"a{i}" for i in range(5)], 0, weight=3.0)
    b = fake_source("b", [f"b{i}" for i in range(5)], 1, weight=1.0)
    plan = EpochPlan([a, b], seed=0)
    assert plan.counts() == {"a": 8, "b": 2} and plan.epoch_size() == 10
    drawn = Counter(ref.name[0] for ref, _ in plan.order(4))
    assert drawn == {"a": 8, "b": 2}
    # a's five samples all come once, then three of them a second time
    assert sorted(Counter(ref.name for ref, _ in plan.order(4) if ref.name[0] == "a").values()) == [1, 1, 2, 2, 2]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two small synthetic datasets prepared into one bucket, each under its own prefix, small shards."""
    root = tmp_path_factory.mktemp("sources")
    for name, scenes in (("scannet", 6), ("s3dis", 2)):
        write_synthetic_dataset(
            root / name,
            SynthConfig(
                scenes=scenes,
                points_per_scene=600,
                views_per_scene=2,
                image_width=32,
                image_height=24,
                splits={"train": 0.5, "val": 0.5},
            ),
            progress=False,
        )
        prepare(root / name, str(root / "bucket" / name), target_shard_mb=1e-6, progress=False)
    return root / "bucket"


def test_a_source_with_missing_splits_or_bad_weights_is_a_config_error(two_datasets):
    good = SourceConfig(shards=str(two_datasets / "scannet"), splits=["train"])
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.splits: 'Area_1' is not in the manifest"):
        load_sources([good, SourceConfig(shards=str(two_datasets / "s3dis"), splits=["train", "Area_1"])])
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.shards: .*no shard manifest"):
        load_sources([good, SourceConfig(shards=str(two_datasets / "hm3d"))])
    with pytest.raises(ConfigError, match=r"data\.sources: the weights \[0\.0, 0\.0\] must sum to a positive"):
        load_sources([SourceConfig(shards=good.shards, weight=0.0), SourceConfig(shards=good.shards, weight=0.0)])
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight: give every source a weight"):
        load_sources([SourceConfig(shards=good.shards, weight=1.0), SourceConfig(shards=good.shards)])
    with pytest.raises(ConfigError, match=r"two sources are named 'scannet'"):
        load_sources([good, SourceConfig(shards=good.shards, splits=["val"])])
    with pytest.raises(ConfigError, match=r"data\.splits: 'test' is not in the manifest"):
        load_sources(StreamConfig(shards=good.shards, splits=["test"]).source_configs(), where="data")
    with pytest.raises(ConfigError, match="loop"):
        from_dict(StreamConfig, {"sources": [{"shards": good.shards, "loop": 0}]})
    with pytest.raises(ConfigError, match="exactly one of shards .* and sources"):
        from_dict(StreamConfig, {"shards": good.shards, "sources": [{"shards": good.shards}]})


def test_selected_scenes_read_only_their_shards(two_datasets, ray_local, tmp_path):
    config = SourceConfig(shards=str(two_datasets / "scannet"), splits=["train"])
    (all_scenes,) = load_sources([config])
    assert len(all_scenes.shards) == len(all_scenes.samples) == 3  # one sample per shard here
    (one,) = load_sources([config], scenes=frozenset([all_scenes.samples[1].name]))
    assert [ref.name for ref in one.samples] == [all_scenes.samples[1].name]
    assert [shard.path for shard in one.shards] == [all_scenes.samples[1].shard]

    # Checksums: hashed once per shard and machine; a shard changed in place is hashed (and caught) again.
    markers = VerifiedShards(tmp_path / "markers")
    assert markers.verify(one.location, one.shards, [_info(one, s.path) for s in one.shards]) == one.shards
    assert markers.verify(one.location, one.shards, [_info(one, s.path) for s in one.shards]) == []
    path = Path(one.location.path(one.shards[0].path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256") as err:
        markers.verify(one.location, one.shards, [_info(one, s.path) for s in one.shards])
    assert err.value.file == path.as_posix()


def _info(source: Source, shard: str):
    return source.location.filesystem.get_file_info(source.location.path(shard))


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_segmentation_reads_no_camera_frames(tmp_path):
    # frames of a realistic size (several 320 x 240 images per scene), which dominate a sample's bytes
    write_synthetic_dataset(
        tmp_path / "scenes",
        SynthConfig(scenes=1, points_per_scene=2000, views_per_scene=6, splits={"train": 1.0}),
        progress=False,
    )
    prepare(tmp_path / "scenes", str(tmp_path / "shards"), progress=False)
    (source,) = load_sources([SourceConfig(shards=str(tmp_path / "shards"))])
    ref = source.samples[0]
    before = _bytes_read()
    full = read_sample_row(source.location, "parquet", ref, with_frames=True)
    full_bytes, before = _bytes_read() - before, _bytes_read()
    points = read_sample_row(source.location, "parquet", ref, with_frames=False)
    points_bytes = _bytes_read() - before
    assert full["frame_color"] and all(points[c] == [] for c in FRAME_COLUMNS)
    assert points["point_asset_npy"] == full["point_asset_npy"] and points["name"] == ref.name
    point_payload = sum(map(len, full["point_asset_npy"]))
    frame_payload = sum(len(blob) for column in FRAME_PAYLOADS for blob in full[column])
    assert full_bytes >= point_payload + frame_payload
    assert points_bytes < full_bytes - 0.8 * frame_payload  # the frames' column chunks were not read


def test_webdataset_samples_are_read_alone(two_datasets, tmp_path):
    scenes = two_datasets.parent / "scannet"
    prepare(scenes, str(tmp_path / "wds"), format="webdataset", target_shard_mb=1.0, progress=False)
    (tar,) = load_sources([SourceConfig(shards=str(tmp_path / "wds"))])
    (parquet,) = load_sources([SourceConfig(shards=str(two_datasets / "scannet"))])
    by_name = {ref.name: ref for ref in parquet.samples}
    for ref in tar.samples:
        assert read_sample_row(tar.location, "webdataset", ref, True) == read_sample_row(
            parquet.location, "parquet", by_name[ref.name], True
        )


def test_prepare_of_another_dataset_into_the_same_folder_is_refused(two_datasets):
    with pytest.raises(ConfigError, match="already holds parquet shards of dataset 'scannet'.*/scannet/s3dis"):
        prepare(two_datasets.parent / "s3dis", str(two_datasets / "scannet"), progress=False)


PAPER_MIX = {  # Pointcept's configs/concerto/pretrain-concerto-v1m1-*.py: ConcatDataset entries, all loop=1
    "arkitscenes": ["Training", "Validation"],
    "scannet": ["train", "val", "test"],
    "scannetpp": ["train", "val", "test"],
    "s3dis": ["Area_1", "Area_2", "Area_3", "Area_4", "Area_5", "Area_6"],
    "hm3d": ["train", "val"],
    "structured3d": ["train", "val"],
}


@pytest.mark.parametrize(
    "config, video",
    [
        ("pretrain-concerto-v1m1-0-base", False),
        ("pretrain-concerto-v1m1-1-large-base", False),
        ("pretrain-concerto-v1m1-2-large-video", True),
    ],
)
def test_paper_configs_mix_the_references_datasets(config, video):
    path = REPO / "configs" / f"{config}.yaml"
    data = from_dict(StreamConfig, yaml.safe_load(path.read_text())["data"])
    expected = {**PAPER_MIX, **({"re10k": ["train", "test"]} if video else {})}
    assert {s.name: s.splits for s in data.sources} == expected
    assert all(s.loop == 1 and s.weight is None for s in data.sources)
    data.sources_root = "s3://bucket/concerto"
    assert [s.shards for s in data.source_configs()] == [f"s3://bucket/concerto/{name}" for name in expected]
    with pytest.raises(ConfigError, match="data.sources_root is still the placeholder"):
        load_pretrain_config(path)


@pytest.mark.parametrize(
    "samples, workers, batch", [(13, 4, 2), (10, 4, 1), (3, 2, 1), (25, 8, 3), (12, 4, 3), (7, 4, 2), (3, 2, 4)]
)
def test_epochs_are_padded_and_stepped_as_the_reference_sampler_does(monkeypatch, samples, workers, batch):
    # Pointcept: DistributedSampler pads the epoch to a multiple of the workers with its first indices, and each
    # worker's DataLoader drops its last partial batch when the epoch is larger than the global batch:
    # floor(ceil(L / W) / b) steps (floor(floor(L / W) / b) before, one step fewer for 13 / 4 / 2 and 10 / 4 / 1),
    # else one short step (refused before, 7 / 4 / 2 and 3 / 2 / 4).
    plan = EpochPlan([fake_source("s", rooms(samples, 1))], seed=0, workers=workers)
    order = [ref.name for ref, _ in plan.order(0)]
    assert len(order) % workers == 0 and order[samples:] == order[: len(order) - samples]
    sampler = DistributedSampler(range(samples), workers, 0)
    loader = DataLoader(range(samples), batch, sampler=sampler, drop_last=samples > batch * workers)
    monkeypatch.setattr("concerto_ray.train.config._train_samples", lambda config: samples)
    config = SimpleNamespace(
        run=SimpleNamespace(num_workers=workers),
        data=SimpleNamespace(batch_size=batch),
        optim=SimpleNamespace(grad_accumulation=1),
    )
    assert steps_per_epoch(config) == len(loader) >= 1
    assert keeps_short_batch(config) == (not loader.drop_last and len(sampler) < batch)
