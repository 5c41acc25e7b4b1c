"""Shared fixtures, one of each per test session: a moto S3 server, a small local Ray cluster, an MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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
    # address="local": always a fresh cluster of our own, never one that `ray start` left on the machine. With the
    # dashboard, as on a real cluster: Ray Train frees the resources of a run whose trial Tune stopped through the
    # state API it serves.
    # log_to_driver=False, as the commands run it (concerto_ray.console): the workers' output stays in Ray's session
    # logs, so that a test of what a command prints sees only what the command itself prints.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=_free_port(), log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "wb"),
        start_new_session=True,  # its own process group: the server's uvicorn/huey children are stopped with it
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(
                    f"MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory):
    """A tiny random DINOv2-with-registers (the tiny-concerto architecture) saved to disk, as a user's weights."""
    import torch
    from transformers import Dinov2WithRegistersModel

    from concerto_ray.model.configs import get_model_config

    folder = tmp_path_factory.mktemp("dinov2-tiny")
    torch.manual_seed(0)
    Dinov2WithRegistersModel(get_model_config("tiny-concerto").image_encoder.architecture()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory):
    """Parquet shards of 4 tiny synthetic training scenes (4 frames each)."""
    from concerto_ray.data.shards import prepare
    from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("pretrain")
    write_synthetic_dataset(
        root / "scenes",
        SynthConfig(
            scenes=4, points_per_scene=1500, views_per_scene=4, image_width=48, image_height=32, splits={"train": 1.0}
        ),
        progress=False,
    )
    prepare(root / "scenes", str(root / "shards"), progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def sweep_scenes(tmp_path_factory):
    """3 tiny synthetic scenes (2 train, 1 val) in Pointcept's layout: the sweep tests' shards are made from them."""
    from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("sweep-scenes")
    write_synthetic_dataset(
        root,
        SynthConfig(
            scenes=3,
            points_per_scene=1000,
            views_per_scene=1,
            image_width=16,
            image_height=16,
            splits={"train": 0.67, "val": 0.33},
        ),
        progress=False,
    )
    return root
