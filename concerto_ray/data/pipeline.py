"""The streaming input pipeline: shards -> Ray Data -> CPU transforms -> offset-batched tensors.

    ShardSampleDatasource (sources.py: one or more shard sets mixed as Pointcept's ConcatDataset, a uniform
    permutation of all their samples per epoch from the seed, each sample read alone, only the columns needed)
      -> flat_map(SampleTransform): decode + validate + Concerto / semseg transforms, in parallel Ray tasks
      -> [Ray Train] get_dataset_shard(...).iter_batches(collate_fn=...) on each worker, read ahead across epoch
         boundaries by EpochReadAhead

Every random draw of a sample (its augmentations, view crops) comes from a generator seeded by (seed, epoch, source,
sample, draw), so a run is reproduced by its seed. Ray Data does the streaming, parallelism and backpressure; this
module only says what to run on each sample.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from tqdm import tqdm

from concerto_ray.data.collate import collate_concerto, collate_semseg
from concerto_ray.data.presets import (
    ConcertoPretrainTransformConfig,
    SemsegTransformConfig,
    concerto_pretrain_transform,
    semseg_train_transform,
    semseg_val_transform,
)
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.sources import (
    DRAW_COLUMN,
    EPOCH_COLUMN,
    SOURCE_COLUMN,
    EpochPlan,
    Listing,
    ShardSampleDatasource,
    Source,
    SourceConfig,
    StreamPosition,
    check_shards,
    draw_rng,
    load_sources,
)
from concerto_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Mode = Literal["pretrain", "semseg_train", "semseg_val"]
SceneHook = Callable[[dict], dict]  # decoded scene -> decoded scene


@dataclass
class StreamConfig:
    # One source: `shards` (a local path or s3://bucket/prefix written by `concerto-ray prepare`) and its `splits`
    # (default: all). Several: `sources` instead, each with its own shards, splits and loop factor or weight.
    shards: str | None = None
    mode: Mode = "pretrain"
    splits: list[str] | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    # The folder or prefix that relative `sources[].shards` are in (one prepare per dataset under it).
    sources_root: str | None = None
    endpoint_url: str | None = None
    batch_size: int = 2  # samples per batch on each training worker
    # Batches a training worker holds ready, across epoch boundaries: enough steps to hide the start of the next
    # epoch's Ray Data execution (a few seconds) behind the end of the current one.
    read_ahead_batches: int = 4
    # Seed of the epoch order and of every augmentation; None: run.seed in training, 0 for `concerto-ray stream`.
    seed: int | None = None
    # Hand samples out exactly in the epoch's order (Ray Data's preserve_order), to the workers in turn: the same
    # seed gives every worker the same batches, and a resumed epoch reads on exactly where it stopped. Off, a sample
    # whose transform is slow does not hold up the ones behind it, but which samples a step gets (and what a resume
    # reads again or passes over) varies by the few samples in flight.
    preserve_order: bool = True
    skip_bad: bool = False  # skip (and count, and log) samples that fail to decode instead of failing the run
    # Check each shard's sha256 against the manifest before streaming, once per shard and machine (a shard is
    # hashed again when its modification time changes), so in-place corruption is a clear error naming the shard.
    verify_checksums: bool = True
    segment_asset: str | None = None  # label array for semseg ("segment20" for ScanNet); default: auto
    pretrain: ConcertoPretrainTransformConfig = field(default_factory=ConcertoPretrainTransformConfig)
    semseg: SemsegTransformConfig = field(default_factory=SemsegTransformConfig)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.read_ahead_batches < 1:
            raise ConfigError(f"read_ahead_batches must be >= 1, got {self.read_ahead_batches}")
        if (self.shards is None) == (not self.sources):
            raise ConfigError("give exactly one of shards (one source, with splits) and sources (several)")
        if self.sources and self.splits is not None:
            raise ConfigError("splits belong to each of the sources when sources are given")
        if self.sources_root is not None and not self.sources:
            raise ConfigError("sources_root only applies to sources")

    def source_configs(self) -> list[SourceConfig]:
        """The sources to mix, their shards relative to `sources_root` resolved; one `shards` folder is a source of
        loop 1."""
        if not self.sources:
            return [SourceConfig(shards=self.shards, splits=self.splits)]
        return [dataclasses.replace(s, shards=under_root(self.sources_root, s.shards)) for s in self.sources]

    def where(self) -> str:
        """Where the sources are configured, for error messages (`sources.field_name`)."""
        return "data.sources" if self.sources else "data"

    def listing(self) -> Listing:
        """Pre-training reads the split files' samples; segmentation one sample per scene folder."""
        return "samples" if self.mode == "pretrain" else "scenes"


