"""Shared fixtures: a moto S3 server and a small local Ray cluster, one of each per test session."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import boto3
import pytest
import ray
from moto.server import ThreadedMotoServer


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto in server mode) with one bucket; the AWS variables point every client at it."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata probes for credentials
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="concerto-test")
        yield S3Server(endpoint_url=endpoint, bucket="concerto-test")
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A 2-CPU local Ray cluster. It starts after `s3_server` because Ray's workers inherit the environment of
    the process that starts the cluster, and must see the S3 credentials."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
