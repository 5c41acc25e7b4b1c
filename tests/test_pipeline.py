"""The Ray Data stream: shards -> decode -> transforms -> collated batches, on a real local Ray."""

import hashlib
import io
import itertools
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from concerto_ray.data.pipeline import (
    EpochReadAhead,
    StreamConfig,
    build_dataset,
    drain,
    iter_batches,
    stream_sources,
)
from concerto_ray.data.presets import ConcertoPretrainTransformConfig
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.sources import EpochPlan, StreamPosition
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError

CROP = 42  # 3 x 3 patches of 14 pixels
TINY = ConcertoPretrainTransformConfig(crop_h=CROP, crop_w=CROP, max_size=4096, enc2d_max_size=4096)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "scenes"
    write_synthetic_dataset(
        root,
        SynthConfig(
            scenes=4,
            points_per_scene=3000,
            views_per_scene=4,
            image_width=64,
            image_height=48,
            splits={"train": 0.5, "val": 0.5},
        ),
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def shards(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "shards"
    prepare(scenes, str(out), progress=False)
    return out


def _batches(config):
    return list(iter_batches(build_dataset(config).iterator(), config, drop_last=False))


def test_pretrain_batches_are_offset_batched_views(ray_local, shards):
    config = StreamConfig(shards=str(shards), splits=["train"], batch_size=2, seed=0, pretrain=TINY)
    batches = _batches(config)
    expected = read_manifest(str(shards)).splits["train"].samples
    assert sum(len(b["name"]) for b in batches) == expected == 2
    for batch in batches:
        b = len(batch["name"])
        assert batch["global_offset"].shape == (2 * b,) and batch["local_offset"].shape == (4 * b,)
        assert int(batch["global_offset"][-1]) == batch["global_coord"].shape[0] == batch["global_feat"].shape[0]
        assert int(batch["local_offset"][-1]) == batch["local_coord"].shape[0]
        assert bool((batch["global_offset"].diff() > 0).all())
        assert batch["global_feat"].shape[1] == 9  # coord + color + normal
        assert batch["images"].shape == (int(batch["img_num"].sum()), 3, CROP, CROP)
        corr = batch["global_correspondence"]
        assert corr.shape[:2] == (batch["global_coord"].shape[0], int(batch["img_num"].max()))
        seen = corr[..., 0] >= 0
        assert seen.any(), "no point of the views sees any frame"
        assert float(corr[seen].max()) < CROP // 14 and float(corr[seen].min()) >= 0


def test_semseg_batches(ray_local, shards):
    config = StreamConfig(shards=str(shards), splits=["val"], mode="semseg_train", batch_size=2, seed=0)
    (batch,) = _batches(config)
    n = batch["coord"].shape[0]
    assert batch["feat"].shape == (n, 9) and batch["grid_coord"].shape == (n, 3)
    assert batch["segment"].shape == (n,) and int(batch["segment"].max()) < 20 and int(batch["segment"].min()) >= -1
    assert int(batch["offset"][-1]) == n and batch["offset"].shape == (2,)


def test_stream_from_s3(ray_local, s3_server, scenes):
    uri = f"s3://{s3_server.bucket}/pipeline"
    prepare(scenes, uri, endpoint_url=s3_server.endpoint_url, progress=False)
    stats = drain(StreamConfig(shards=uri, endpoint_url=s3_server.endpoint_url, batch_size=2, seed=0, pretrain=TINY))
    assert stats.samples == 4 and stats.batches == 2 and stats.points > 0 and stats.skipped == []


def _names(batches):
    return sorted(name for batch in batches for name in batch["name"])


def _every_sample(shards) -> list[str]:
    return sorted(
        name for split in read_manifest(str(shards)).splits.values() for shard in split.shards for name in shard.samples
    )


def test_epochs_are_read_ahead_across_their_boundaries(ray_local, shards):
    config = StreamConfig(shards=str(shards), batch_size=1, read_ahead_batches=3, pretrain=TINY)
    every_sample = _every_sample(shards)
    with EpochReadAhead(build_dataset(config).iterator(), config, epochs=3) as reader:
        assert _names(reader.next_epoch()) == every_sample
        # Without being asked, the reader has started the next epoch: its first batches wait, ready.
        for _ in range(600):
            if reader._queue.full():
                break
            time.sleep(0.1)
        assert reader._queue.qsize() == 3
        next(reader.next_epoch())  # one batch of the second epoch; the others are dropped
        assert _names(reader.next_epoch()) == every_sample
        with pytest.raises(RuntimeError, match="all 3 epochs have been read"):
            next(reader.next_epoch())


def test_read_ahead_keeps_streaming_split_workers_in_step(ray_local, shards):
    """Two workers of a streaming split (as Ray Train hands them out) read ahead at different paces, one leaving an
    epoch after its first batch; every epoch they read together still covers each sample once."""
    config = StreamConfig(shards=str(shards), batch_size=1, read_ahead_batches=2, pretrain=TINY)
    workers = build_dataset(config).streaming_split(2, equal=True)
    seen: list[list[tuple[int, str]]] = [[], []]  # (epoch, sample) each worker trained on
    errors: list[BaseException] = []

    def train(rank: int) -> None:
        try:
            with EpochReadAhead(workers[rank], config, epochs=3) as reader:
                for epoch in range(3):
                    batches = reader.next_epoch()
                    if rank == 1 and epoch == 1:
                        batches = itertools.islice(batches, 1)
                    for batch in batches:
                        seen[rank].append((epoch, batch["name"][0]))
                        time.sleep(0.5 if rank == 0 else 0.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(rank,), daemon=True) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a worker is stuck at the epoch barrier"
    assert errors == []
    for epoch in (0, 2):
        assert sorted(name for rank in (0, 1) for e, name in seen[rank] if e == epoch) == _every_sample(shards)
    assert len([name for e, name in seen[1] if e == 1]) == 1


def _corrupt_first_sample(shards, split="train"):
    """Put NaN coordinates into the first sample of a shard (as storage corruption would) and re-seal it."""
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = manifest["splits"][split]["shards"][0]
    path = shards / shard["path"]
    table = pq.read_table(path)
    rows = table.to_pylist()
    row = rows[0]
    i = row["point_asset_names"].index("coord")
    coord = np.load(io.BytesIO(row["point_asset_npy"][i]))
    coord[5] = np.nan
    buf = io.BytesIO()
    np.save(buf, coord)
    row["point_asset_npy"][i] = buf.getvalue()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    data = path.read_bytes()
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return row["name"]


def test_bad_sample_fails_or_is_skipped_and_counted(ray_local, scenes, tmp_path):
    out = tmp_path / "shards"
    prepare(scenes, str(out), progress=False)
    bad = _corrupt_first_sample(out)
    config = StreamConfig(shards=str(out), splits=["train"], batch_size=1, seed=0, pretrain=TINY)
    with pytest.raises(Exception) as err:
        drain(config)
    assert bad in str(err.value) and "NaN/inf coordinates" in str(err.value) and "coord.npy" in str(err.value)
    with pytest.raises(Exception) as err, EpochReadAhead(build_dataset(config).iterator(), config, 1) as reader:
        list(reader.next_epoch())  # the error of the reading thread is raised here
    assert bad in str(err.value) and "NaN/inf coordinates" in str(err.value)
    reader._thread.join(timeout=60)  # closing the Ray iterator it held can outlast the with block's 5 s on a busy
    assert not reader._thread.is_alive()  # machine; the reader must still stop by itself
    with pytest.raises(type(err.value)):
        reader.next_epoch()  # and again, instead of waiting for a reader that has stopped
    config.skip_bad = True
    stats = drain(config)
    assert stats.samples == 1 and len(stats.skipped) == 1
    assert bad in stats.skipped[0] and "NaN/inf" in stats.skipped[0]


def test_stream_config_is_validated():
    with pytest.raises(ValueError, match="batch_size"):
        StreamConfig(shards="x", batch_size=0)
    with pytest.raises(ValueError, match="read_ahead_batches must be >= 1, got 0"):
        StreamConfig(shards="x", read_ahead_batches=0)
    with pytest.raises(ConfigError, match="data.shards: .*no shard manifest"):
        build_dataset(StreamConfig(shards="/nonexistent/shards"))


def test_the_stream_follows_each_epochs_permutation(ray_local, shards):
    """Each pass over the dataset streams the epoch its position names, every sample once, in that epoch's order of
    the plan, from the first sample not yet consumed."""
    config = StreamConfig(shards=str(shards), batch_size=1, seed=5, pretrain=TINY)
    plan = EpochPlan(stream_sources(config), seed=5)
    orders = [[ref.name for ref, _ in plan.order(epoch)] for epoch in range(3)]
    assert len({tuple(order) for order in orders}) == 3
    position = StreamPosition()
    iterator = build_dataset(config, position=position).iterator()

    def read(epoch: int, consumed: int = 0) -> list[str]:
        position.set(epoch, consumed)
        return [b["name"][0] for b in iter_batches(iterator, config)]

    assert [read(epoch) for epoch in range(3)] == orders
    assert read(2, consumed=1) == orders[2][1:]  # a resumed epoch: on from its first unconsumed sample
    assert read(0) == orders[0]  # the position names the epoch, not the count of passes