def under_root(root: str | None, shards: str) -> str:
    """`shards` inside `root` unless it is a URI or an absolute path already."""
    if root is None or "://" in shards or posixpath.isabs(shards):
        return shards
    return posixpath.join(root.rstrip("/"), shards)


@ray.remote(num_cpus=0)
class BadSampleLog:
    """Collects the samples that were skipped, so that the run can report them (nothing vanishes silently)."""

    def __init__(self):
        self.errors: list[str] = []

    def add(self, message: str) -> None:
        self.errors.append(message)

    def get(self) -> list[str]:
        return list(self.errors)


class SampleTransform:
    """decode -> validate -> transform one shard row. Picklable; runs inside Ray Data tasks. `frames`: as
    `build_dataset`'s."""

    def __init__(self, config: StreamConfig, bad_log=None, scene_hook: SceneHook | None = None, *, frames: bool = True):
        self.mode = config.mode
        self.with_frames = config.mode == "pretrain" and frames
        self.scene_hook = scene_hook
        self.seed = 0 if config.seed is None else config.seed
        self.segment_asset = config.segment_asset
        self.bad_log = bad_log
        if config.mode == "pretrain":
            self.transform = concerto_pretrain_transform(config.pretrain, frames=frames)
        elif config.mode == "semseg_train":
            self.transform = semseg_train_transform(config.semseg)
        else:
            self.transform = semseg_val_transform(config.semseg)

    def rng(self, row: dict) -> np.random.Generator:
        """The sample's generator: the same in every run of a seed, new in every epoch and for every repeat, and
        one of its own for every sample (keyed by split and name: S3DIS rooms share names across areas)."""
        keys = (str(row[SOURCE_COLUMN]), str(row["split"]), str(row["name"]), int(row[DRAW_COLUMN]))
        return draw_rng(self.seed, int(row[EPOCH_COLUMN]), *keys)

    def __call__(self, row: dict) -> list[dict]:
        try:
            record = row_to_record(row)
            pretrain = self.mode == "pretrain"
            data = decode_record(
                record, segment_asset=self.segment_asset, with_frames=self.with_frames, require_labels=not pretrain
            )
            if self.scene_hook is not None:
                data = self.scene_hook(data)
            sample = self.transform(data, self.rng(row))
            if pretrain:  # which source a sample came from, counted per epoch (segmentation batches carry no names)
                sample[SOURCE_COLUMN] = str(row[SOURCE_COLUMN])
            return [sample]
        except DataError as exc:
            if self.bad_log is None:
                raise
            log.warning("skipping bad sample: %s", exc)
            # Waited for: calls from different processes reach an actor in no set order, and the driver's final
            # `get` must not overtake this one (a skipped sample would then vanish from the report).
            ray.get(self.bad_log.add.remote(str(exc)))
            return []


def stream_sources(config: StreamConfig, scenes: Collection[str] | None = None) -> list[Source]:
    """The config's sources with their samples (only those named in `scenes`, if given), manifests and shards
    checked (sizes; sha256 with `verify_checksums`)."""
    sources = load_sources(
        config.source_configs(),
        config.endpoint_url,
        where=config.where(),
        scenes=frozenset(scenes) if scenes is not None else None,
        listing=config.listing(),
    )
    check_shards(sources, config.verify_checksums)
    return sources


def samples_per_epoch(config: StreamConfig) -> dict[str, int]:
    """Samples each source contributes to every epoch (its samples times its loop factor, or its weighted share)."""
    sources = load_sources(config.source_configs(), config.endpoint_url, where=config.where(), listing=config.listing())
    return EpochPlan(sources, seed=0).counts()  # the counts do not depend on the seed


