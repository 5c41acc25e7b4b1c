"""Shared fixtures, one of each per test session: a moto S3 server, a small local Ray cluster, an MLflow server."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture
def inject_faults(monkeypatch):
    """Make `run_pretrain` run the product's worker with faults on rank 0 (the product has no fault hooks):
    `exit_before_step`: the worker process ends abruptly (os._exit) just before that optimizer step (1-based),
    once Ray Train has recorded the latest checkpoint, unless its attempt started from a checkpoint (so that a
    restart runs on); `nonfinite_steps`: the loss of those optimizer steps is multiplied by NaN; `record_to`: every
    worker appends to `<record_to>/rank<R>.jsonl` the sample names it reads from its stream ("read", with the epoch)
    and those of each optimizer step ("step"), and whether its attempt started from a checkpoint."""

    import concerto_ray.train.trainer
    from concerto_ray.config import from_dict
    from concerto_ray.train.config import PretrainConfig
    from concerto_ray.train.loop import CHECKPOINT_DIR_FORMAT, Worker
    from concerto_ray.train.runtime import epoch_steps

    def inject(
        exit_before_step: int | None = None, nonfinite_steps: tuple[int, ...] = (), record_to: Path | None = None
    ) -> None:
        def wait_for_recorded_checkpoint(config: PretrainConfig, step: int, timeout_s: float = 300) -> None:
            """Wait until Ray Train's record of the (local) run lists the latest checkpoint at or before `step`:
            a worker reports a checkpoint without waiting for the controller to take note of it, and a failure
            before that would restart from an older one."""
            latest = CHECKPOINT_DIR_FORMAT.format(step - step % config.run.checkpoint_every)
            record = Path(config.run.storage_path) / config.run.name / "checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + timeout_s
            while step >= config.run.checkpoint_every and latest not in (record.read_text() if record.exists() else ""):
                assert time.monotonic() < deadline, f"Ray Train did not record {latest} in {timeout_s} s"
                time.sleep(0.5)

        def record_samples(worker: Worker, path: Path, restarted: bool) -> None:
            """Log what `worker` reads and trains on, in its own process (a closure: shipped by value)."""
            import concerto_ray.train.loop as loop_module

            def write(**event) -> None:
                with path.open("a") as file:
                    file.write(json.dumps(dict(event, restarted=restarted)) + "\n")

            def recorded_epoch_steps(batches, *args, **kwargs):
                epoch = worker.progress.epoch

                def read():
                    for batch in batches:
                        write(kind="read", epoch=epoch, names=list(batch["name"]))
                        yield batch

                return epoch_steps(read(), *args, **kwargs)

            loop_module.epoch_steps = recorded_epoch_steps
            step = worker.optimizer_step

            def recorded_step(micro_batches):
                write(
                    kind="step",
                    step=worker.progress.global_step + 1,
                    names=[n for b in micro_batches for n in b["name"]],
                )
                return step(micro_batches)

            worker.optimizer_step = recorded_step

        if record_to is not None:
            record_to.mkdir(parents=True, exist_ok=True)

        def faulty_loop(loop_config: dict) -> None:  # a closure: Ray ships it to the workers by value
            config = from_dict(PretrainConfig, loop_config["config"])
            worker = Worker(
                config,
                loop_config["steps_per_epoch"],
                loop_config["tracking_uri"],
                loop_config["mlflow_run_id"],
                keep_short_batch=loop_config["keep_short_batch"],
                stream_position=loop_config["stream_position"],
            )
            restarted = ray.train.get_checkpoint() is not None
            if record_to is not None:
                record_samples(worker, record_to / f"rank{worker.rank}.jsonl", restarted)
            if worker.rank == 0:

                def before_forward(module, args):
                    if worker.progress.global_step + 1 == exit_before_step and not restarted:
                        wait_for_recorded_checkpoint(config, worker.progress.global_step)
                        os._exit(1)

                def after_forward(module, args, losses):
                    if worker.progress.global_step + 1 in nonfinite_steps:
                        return dict(losses, loss=losses["loss"] * math.nan)
                    return None

                worker.ssl_model.register_forward_pre_hook(before_forward)
                worker.ssl_model.register_forward_hook(after_forward)
            worker.run()

        monkeypatch.setattr(concerto_ray.train.trainer, "train_loop_per_worker", faulty_loop)

    return inject


def recorded(folder: Path) -> dict[int, list[dict]]:
    """Each rank's events, as `record_samples` wrote them."""
    return {
        int(path.stem.removeprefix("rank")): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("rank*.jsonl"))
    }
