"""Pointcept-layout dataset -> parquet or webdataset shards (local or S3) + manifest, and back as a Ray dataset.

Writing (`prepare`): samples are sorted per split and packed greedily into shards by their on-disk size. Each shard
gets a ``<shard>.done.json`` sidecar once it is complete, keyed by a fingerprint of its plan, so an interrupted run
resumes where it stopped and a finished one writes nothing. ``manifest.json`` at the destination lists every shard
with its sample names, size and sha256. A destination holds one dataset: a later prepare of other splits of it adds
them to the manifest; another dataset there is refused (each source of a mix gets its own folder or prefix).

Shard formats, both holding exactly the columns of `record.ARROW_SCHEMA` per sample:

* parquet: one row per sample, one row group per sample (a reader fetches one sample's chosen columns alone).
* webdataset: a plain tar; sample ``K`` (its position in the shard, so keys never contain dots) is the members
  ``K.meta.json`` (the string columns), ``K.point.<asset>.npy`` (one per point asset) and ``K.frame<i>.<file>``
  (one per frame file: color, depth, pose, intrinsic, correspondence; empty when the file is absent).

Reading (`read_shards`, and `sources.py` per sample) checks the shards against the manifest first (size always,
sha256 with ``verify``, once per shard and machine), so that a damaged shard fails with its URI named instead of as
an error deep inside a Ray read task.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from concerto_ray.config import from_dict, to_dict
from concerto_ray.data import storage
from concerto_ray.data.layout import SampleFiles, available_splits, list_samples, list_scenes, read_sample
from concerto_ray.data.record import ARROW_SCHEMA, FRAME_FILES, SCHEMA_VERSION, SceneRecord, record_to_row
from concerto_ray.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Shards of the scene folders of splits whose samples are split-file entries: SCENE_SHARDS<split>/part-*.
SCENE_SHARDS = "scene-folders/"
TASKS_FOLDER = "tasks"
DONE_SUFFIX = ".done.json"
SHARD_EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}
# Part of every shard's fingerprint: shards written before parquet got one row group per sample are written again.
_WRITER_LAYOUT = "row-group-per-sample"
ShardFormat = Literal["parquet", "webdataset"]

# Columns that travel in a webdataset sample's meta.json; the rest are binary payloads, one member each.
_META_COLUMNS = (
    "name",
    "split",
    "dataset",
    "source",
    "point_asset_names",
    "frame_names",
    "frame_color_paths",
    "frame_correspondence_paths",
)


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    samples: list[str]
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    samples: int
    shards: list[ShardInfo]


@dataclass
class SkippedSample:
    sample: str
    split: str
    error: str


@dataclass
class Manifest:
    schema_version: int
    format: ShardFormat
    dataset: str
    source: str
    splits: dict[str, SplitInfo]  # pre-training's samples (`layout.list_samples`)
    total_samples: int
    total_shards: int
    total_bytes: int
    skipped: list[SkippedSample] = field(default_factory=list)
    # Segmentation's and embed's samples, one per scene folder (`layout.list_scenes`): shards of their own where
    # the split's samples are split-file entries, else the split's shards. None in manifests written before.
    scenes: dict[str, SplitInfo] | None = None
    # Files of the root's tasks/ folder (Pointcept's data-efficiency la/lr files), copied beside the manifest.
    task_files: list[str] = field(default_factory=list)

    def scene_splits(self, uri: str) -> dict[str, SplitInfo]:
        if self.scenes is None:
            raise DataError(
                "these shards were written before prepare listed the scene folders that segmentation and embed "
                "read; run `concerto-ray prepare` again (finished shards are kept)",
                file=uri,
            )
        return self.scenes

    def frameless_splits(self) -> list[str]:
        """The splits whose pre-training samples hold no camera frames: those without split file, whose samples are
        their scene folders (the same shards serve both listings). None in manifests written before `scenes`."""
        return [name for name, info in self.splits.items() if info.samples and (self.scenes or {}).get(name) == info]

    def summary(self) -> str:
        lines = [
            f"{self.total_samples} samples in {self.total_shards} {self.format} shards "
            f"({self.total_bytes / 2**20:.1f} MiB) of dataset {self.dataset!r}"
        ]
        lines += [f"  {name}: {info.samples} samples, {len(info.shards)} shards" for name, info in self.splits.items()]
        for name, info in (self.scenes or {}).items():
            if info != self.splits.get(name):
                lines.append(f"  {name} scene folders (segmentation, embed): {info.samples} scenes")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} bad samples:")
            lines += [f"  {s.sample}: {s.error}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class ShardPlan:
    split: str
    path: str
    samples: list[SampleFiles]
    fingerprint: str  # changes whenever the shard's content would


@dataclass
class _ShardDone:
    """The sidecar written after a shard is complete."""

    fingerprint: str
    shard: ShardInfo
    skipped: list[SkippedSample]


# ---------------------------------------------------------------------------------------------------- writing


def prepare(
    src: str | Path,
    dest: str | Path,
    *,
    format: ShardFormat = "parquet",
    splits: list[str] | None = None,
    dataset_name: str | None = None,
    target_shard_mb: float = 256,
    workers: int | None = None,
    skip_bad: bool = False,
    endpoint_url: str | None = None,
    progress: bool = True,
) -> Manifest:
    """Write the samples of `splits` under `src` as shards to `dest` (a folder or s3://bucket/prefix)."""
    if format not in SHARD_EXTENSIONS:
        raise ConfigError(f"shard format {format!r} is not one of {', '.join(SHARD_EXTENSIONS)}")
    if target_shard_mb <= 0:
        raise ConfigError(f"target_shard_mb must be positive, got {target_shard_mb}")
    src = Path(src).resolve()
    out = storage.resolve(dest, endpoint_url)
    dataset = dataset_name or src.name
    previous = _previous_manifest(out, format, dataset)
    samples = list_samples(src, splits, dataset)
    split_names = list(splits) if splits else available_splits(src)
    # Splits whose samples are split-file entries also get their scene folders written, for segmentation.
    scene_splits = [s for s in split_names if (src / "splits" / f"{s}.json").is_file() and (src / s).is_dir()]
    target = int(target_shard_mb * 2**20)
    plans = plan_shards(samples, format, dataset, target)
    plans += plan_shards(list_scenes(src, scene_splits, dataset), format, dataset, target, prefix=SCENE_SHARDS)
    done = _write_all(plans, out, format, dataset, skip_bad, workers or os.cpu_count() or 1, progress)
    # Splits without split files are their scene folders: the same shards serve both listings.
    plain_splits = [s for s in split_names if s not in scene_splits and (src / s).is_dir()]
    task_files = _copy_task_files(src, out)
    manifest = _manifest(split_names, scene_splits, plain_splits, format, dataset, str(src), done, previous, task_files)
    text = json.dumps(to_dict(manifest), indent=1) + "\n"
    # Leaving an identical manifest untouched keeps a rerun of a finished prepare free of writes.
    if not out.exists(MANIFEST_NAME) or out.read_bytes(MANIFEST_NAME).decode() != text:
        out.write_bytes(MANIFEST_NAME, text.encode())
    return manifest


def plan_shards(
    samples: list[SampleFiles], format: ShardFormat, dataset: str, target_bytes: int, prefix: str = ""
) -> list[ShardPlan]:
    """Pack each split's samples, sorted by name, into consecutive shards of at most `target_bytes` on disk, under
    `<prefix><split>/`.

    A sample larger than the target gets a shard of its own. Only file sizes are read.
    """
    by_split: dict[str, list[SampleFiles]] = {}
    for sample in samples:
        by_split.setdefault(sample.split, []).append(sample)
    plans = []
    for split, members in by_split.items():
        groups: list[list[tuple[SampleFiles, int]]] = [[]]
        filled = 0
        for sample in sorted(members, key=lambda s: s.name):
            size = _disk_size(sample)
            if groups[-1] and filled + size > target_bytes:
                groups.append([])
                filled = 0
            groups[-1].append((sample, size))
            filled += size
        for i, group in enumerate(groups):
            path = f"{prefix}{split}/part-{i:05d}.{SHARD_EXTENSIONS[format]}"
            key = json.dumps(
                [SCHEMA_VERSION, _WRITER_LAYOUT, format, dataset, path, [(s.name, size) for s, size in group]]
            )
            plans.append(ShardPlan(split, path, [s for s, _ in group], hashlib.sha256(key.encode()).hexdigest()))
    return plans


def _disk_size(sample: SampleFiles) -> int:
    frame_files = [p for f in sample.frames for p in (f.color, f.correspondence, f.depth, f.pose, f.intrinsic) if p]
    # A file that vanished counts as empty here; reading the sample reports it by name.
    return sum(p.stat().st_size for p in [*sample.pointcloud_dir.glob("*.npy"), *frame_files] if p.is_file())


def _write_all(
    plans: list[ShardPlan],
    out: storage.Location,
    format: ShardFormat,
    dataset: str,
    skip_bad: bool,
    workers: int,
    progress: bool,
) -> list[_ShardDone]:
    """Write every unfinished shard on a thread pool (the work is file and network I/O and arrow/zlib code)."""
    total = sum(len(p.samples) for p in plans)
    lock = threading.Lock()
    with tqdm(total=total, desc=f"prepare {format}", unit="sample", disable=not progress) as bar:

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_prepare_shard, p, out, format, dataset, skip_bad, advance) for p in plans]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in finished and f.exception()), None)
            if failed is not None:
                pool.shutdown(cancel_futures=True)  # shards in progress still finish and stay valid
                raise failed.exception()
    return [f.result() for f in futures]