def build_dataset(
    config: StreamConfig,
    bad_log=None,
    *,
    scenes: Collection[str] | None = None,
    scene_hook: SceneHook | None = None,
    workers: int = 1,
    position: StreamPosition | None = None,
    frames: bool = True,
) -> ray.data.Dataset:
    """The lazily executed Ray dataset of transformed samples (one row per sample), in a new order every epoch.

    `scenes`: stream only the samples of these names (shards holding none of them are not read). `scene_hook`:
    applied to every decoded full-resolution scene before the transforms (fine-tuning limits the labelled points
    there). `workers`: every epoch is padded to a multiple of them (`EpochPlan`). `position`: a training stream's,
    which says the epoch each pass reads and where in it to start (`StreamPosition`); without it, epoch 0 whole.
    `frames`: pre-training samples bring their camera frames as image views (Concerto's 2D-3D term reads them);
    False for a model without that term: no frame is read or decoded, so samples without any stream too."""
    sources = stream_sources(config, scenes)
    seed = 0 if config.seed is None else config.seed
    counts = EpochPlan(sources, seed).counts()
    log.info("samples per epoch: %s", ", ".join(f"{name} {n}" for name, n in counts.items()))
    transform = SampleTransform(config, bad_log if config.skip_bad else None, scene_hook, frames=frames)
    ds = ray.data.read_datasource(
        ShardSampleDatasource(sources, seed, with_frames=transform.with_frames, workers=workers, position=position)
    )
    ds.context.execution_options.preserve_order = config.preserve_order
    return ds.flat_map(transform)


class KeepScenes:
    """Row filter on the sample name; picklable for Ray Data tasks."""

    def __init__(self, names: Collection[str]):
        self.names = frozenset(names)

    def __call__(self, row: dict) -> bool:
        return str(row["name"]) in self.names


class CollateColumns(NumpyBatchCollateFn):
    """Ray Data hands the worker a column dict; our collators want a list of per-sample dicts."""

    def __init__(self, mode: Mode):
        self.collate = collate_concerto if mode == "pretrain" else collate_semseg

    def __call__(self, columns: dict[str, np.ndarray]) -> dict:
        n = len(next(iter(columns.values())))
        return self.collate([{k: v[i] for k, v in columns.items()} for i in range(n)])


def iter_batches(iterator, config: StreamConfig, *, drop_last: bool = True) -> Iterator[dict]:
    """Collated batches from a Ray Data iterator (a `get_dataset_shard` shard or `Dataset.iterator()`)."""
    # iter_torch_batches runs the collate function in its prefetch threads, overlapping it with the step.
    return iterator.iter_torch_batches(
        batch_size=config.batch_size,
        collate_fn=CollateColumns(config.mode),
        drop_last=drop_last,
        prefetch_batches=2,
    )


