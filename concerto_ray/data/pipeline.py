"""The streaming input pipeline: shards -> Ray Data -> CPU transforms -> offset-batched tensors.

    read_shards (parquet / webdataset, local or S3, file order reshuffled every epoch)
      -> flat_map(SampleTransform): decode + validate + Concerto / semseg transforms, in parallel Ray tasks
      -> [Ray Train] get_dataset_shard(...).iter_batches(collate_fn=...) on each worker, read ahead across epoch
         boundaries by EpochReadAhead

Ray Data does the streaming, parallelism and backpressure; this module only says what to run on each sample.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from collections.abc import Callable, Collection
from typing import Iterator, Literal

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
from concerto_ray.data.shards import read_shards
from concerto_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Mode = Literal["pretrain", "semseg_train", "semseg_val"]
SceneHook = Callable[[dict], dict]  # decoded scene -> decoded scene


@dataclass
class StreamConfig:
    shards: str  # local path or s3://bucket/prefix written by `concerto-ray prepare`
    mode: Mode = "pretrain"
    splits: list[str] | None = None
    endpoint_url: str | None = None
    batch_size: int = 2  # samples per batch on each training worker
    shuffle_buffer: int = 8  # samples; shuffles across shard boundaries on top of the per-epoch file shuffle
    # Batches a training worker holds ready, across epoch boundaries: enough steps to hide the start of the next
    # epoch's Ray Data execution (a few seconds) behind the end of the current one.
    read_ahead_batches: int = 4
    # None: fresh augmentations every epoch (training). An int fixes each sample's augmentations by its name, the same
    # in every epoch and run: for debugging and benchmarks, not for training.
    seed: int | None = None
    skip_bad: bool = False  # skip (and count, and log) samples that fail to decode instead of failing the run
    # Check every shard's sha256 against the manifest before streaming: one extra read of the data per run, which
    # turns in-place corruption into a clear error naming the shard. Turn off for very large datasets.
    verify_checksums: bool = True
    segment_asset: str | None = None  # label array for semseg ("segment20" for ScanNet); default: auto
    pretrain: ConcertoPretrainTransformConfig = field(default_factory=ConcertoPretrainTransformConfig)
    semseg: SemsegTransformConfig = field(default_factory=SemsegTransformConfig)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.read_ahead_batches < 1:
            raise ConfigError(f"read_ahead_batches must be >= 1, got {self.read_ahead_batches}")


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
    """decode -> validate -> transform one shard row. Picklable; runs inside Ray Data tasks."""

    def __init__(self, config: StreamConfig, bad_log=None, scene_hook: SceneHook | None = None):
        self.mode = config.mode
        self.scene_hook = scene_hook
        self.seed = config.seed
        self.segment_asset = config.segment_asset
        self.bad_log = bad_log
        if config.mode == "pretrain":
            self.transform = concerto_pretrain_transform(config.pretrain)
        elif config.mode == "semseg_train":
            self.transform = semseg_train_transform(config.semseg)
        else:
            self.transform = semseg_val_transform(config.semseg)

    def rng(self, name: str) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()  # fresh OS entropy: new augmentations every epoch
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def __call__(self, row: dict) -> list[dict]:
        name = str(row.get("name", "?"))
        try:
            record = row_to_record(row)
            pretrain = self.mode == "pretrain"
            data = decode_record(record, segment_asset=self.segment_asset, with_frames=pretrain,
                                 require_labels=not pretrain)
            if self.scene_hook is not None:
                data = self.scene_hook(data)
            return [self.transform(data, self.rng(name))]
        except DataError as exc:
            if self.bad_log is None:
                raise
            log.warning("skipping bad sample: %s", exc)
            self.bad_log.add.remote(str(exc))
            return []


def build_dataset(config: StreamConfig, bad_log=None, *, scenes: Collection[str] | None = None,
                  scene_hook: SceneHook | None = None) -> ray.data.Dataset:
    """The lazily executed Ray dataset of transformed samples (one row per sample).

    `scenes`: stream only the samples of these names. `scene_hook`: applied to every decoded full-resolution
    scene before the transforms (fine-tuning limits the labelled points there)."""
    ds = read_shards(config.shards, splits=config.splits, endpoint_url=config.endpoint_url,
                     verify=config.verify_checksums, shuffle=ray.data.FileShuffleConfig(seed=config.seed))
    if scenes is not None:
        ds = ds.filter(KeepScenes(scenes))
    return ds.flat_map(SampleTransform(config, bad_log if config.skip_bad else None, scene_hook))


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
        local_shuffle_buffer_size=config.shuffle_buffer or None,
        local_shuffle_seed=config.seed,
        drop_last=drop_last,
        prefetch_batches=2,
    )


class EpochReadAhead:
    """The batches of `epochs` consecutive epochs of a Ray Data iterator (a worker's `get_dataset_shard`), read by a
    background thread that stays up to `config.read_ahead_batches` batches ahead of training.

    Each pass over a dataset is a new Ray Data execution, whose first batch takes seconds (planning, file listing,
    first reads and transforms). Read from the training thread, every epoch's first step would wait for it; here the
    next epoch is requested as soon as this worker has received the last batch of the current one, and starts while
    training works through the batches in hand. Workers stay in step: a streaming split starts an epoch only once
    every worker has asked for it.

    Use as a context manager; call `next_epoch()` once per epoch. Batches an epoch's consumer leaves unread are
    dropped, as with a fresh iterator per epoch. Errors of the reader are raised in the consumer."""

    _END_OF_EPOCH = object()

    def __init__(self, iterator, config: StreamConfig, epochs: int):
        self._queue: queue.Queue = queue.Queue(maxsize=config.read_ahead_batches)
        self._stop = threading.Event()
        self._unfinished_epoch = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(iterator, config, epochs), daemon=True,
                                        name="epoch-read-ahead")

    def __enter__(self) -> "EpochReadAhead":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a reader blocked on Ray is a daemon: it must not hold up an error

    def _read(self, iterator, config: StreamConfig, epochs: int) -> None:
        try:
            for _ in range(epochs):
                for batch in iter_batches(iterator, config):
                    if not self._put(batch):
                        return
                if not self._put(self._END_OF_EPOCH):
                    return
            self._put(RuntimeError(f"all {epochs} epochs have been read"))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue `item`; False once the consumer has gone away."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

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

    @property
    def steady_samples_per_s(self) -> float:
        """Throughput once the stream is flowing (after the first batch)."""
        seconds = self.seconds - self.first_batch_seconds
        return (self.samples - self.first_batch_samples) / seconds if seconds > 0 else float("nan")

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds else float("nan")
        lines = [f"streamed {self.samples} samples in {self.batches} batches, {self.points} points, "
                 f"{self.seconds:.1f} s ({rate:.2f} samples/s; first batch after {self.first_batch_seconds:.1f} s, "
                 f"{self.steady_samples_per_s:.2f} samples/s after it)"]
        lines.append(f"skipped {len(self.skipped)} bad samples" if self.skipped else "no bad samples")
        lines.extend(f"  {msg}" for msg in self.skipped)
        return "\n".join(lines)


def batch_points(batch: dict) -> int:
    """Points in a collated batch: the sum over its point sets (`coord`, or `global_coord` + `local_coord`)."""
    keys = [k for k in ("coord", "global_coord", "local_coord") if k in batch]
    return sum(int(batch[k].shape[0]) for k in keys)


def drain(config: StreamConfig, max_batches: int | None = None) -> StreamStats:
    """Run the pipeline on the driver for one epoch (or `max_batches`), counting what comes out."""
    bad_log = BadSampleLog.remote() if config.skip_bad else None
    dataset = build_dataset(config, bad_log)
    batches = samples = points = first_samples = 0
    first_seconds = float("nan")
    start = time.perf_counter()
    with tqdm(desc="batches", unit="batch", total=max_batches) as bar:
        for batch in iter_batches(dataset.iterator(), config, drop_last=False):
            batches += 1
            samples += len(batch["name"])
            points += batch_points(batch)
            if batches == 1:
                first_seconds, first_samples = time.perf_counter() - start, samples
            bar.update()
            if max_batches is not None and batches >= max_batches:
                break
    seconds = time.perf_counter() - start
    skipped = ray.get(bad_log.get.remote()) if bad_log is not None else []
    return StreamStats(batches, samples, points, seconds, first_seconds, first_samples, skipped)