def _prepare_shard(
    plan: ShardPlan,
    out: storage.Location,
    format: ShardFormat,
    dataset: str,
    skip_bad: bool,
    advance: Callable[[int], None],
) -> _ShardDone:
    previous = _finished_shard(plan, out, skip_bad)
    if previous is not None:
        logger.info("shard %s is already complete", out.uri_of(plan.path))
        advance(len(plan.samples))
        return previous
    written, skipped = [], []
    out.make_parent(plan.path)
    with out.filesystem.open_output_stream(out.path(plan.path)) as stream:
        sink = _HashingSink(stream)
        writer = _ParquetShardWriter(sink) if format == "parquet" else _TarShardWriter(sink)
        # Closed (footer / end-of-archive written) also after an error, before the stream under it closes; the
        # shard has no sidecar then, so the next run writes it again.
        with contextlib.closing(writer):
            for files in plan.samples:
                try:
                    record = read_sample(files, dataset)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    logger.warning("skipping bad sample: %s", exc)
                    skipped.append(SkippedSample(files.name, files.split, str(exc)))
                else:
                    writer.add(record)
                    written.append(files.name)
                advance(1)
    done = _ShardDone(plan.fingerprint, ShardInfo(plan.path, written, sink.size, sink.sha256.hexdigest()), skipped)
    out.write_bytes(plan.path + DONE_SUFFIX, json.dumps(to_dict(done), indent=1).encode())
    return done


