"""Where shards live: a local folder or an S3 prefix, behind one pyarrow filesystem.

`s3://bucket/prefix` uses the standard AWS credential chain (environment variables, ~/.aws files, instance
metadata), resolved by the AWS SDK inside each process that touches the data, so that Ray workers on other nodes
use their own credentials. `endpoint_url` points at an S3-compatible store (MinIO, Ceph, moto); it travels with
the pickled filesystem to the workers.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs

from concerto_ray.errors import ConfigError

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class Location:
    """A folder in a filesystem. `root` is the filesystem path of the folder (``bucket/prefix`` on S3)."""

    filesystem: pafs.FileSystem
    root: str
    uri: str  # the folder as the user wrote it, normalised; used in messages

    def path(self, relative: str) -> str:
        """Filesystem path of a file below the folder."""
        return posixpath.join(self.root, relative)

    def uri_of(self, relative: str) -> str:
        """The file as a URI a user can paste (``s3://...`` or a local path)."""
        return posixpath.join(self.uri, relative)

    def uri_of_path(self, path: str) -> str:
        """Inverse of `path`: the URI of a filesystem path below the folder (as Ray reports them)."""
        return self.uri_of(posixpath.relpath(path, self.root))

    def exists(self, relative: str) -> bool:
        return self.filesystem.get_file_info(self.path(relative)).type == pafs.FileType.File

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        self.make_parent(relative)
        with self.filesystem.open_output_stream(self.path(relative)) as out:
            out.write(data)

    def write_npy(self, relative: str, array) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array)
        self.write_bytes(relative, buffer.getvalue())

    def write_png(self, relative: str, image) -> None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        self.write_bytes(relative, buffer.getvalue())

    def make_parent(self, relative: str) -> None:
        # S3 has no folders; create_dir there would only add empty marker objects.
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            self.filesystem.create_dir(posixpath.dirname(self.path(relative)), recursive=True)


def resolve(uri: str | Path, endpoint_url: str | None = None) -> Location:
    """A local path or ``s3://bucket/prefix`` -> `Location`; `endpoint_url` applies to S3 only."""
    text = str(uri)
    if text.startswith(S3_SCHEME):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise ConfigError(f"{text!r}: an S3 URI needs a bucket, as in s3://bucket/prefix")
        root = posixpath.join(parsed.netloc, parsed.path.strip("/")).rstrip("/")
        return Location(s3_filesystem(endpoint_url), root, f"{S3_SCHEME}{root}")
    if "://" in text:
        raise ConfigError(f"{text!r}: unsupported storage scheme; use a local path or s3://bucket/prefix")
    root = Path(text).expanduser().resolve().as_posix()
    return Location(pafs.LocalFileSystem(), root, root)


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """The one place S3 access is configured; credentials and region come from the AWS chain.

    Without `endpoint_url`, the AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL variables are honoured as boto3 does
    (pyarrow's SDK does not read them itself).
    """
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint_url is None:
        return pafs.S3FileSystem()
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"endpoint_url {endpoint_url!r} must look like http(s)://host[:port]")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme)
