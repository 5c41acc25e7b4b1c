"""What an epoch reads: the samples of one or more shard sets, in a fresh uniform order per epoch.

Several sources (datasets, each written by `concerto-ray prepare` to its own folder or prefix) are mixed as
Pointcept's ConcatDataset mixes its datasets: each source's samples of the chosen splits, repeated `loop` times, form
one list, and the sampler draws a uniform permutation of the whole list every epoch. `weight` instead fixes the share
of each source in an epoch of the same total size.

The permutation, and every augmentation of a sample, derive from (seed, epoch, sample) only. Samples are read one by
one straight from their shard (one parquet row group, or one webdataset sample's tar members), so an epoch reads only
the samples it uses and, for segmentation, only the columns it needs.
"""

from __future__ import annotations

import functools
import math
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from concerto_ray.data import storage
from concerto_ray.data.record import ARROW_SCHEMA
from concerto_ray.data.shards import (
    ShardInfo,
    VerifiedShards,
    check_sizes,
    load_manifest,
    webdataset_sample_to_row,
)
from concerto_ray.errors import ConfigError, DataError, TrainingError

# Columns a sample needs without its camera frames (segmentation); frame columns are then handed on empty.
POINT_COLUMNS = ("name", "split", "dataset", "source", "point_asset_names", "point_asset_npy")
FRAME_COLUMNS = tuple(c for c in ARROW_SCHEMA.names if c not in POINT_COLUMNS)
# Columns the sampler adds to every row: which source, which epoch, and which repeat of the sample in the epoch.
SOURCE_COLUMN, EPOCH_COLUMN, DRAW_COLUMN = "stream_source", "epoch", "draw"
# Which samples of a manifest a stream reads: pre-training's, or one per scene folder (segmentation, embed).
Listing = Literal["samples", "scenes"]
# Samples per Ray Data read task: few, so that reads run in parallel and the output stays close to the plan's order.
SAMPLES_PER_READ_TASK = 2