def _finished_shard(plan: ShardPlan, out: storage.Location, skip_bad: bool) -> _ShardDone | None:
    """The sidecar of a shard already written for this same plan, if the shard is still there."""
    sidecar = plan.path + DONE_SUFFIX
    if not out.exists(sidecar):
        return None
    try:
        done = from_dict(_ShardDone, json.loads(out.read_bytes(sidecar)))
    except ValueError:  # a damaged sidecar only means the shard is written again
        return None
    on_disk = out.filesystem.get_file_info(out.path(plan.path))
    if done.fingerprint != plan.fingerprint or on_disk.size != done.shard.bytes:
        return None
    # A shard that left samples out is only acceptable to a run that also allows skipping.
    if done.skipped and not skip_bad:
        return None
    return done


def _previous_manifest(out: storage.Location, format: ShardFormat, dataset: str) -> Manifest | None:
    """The manifest already at the destination, if any. Another dataset's (or format's) shards there are an error:
    each dataset of a multi-source mix gets its own folder or prefix, and a dataset's manifest is never replaced by
    another's."""
    if not out.exists(MANIFEST_NAME):
        return None
    previous = load_manifest(out)
    if (previous.dataset, previous.format) != (dataset, format):
        raise ConfigError(
            f"{out.uri} already holds {previous.format} shards of dataset {previous.dataset!r}; write "
            f"{format} shards of dataset {dataset!r} to a folder of their own, e.g. "
            f"{out.uri_of(dataset)}"
        )
    return previous


