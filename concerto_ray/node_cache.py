"""What a worker reads, fetched by the node that reads it: object-store files and folders (DINOv2 weights, checkpoints,
label and scene lists) are copied once per node into a local cache, and head-local paths are refused on a cluster.

On a multi-node cluster the driver runs on the head, and a path that exists there (a checkpoint under /checkpoints,
a weights folder in the driver's working directory) is missing on a fresh GPU node. So:
- `check_reachable(field, path)` refuses a local path as soon as the cluster has more than one alive node;
- `local_copy(uri)` gives a local path for an ``s3://`` file or folder, downloading it once per node: the workers of
  one node wait on a file lock, the first downloads into a temporary name and renames it into place, and the others
  (and later runs) find the finished copy. Call it where the read happens, on the worker.

The cache folder is $CONCERTO_RAY_CACHE, else ~/.cache/concerto-ray. A cached copy is keyed by the URI and endpoint;
objects are not re-checked for changes, so write new data under a new URI (checkpoints already are: step-NNNNNNNN/).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from concerto_ray.data import storage
from concerto_ray.errors import ConfigError

CACHE_ENV = "CONCERTO_RAY_CACHE"


# URIs that still name a file on one machine (the MLflow default is a SQLite file in the run folder).
LOCAL_SCHEMES = ("file:", "sqlite:")


def is_remote(uri: str) -> bool:
    """A URI every node can reach (s3://, http://, ...), as opposed to a path or file on one machine."""
    return "://" in uri and not uri.startswith(LOCAL_SCHEMES)


def alive_nodes() -> int:
    """Alive nodes of the connected Ray cluster; 1 without Ray (a local run)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node["Alive"])


def check_reachable(field: str, path: str | None, nodes: int | None = None) -> None:
    """Refuse a local path for `field` when the cluster has more than one node (`nodes`; default: ask Ray)."""
    if path is None or is_remote(path):
        return
    nodes = alive_nodes() if nodes is None else nodes
    if nodes > 1:
        raise ConfigError(
            f"{field}: {path!r} is a path on one machine, but this Ray cluster has {nodes} nodes and "
            f"workers on the others cannot read it; put it in object storage (s3://bucket/...) instead"
        )


# Config fields, at any depth, that name something a worker reads or writes.
PATH_FIELDS = (
    "shards",
    "sources_root",
    "storage_path",
    "image_encoder_weights",
    "pretrained.path",
    "label_file",
    "scene_list_file",
    "clip_model",
    "tracking_uri",
)


def check_config_reachable(tree: dict, nodes: int | None = None, where: str = "") -> None:
    """`check_reachable` for every path field of a config tree (`to_dict` of a config). A value that is neither a
    URI nor absolute nor present here is a hub name, and is left alone."""
    nodes = alive_nodes() if nodes is None else nodes
    for key, value in tree.items():
        name = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            check_config_reachable(value, nodes, name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    check_config_reachable(item, nodes, f"{name}[{i}]")
        elif isinstance(value, str) and name.endswith(PATH_FIELDS) and _names_a_local_file(value):
            check_reachable(name, value, nodes)


def _names_a_local_file(value: str) -> bool:
    if value.startswith(LOCAL_SCHEMES):
        return True
    return not is_remote(value) and (Path(value).is_absolute() or Path(value).exists())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "concerto-ray")


def local_copy(uri: str, endpoint_url: str | None = None, field: str = "path") -> Path:
    """A local path with the contents of `uri`: this node's cached copy of an ``s3://`` file or folder, downloaded
    on first use; anything else (a local path, a hub name) as it is, for the caller to check."""
    if not is_remote(uri):
        return Path(uri)
    source = storage.resolve(uri, endpoint_url)
    key = hashlib.sha256(f"{source.uri}\n{endpoint_url or ''}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{key}-{posixpath.basename(source.root) or 'root'}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait here while the first one downloads
        if not target.exists():
            _download(source, target, field)
    return target


def _download(source: storage.Location, target: Path, field: str) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a download that died half-way
    if partial.is_file():
        partial.unlink()
    kind = source.filesystem.get_file_info(source.root).type
    if kind not in (pafs.FileType.File, pafs.FileType.Directory):
        raise ConfigError(f"{field}: nothing found at {source.uri}")
    if kind == pafs.FileType.Directory:
        partial.mkdir()
    try:
        pafs.copy_files(
            source.root,
            str(partial),
            source_filesystem=source.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    except OSError as exc:
        raise ConfigError(f"{field}: cannot download {source.uri}: {exc}") from exc
    partial.rename(target)  # atomic: a copy under the final name is always complete