@dataclass
class SourceConfig:
    """One shard set of a (multi-source) stream."""

    shards: str  # local path or s3://bucket/prefix written by `concerto-ray prepare`
    splits: list[str] | None = None  # None: every split of the manifest
    name: str | None = None  # label in logs and metrics; default: the manifest's dataset name
    loop: int = 1  # the reference's loop factor: the source's samples appear this many times per epoch
    weight: float | None = None  # instead of loop: this source's share of every epoch (relative to the others)

    def __post_init__(self):
        if self.loop < 1:
            raise ValueError(f"loop must be >= 1, got {self.loop}")
        if self.weight is not None and (self.weight < 0 or not math.isfinite(self.weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
        if self.splits is not None and not self.splits:
            raise ValueError("splits must name at least one split (or be left out for all of them)")


class SampleRef(NamedTuple):
    """Where one sample lives: its source (index), its shard (path below the source folder) and row in the shard."""

    source: int
    shard: str
    row: int
    name: str


@dataclass
class Source:
    """A source as the stream reads it: its folder, format and the samples it contributes."""

    name: str
    location: storage.Location
    format: str
    samples: list[SampleRef]
    shards: list[ShardInfo]  # the shards that hold the samples: no other shard is read
    loop: int
    weight: float | None


def field_name(where: str, index: int, name: str) -> str:
    """A source's config field in messages: `data.sources[2].splits` for listed sources, `data.splits` for the
    single-source form (`where` is then the section, "data")."""
    return f"{where}[{index}].{name}" if where.endswith("sources") else f"{where}.{name}"


def check_sources(sources: list[SourceConfig], where: str = "data.sources") -> None:
    """Checks across sources that need no manifest: names are unique, weights are all set or all unset and have a
    positive sum."""
    if not sources:
        raise ConfigError(f"{where}: list at least one source")
    weights = [s.weight for s in sources]
    if any(w is not None for w in weights):
        unset = [i for i, w in enumerate(weights) if w is None]
        if unset:
            raise ConfigError(
                f"{field_name(where, unset[0], 'weight')}: give every source a weight, or none (then loop applies)"
            )
        if any(s.loop != 1 for s in sources):
            raise ConfigError(f"{where}: use either weight or loop, not both")
        if not sum(weights) > 0:
            raise ConfigError(f"{where}: the weights {weights} must sum to a positive number")


def load_sources(
    configs: list[SourceConfig],
    endpoint_url: str | None = None,
    *,
    where: str = "data.sources",
    scenes: frozenset[str] | None = None,
    listing: Listing = "samples",
) -> list[Source]:
    """Read each source's manifest and list its samples: pre-training's ("samples") or one per scene folder
    ("scenes", for segmentation; see `shards.Manifest`). `scenes` keeps only samples of these names (the shards
    holding none of them are never opened). Errors name the source's config field."""
    check_sources(configs, where)
    sources = []
    for i, config in enumerate(configs):
        location = storage.resolve(config.shards, endpoint_url)
        try:
            manifest = load_manifest(location)
        except DataError as exc:
            raise ConfigError(f"{field_name(where, i, 'shards')}: {exc}") from exc
        try:
            by_split = manifest.splits if listing == "samples" else manifest.scene_splits(location.uri)
        except DataError as exc:
            raise ConfigError(f"{field_name(where, i, 'shards')}: {exc}") from exc
        splits = list(config.splits) if config.splits else list(by_split)
        missing = [s for s in splits if s not in by_split]
        if missing:
            kind = "" if listing == "samples" else " scene folders"
            raise ConfigError(
                f"{field_name(where, i, 'splits')}: {missing[0]!r} is not in the{kind} manifest of "
                f"{location.uri} (it has: {', '.join(by_split)})"
            )
        shards = [shard for split in splits for shard in by_split[split].shards]
        refs = [
            SampleRef(i, shard.path, row, name)
            for shard in shards
            for row, name in enumerate(shard.samples)
            if scenes is None or name in scenes
        ]
        used = {ref.shard for ref in refs}
        sources.append(
            Source(
                config.name or manifest.dataset,
                location,
                manifest.format,
                refs,
                [shard for shard in shards if shard.path in used],
                config.loop,
                config.weight,
            )
        )
    names = [s.name for s in sources]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{where}: two sources are named {duplicate!r}; give them distinct `name`s")
    if not any(s.samples for s in sources):
        raise ConfigError(f"{where}: the sources hold no samples" + (" of the selected scenes" if scenes else ""))
    if sources[0].weight is not None and not sum(s.weight for s in sources if s.samples) > 0:
        raise ConfigError(f"{where}: the weights of the sources that hold samples must sum to a positive number")
    return sources


def check_shards(sources: list[Source], verify: bool) -> None:
    """Each used shard has its manifest size; with `verify`, its sha256 too (once per shard and machine)."""
    for source in sources:
        infos = check_sizes(source.location, source.shards)
        if verify:
            VerifiedShards().verify(source.location, source.shards, infos)


def padding(samples: int, workers: int) -> int:
    """Samples repeated so that `workers` get ceil(samples / workers) each."""
    return -samples % workers


def draw_rng(seed: int, epoch: int, *keys: int | str) -> np.random.Generator:
    """The generator of one random draw, from the run's seed, the epoch and what is drawn for (names hashed)."""
    return np.random.default_rng([seed, epoch, *(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)])


class EpochPlan:
    """Which samples an epoch holds, in which order: a pure function of (sources, seed, epoch).

    With `workers`, the order is padded to a multiple of them by repeating its first samples, as torch's
    DistributedSampler pads (Pointcept's training sampler): every worker gets ceil(epoch size / workers)."""

    def __init__(self, sources: list[Source], seed: int, workers: int = 1):
        self.sources = sources
        self.seed = seed
        self.workers = workers

    def epoch_size(self) -> int:
        """Samples per epoch: with loop factors, each source's samples times its loop; with weights, as many as
        the sources hold together."""
        if self.sources[0].weight is None:
            return sum(len(s.samples) * s.loop for s in self.sources)
        return sum(len(s.samples) for s in self.sources)

    def counts(self) -> dict[str, int]:
        """Samples per source in every epoch."""
        if self.sources[0].weight is None:
            return {s.name: len(s.samples) * s.loop for s in self.sources}
        total = self.epoch_size()
        weights = np.array([s.weight if s.samples else 0.0 for s in self.sources])
        shares = weights / weights.sum() * total
        counts = np.floor(shares).astype(int)
        # the rounding remainder goes to the largest fractional parts, so that the counts sum to the epoch size
        for i in np.argsort(counts - shares)[: total - counts.sum()]:
            counts[i] += 1
        return {s.name: int(c) for s, c in zip(self.sources, counts)}

    def order(self, epoch: int) -> list[tuple[SampleRef, int]]:
        """(sample, draw) in the order epoch `epoch` reads them; `draw` counts the sample's repeats in the epoch."""
        entries: list[tuple[SampleRef, int]] = []
        for i, (source, count) in enumerate(zip(self.sources, self.counts().values())):
            if not source.samples:
                continue
            # A weighted source draws `count` samples: whole passes over its samples, then a random part of one.
            rng = draw_rng(self.seed, epoch, "source", i)
            passes, rest = divmod(count, len(source.samples))
            entries += [(ref, draw) for draw in range(passes) for ref in source.samples]
            entries += [(source.samples[j], passes) for j in sorted(rng.permutation(len(source.samples))[:rest])]
        permutation = draw_rng(self.seed, epoch, "order").permutation(len(entries))
        order = [entries[j] for j in permutation]
        return order + order[: padding(len(order), self.workers)]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class _PositionActor:
    def __init__(self):
        # Epoch 0 from its start until told otherwise (Ray Data also plans once when the dataset is created); a
        # restarted actor knows nothing until the next `set`.
        reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.at: tuple[int, int] | None = None if reconstructed else (0, 0)

    def set(self, epoch: int, consumed: int) -> None:
        self.at = (epoch, consumed)

    def get(self) -> tuple[int, int] | None:
        return self.at


class StreamPosition:
    """Where a training stream stands: the epoch Ray Data plans next, and how many of its samples (in the plan's
    order) training has consumed already. The run's rank-0 worker sets it from the run's own progress before it asks
    for each epoch; the datasource reads it when Ray Data plans that epoch, which a streaming split does only once
    every worker has asked. The checkpoint is the truth: the actor only carries it to the planner (on the driver's
    node where it can be, restarted anywhere if that node goes).

    Picklable: the datasource and the workers hold the same actor."""

    def __init__(self):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._actor = _PositionActor.options(scheduling_strategy=here).remote()

    def set(self, epoch: int, consumed: int = 0) -> None:
        ray.get(self._actor.set.remote(epoch, consumed))

    def get(self) -> tuple[int, int]:
        at = ray.get(self._actor.get.remote())
        if at is None:  # the actor was restarted between the set and this plan: fail (and restart), never guess
            raise TrainingError("the stream's position was lost before Ray Data planned the epoch")
        return at


class ShardSampleDatasource(Datasource):
    """Ray Data source of an epoch's samples in the plan's order, one row each: the columns of `ARROW_SCHEMA`
    (frame columns empty unless `with_frames`) plus the source name, the epoch and the draw.

    Ray Data plans each pass over a dataset anew (one pass per epoch in training). With a `position`, the pass reads
    the epoch it names, from its first sample not yet consumed: a resumed epoch reads on where it stopped, in the
    order the uninterrupted run reads. Without one (a single pass: `concerto-ray stream`, evaluation), epoch 0."""

    def __init__(
        self,
        sources: list[Source],
        seed: int,
        *,
        with_frames: bool,
        workers: int = 1,
        position: StreamPosition | None = None,
    ):
        self.plan = EpochPlan(sources, seed, workers)
        self.with_frames = with_frames
        self.position = position

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "ShardSamples"

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        epoch, consumed = (0, 0) if self.position is None else self.position.get()
        order = self.plan.order(epoch)[consumed:]
        # what a task needs of the sources (not their sample lists, which every task would otherwise carry)
        places = [SourcePlace(s.name, s.location, s.format) for s in self.plan.sources]
        tasks = []
        for start in range(0, len(order), SAMPLES_PER_READ_TASK):
            chunk = order[start : start + SAMPLES_PER_READ_TASK]
            read = functools.partial(_read_samples, places, chunk, epoch, self.with_frames)
            tasks.append(
                ReadTask(
                    read,
                    BlockMetadata(num_rows=len(chunk), size_bytes=None, input_files=None, exec_stats=None),
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


class SourcePlace(NamedTuple):
    name: str
    location: storage.Location
    format: str


def _read_samples(
    sources: list[SourcePlace], chunk: list[tuple[SampleRef, int]], epoch: int, with_frames: bool
) -> Iterator[pa.Table]:
    """One block per sample, in `chunk`'s order."""
    for ref, draw in chunk:
        source = sources[ref.source]
        row = read_sample_row(source.location, source.format, ref, with_frames)
        row.update({SOURCE_COLUMN: source.name, EPOCH_COLUMN: epoch, DRAW_COLUMN: draw})
        yield pa.Table.from_pylist([row])


def read_sample_row(location: storage.Location, format: str, ref: SampleRef, with_frames: bool) -> dict:
    """The shard row of one sample, reading only its row group (parquet) or its members (webdataset)."""
    path = location.path(ref.shard)
    if format == "parquet":
        row = _read_parquet_row(location.filesystem, path, ref.row, with_frames)
    else:
        row = _read_webdataset_row(location, path, ref.row)
    if row.get("name") != ref.name:
        raise DataError(
            f"row {ref.row} holds sample {row.get('name')!r}, not {ref.name!r} as the manifest says; "
            "the shard does not belong to this manifest",
            file=location.uri_of(ref.shard),
        )
    if not with_frames:
        row.update({column: [] for column in FRAME_COLUMNS})
    return row


def _read_parquet_row(filesystem: pafs.FileSystem, path: str, row: int, with_frames: bool) -> dict:
    with filesystem.open_input_file(path) as file:
        parquet = pq.ParquetFile(file)
        first = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row < first + rows:
                columns = None if with_frames else list(POINT_COLUMNS)
                table = parquet.read_row_group(group, columns=columns)
                return table.slice(row - first, 1).to_pylist()[0]
            first += rows
    raise DataError(f"the shard has {first} rows, fewer than the manifest lists", file=path)


def _read_webdataset_row(location: storage.Location, path: str, row: int) -> dict:
    """Sample `row` of a tar shard: its members are found through the tar headers, seeking over other members."""
    key = f"{row:06d}"
    members: dict[str, bytes] = {"__url__": path, "__key__": key}
    with location.filesystem.open_input_file(path) as file, tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            stem, _, suffix = member.name.partition(".")
            if stem == key:
                members[suffix] = tar.extractfile(member).read()
            elif members.keys() - {"__url__", "__key__"}:
                break  # past the sample: members of one sample are consecutive
    return webdataset_sample_to_row(members, location)