def _manifest(
    split_names: list[str],
    scene_splits: list[str],
    plain_splits: list[str],
    format: ShardFormat,
    dataset: str,
    source: str,
    done: list[_ShardDone],
    previous: Manifest | None,
    task_files: list[str],
) -> Manifest:
    """The manifest of the splits just written, plus the other splits of `previous` (a prepare of some splits
    keeps the ones an earlier prepare of the same dataset wrote)."""

    def split_info(prefix: str) -> SplitInfo:
        shards = [d.shard for d in done if d.shard.path.startswith(prefix)]
        return SplitInfo(samples=sum(len(s.samples) for s in shards), shards=shards)

    splits = {name: split_info(f"{name}/") for name in split_names}
    scenes = {name: split_info(f"{SCENE_SHARDS}{name}/") for name in scene_splits}  # shards of their own
    scenes.update({name: splits[name] for name in plain_splits})  # a split without split file: its scene folders
    # A bad scene folder fails in both listings: report it once.
    skipped = list({(s.sample, s.split): s for d in done for s in d.skipped}.values())
    if previous is not None:
        kept = {name: info for name, info in previous.splits.items() if name not in splits}
        splits = {**kept, **splits}
        scenes = {**{k: v for k, v in (previous.scenes or {}).items() if k in kept}, **scenes}
        skipped = [s for s in previous.skipped if s.split in kept] + skipped
        task_files = sorted(set(previous.task_files) | set(task_files))
    shards = {shard.path: shard for info in [*splits.values(), *scenes.values()] for shard in info.shards}
    return Manifest(
        schema_version=SCHEMA_VERSION,
        format=format,
        dataset=dataset,
        source=source,
        splits=splits,
        total_samples=sum(s.samples for s in splits.values()),
        total_shards=len(shards),
        total_bytes=sum(s.bytes for s in shards.values()),
        skipped=skipped,
        scenes=scenes,
        task_files=task_files,
    )


def _copy_task_files(src: Path, out: storage.Location) -> list[str]:
    """Copy ROOT/tasks/** (the reference's `la_file` / `lr_file`s) beside the manifest, so that a cluster worker
    reads them from the shards' storage; a file already there with the same bytes is not written again."""
    copied = []
    for path in sorted(p for p in (src / TASKS_FOLDER).rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        data = path.read_bytes()
        if not out.exists(rel) or out.read_bytes(rel) != data:
            out.write_bytes(rel, data)
        copied.append(rel)
    return copied


class _HashingSink:
    """A write-only file object that forwards to `stream` while hashing, so shards are hashed without a re-read."""

    def __init__(self, stream: pa.NativeFile):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._stream.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True  # the owner closes the underlying stream


class _ParquetShardWriter:
    """One row group per sample, so that a reader can fetch any one sample (and only the columns it needs)."""

    def __init__(self, sink: _HashingSink):
        self._writer = pq.ParquetWriter(sink, ARROW_SCHEMA)

    def add(self, record: SceneRecord) -> None:
        self._writer.write_table(pa.Table.from_pylist([record_to_row(record)], schema=ARROW_SCHEMA))

    def close(self) -> None:
        self._writer.close()


class _TarShardWriter:
    def __init__(self, sink: _HashingSink):
        self._tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)  # stream mode: no seeks
        self._count = 0

    def add(self, record: SceneRecord) -> None:
        key = f"{self._count:06d}"
        self._count += 1
        for suffix, payload in _webdataset_members(record_to_row(record)):
            info = tarfile.TarInfo(f"{key}.{suffix}")  # mtime 0 and fixed owner: same input, same bytes
            info.size = len(payload)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(payload))

    def close(self) -> None:
        self._tar.close()