def put_unless_stopped(target: queue.Queue, item, stop: threading.Event) -> bool:
    """Queue `item` for a consumer thread, waiting while the queue is full; False once `stop` says the consumer has
    gone away (a reader thread must not block forever on a queue nobody reads)."""
    while not stop.is_set():
        try:
            target.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class EpochReadAhead:
    """The batches of `epochs` consecutive epochs of a Ray Data iterator (a worker's `get_dataset_shard`), read by a
    background thread that stays up to `config.read_ahead_batches` batches ahead of training.

    Each pass over a dataset is a new Ray Data execution, whose first batch takes seconds (planning, file listing,
    first reads and transforms). Read from the training thread, every epoch's first step would wait for it; here the
    next epoch is requested as soon as this worker has received the last batch of the current one, and starts while
    training works through the batches in hand. Workers stay in step: a streaming split starts an epoch only once
    every worker has asked for it.

    Use as a context manager; call `next_epoch()` once per epoch. Batches an epoch's consumer leaves unread are
    dropped, as with a fresh iterator per epoch. Errors of the reader are raised in the consumer. `drop_last`: as
    `iter_batches`'s. `before_epoch(i)`, if given, runs in the reader before it asks for the i-th epoch (0-based):
    where the stream's position is set."""

    _END_OF_EPOCH = object()

    def __init__(
        self,
        iterator,
        config: StreamConfig,
        epochs: int,
        *,
        drop_last: bool = True,
        before_epoch: Callable[[int], None] | None = None,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=config.read_ahead_batches)
        self._stop = threading.Event()
        self._unfinished_epoch = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._read,
            args=(iterator, config, epochs, drop_last, before_epoch),
            daemon=True,
            name="epoch-read-ahead",
        )

    def __enter__(self) -> EpochReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a reader blocked on Ray is a daemon: it must not hold up an error

    def _read(self, iterator, config: StreamConfig, epochs: int, drop_last: bool, before_epoch) -> None:
        try:
            for epoch in range(epochs):
                if before_epoch is not None:
                    before_epoch(epoch)
                for batch in iter_batches(iterator, config, drop_last=drop_last):
                    if not self._put(batch):
                        return
                if not self._put(self._END_OF_EPOCH):
                    return
            self._put(RuntimeError(f"all {epochs} epochs have been read"))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)

    def _get(self):
        if self._error is not None:  # the reader has stopped: asking again must not wait forever
            raise self._error
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def next_epoch(self) -> Iterator[dict]:
        """The next epoch's batches."""
        if self._unfinished_epoch:
            while self._get() is not self._END_OF_EPOCH:
                pass
        self._unfinished_epoch = True
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator[dict]:
        while (batch := self._get()) is not self._END_OF_EPOCH:
            yield batch
        self._unfinished_epoch = False


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch's tensors to the training device (Ray moves only all-tensor batches itself)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class StreamStats:
    batches: int
    samples: int
    points: int  # points entering the model, summed over every view
    seconds: float
    first_batch_seconds: float  # start-up latency: planning, worker start, first shard reads and transforms
    first_batch_samples: int
    skipped: list[str]
    per_source: dict[str, int] = field(default_factory=dict)  # samples streamed from each source

    @property
    def steady_samples_per_s(self) -> float:
        """Throughput once the stream is flowing (after the first batch)."""
        seconds = self.seconds - self.first_batch_seconds
        return (self.samples - self.first_batch_samples) / seconds if seconds > 0 else float("nan")

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds else float("nan")
        lines = [
            f"streamed {self.samples} samples in {self.batches} batches, {self.points} points, "
            f"{self.seconds:.1f} s ({rate:.2f} samples/s; first batch after {self.first_batch_seconds:.1f} s, "
            f"{self.steady_samples_per_s:.2f} samples/s after it)"
        ]
        if len(self.per_source) > 1:
            lines.append("per source: " + ", ".join(f"{name} {n}" for name, n in self.per_source.items()))
        lines.append(f"skipped {len(self.skipped)} bad samples" if self.skipped else "no bad samples")
        lines.extend(f"  {msg}" for msg in self.skipped)
        return "\n".join(lines)


def batch_samples(batch: dict) -> int:
    """Samples in a collated batch: pre-training batches carry their names, segmentation batches their offsets."""
    return len(batch["name"]) if "name" in batch else len(batch["offset"])


def batch_points(batch: dict) -> int:
    """Points in a collated batch: the sum over its point sets (`coord`, or `global_coord` + `local_coord`)."""
    keys = [k for k in ("coord", "global_coord", "local_coord") if k in batch]
    return sum(int(batch[k].shape[0]) for k in keys)


def drain(config: StreamConfig, max_batches: int | None = None) -> StreamStats:
    """Run the pipeline on the driver for one epoch (or `max_batches`), counting what comes out."""
    bad_log = BadSampleLog.remote() if config.skip_bad else None
    dataset = build_dataset(config, bad_log)
    batches = samples = points = first_samples = 0
    per_source: Counter[str] = Counter()
    first_seconds = float("nan")
    start = time.perf_counter()
    with tqdm(desc="batches", unit="batch", total=max_batches) as bar:
        for batch in iter_batches(dataset.iterator(), config, drop_last=False):
            batches += 1
            samples += batch_samples(batch)
            per_source.update(batch.get(SOURCE_COLUMN, ()))
            points += batch_points(batch)
            if batches == 1:
                first_seconds, first_samples = time.perf_counter() - start, samples
            bar.update()
            if max_batches is not None and batches >= max_batches:
                break
    seconds = time.perf_counter() - start
    skipped = ray.get(bad_log.get.remote()) if bad_log is not None else []
    return StreamStats(batches, samples, points, seconds, first_seconds, first_samples, skipped, dict(per_source))