def _webdataset_members(row: dict) -> list[tuple[str, bytes]]:
    meta = json.dumps({k: row[k] for k in _META_COLUMNS}).encode()
    points = [(f"point.{name}.npy", blob) for name, blob in zip(row["point_asset_names"], row["point_asset_npy"])]
    frames = [(f"frame{i}.{k}", row[f"frame_{k}"][i]) for i in range(len(row["frame_names"])) for k in FRAME_FILES]
    return [("meta.json", meta), *points, *frames]


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(uri: str | Path, endpoint_url: str | None = None) -> Manifest:
    return load_manifest(storage.resolve(uri, endpoint_url))


def read_shards(
    uri: str | Path,
    *,
    splits: list[str] | None = None,
    endpoint_url: str | None = None,
    verify: bool = True,
    shuffle: ray.data.FileShuffleConfig | None = None,
    scenes: bool = False,
) -> ray.data.Dataset:
    """The samples of `splits` (default: all) as a Ray dataset whose rows have the columns of `ARROW_SCHEMA`; with
    `scenes`, the split's scene folders (`Manifest.scenes`) instead of its pre-training samples.

    Every shard's size is checked against the manifest; with `verify` its sha256 too, once per shard and machine
    (`VerifiedShards`): a shard is hashed again only when it changed. Without `verify`, a shard damaged in place
    fails later, inside Ray's reader, with pyarrow's or tarfile's own message.
    """
    location = storage.resolve(uri, endpoint_url)
    manifest = load_manifest(location)
    listing = manifest.scene_splits(location.uri_of(MANIFEST_NAME)) if scenes else manifest.splits
    names = list(splits) if splits else list(listing)
    unknown = [s for s in names if s not in listing]
    if unknown:
        raise DataError(
            f"split {unknown[0]!r} is not in the manifest{' scene folders' if scenes else ''} "
            f"(it has: {', '.join(listing)})",
            file=location.uri_of(MANIFEST_NAME),
        )
    shards = [shard for name in names for shard in listing[name].shards]
    if not shards:
        raise DataError(f"the manifest lists no shards for splits {names}", file=location.uri_of(MANIFEST_NAME))
    stats = check_sizes(location, shards)
    if verify:
        VerifiedShards().verify(location, shards, stats)
    paths = [location.path(s.path) for s in shards]
    if manifest.format == "parquet":
        return ray.data.read_parquet(paths, filesystem=location.filesystem, partitioning=None, shuffle=shuffle)
    raw = ray.data.read_webdataset(paths, filesystem=location.filesystem, decoder=None, shuffle=shuffle)
    return raw.map_batches(_webdataset_batch_to_table, batch_format="pandas", fn_kwargs={"location": location})


def load_manifest(location: storage.Location) -> Manifest:
    file = location.uri_of(MANIFEST_NAME)
    if not location.exists(MANIFEST_NAME):
        raise DataError("no shard manifest here; run prepare to write one", file=file)
    try:
        manifest = from_dict(Manifest, json.loads(location.read_bytes(MANIFEST_NAME)))
    except ValueError as exc:  # bad JSON, or a ConfigError for missing/unknown keys
        raise DataError(f"not a valid shard manifest ({exc})", file=file) from exc
    if manifest.schema_version != SCHEMA_VERSION:
        raise DataError(
            f"shards use schema version {manifest.schema_version} but this code reads version "
            f"{SCHEMA_VERSION}; run prepare again",
            file=file,
        )
    return manifest


def check_sizes(location: storage.Location, shards: list[ShardInfo]) -> list[pafs.FileInfo]:
    """Each shard exists with the size the manifest records; returns their file infos."""
    infos = location.filesystem.get_file_info([location.path(s.path) for s in shards])
    for shard, info in zip(shards, infos):
        if info.type != pafs.FileType.File:
            raise DataError("the shard listed in the manifest is missing", file=location.uri_of(shard.path))
        if info.size != shard.bytes:
            raise DataError(
                f"the shard has {info.size} bytes but the manifest records {shard.bytes}; it is "
                "truncated or was overwritten",
                file=location.uri_of(shard.path),
            )
    return infos


class VerifiedShards:
    """Local markers of shards whose sha256 matched the manifest, so that a run hashes only shards that changed.

    A marker is keyed by the shard's URI, its manifest sha256, size and modification time (local files and S3
    objects both have one): a shard rewritten in place gets a new modification time and is hashed again. Markers
    are empty files under $CONCERTO_RAY_CACHE (default ~/.cache/concerto-ray)/verified-shards."""

    def __init__(self, root: str | Path | None = None):
        cache = Path(os.environ.get("CONCERTO_RAY_CACHE") or Path.home() / ".cache" / "concerto-ray")
        self.root = Path(root) if root is not None else cache / "verified-shards"

    def _marker(self, location: storage.Location, shard: ShardInfo, info: pafs.FileInfo) -> Path:
        key = json.dumps([location.uri_of(shard.path), shard.sha256, info.size, info.mtime_ns])
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def verify(
        self, location: storage.Location, shards: list[ShardInfo], infos: list[pafs.FileInfo]
    ) -> list[ShardInfo]:
        """Hash the shards without a valid marker (in parallel Ray tasks); returns those it hashed."""
        todo = [(s, info) for s, info in zip(shards, infos) if not self._marker(location, s, info).exists()]
        digests = ray.get([sha256_of_file.remote(location.filesystem, location.path(s.path)) for s, _ in todo])
        for (shard, info), digest in zip(todo, digests):
            if digest != shard.sha256:
                raise DataError(
                    f"sha256 {digest} does not match the manifest's {shard.sha256}; the shard is corrupt",
                    file=location.uri_of(shard.path),
                )
            marker = self._marker(location, shard, info)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        return [shard for shard, _ in todo]


@ray.remote
def sha256_of_file(filesystem: pafs.FileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _webdataset_batch_to_table(batch, location: storage.Location) -> pa.Table:
    rows = [webdataset_sample_to_row(sample, location) for sample in batch.to_dict("records")]
    return pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)


def webdataset_sample_to_row(sample: dict, location: storage.Location) -> dict:
    """Inverse of `_webdataset_members`; `sample` maps member suffixes to bytes (NaN where a member is absent)."""
    shard, key = location.uri_of_path(sample["__url__"]), sample["__key__"]
    try:
        meta = json.loads(sample["meta.json"])
        row = {k: meta[k] for k in _META_COLUMNS}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"member {key}.meta.json is missing or incomplete ({exc!r})", file=shard) from exc

    def member(suffix: str) -> bytes:
        value = sample.get(suffix)
        if not isinstance(value, bytes):
            raise DataError(f"member {key}.{suffix} is missing", sample=row["name"], file=shard)
        return value

    row["point_asset_npy"] = [member(f"point.{name}.npy") for name in row["point_asset_names"]]
    for k in FRAME_FILES:
        row[f"frame_{k}"] = [member(f"frame{i}.{k}") for i in range(len(row["frame_names"]))]
    return row
