"""`ray job submit` of jobs/pretrain.py against a real head node started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import boto3
import pytest
from ray._private.ray_constants import get_runtime_env_default_excludes
from ray._private.runtime_env.packaging import create_package
from ray.job_submission import JobStatus, JobSubmissionClient

from concerto_ray.data.shards import prepare

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """A separate Ray cluster, as `ray up` would give: a head node with the job server, on loopback only.

    It runs with --block in its own process group, so that stopping it stops only this cluster (`ray stop` would
    stop every Ray instance on the machine)."""
    dashboard_port = _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # Ray's token authentication stays on, as on a real cluster; the head and every client share this token.
    # (This process read Ray's auth settings at import, so its clients pass the token as a header.)
    token = secrets.token_hex(32)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    gcs_port = _free_port()
    # Every port of our own: another Ray on the machine (the suite's local cluster) holds the fixed defaults, and a
    # head whose job agent cannot bind answers every submission with "No available agent".
    ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            *ports,
            "--disable-usage-stats",
        ],
        start_new_session=True,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        # Jobs run `python` from the head's PATH: this environment's, as on a cluster node with the package installed.
        env=dict(os.environ, RAY_ADDRESS="", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
    )
    head_address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(head_address, headers={"Authorization": f"Bearer {token}"})
            client.list_jobs()
            break
        except Exception:
            if head.poll() is not None or time.monotonic() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                raise RuntimeError(f"the Ray head did not start: {log.read_text()[-3000:]}") from None
            time.sleep(1)
    yield head_address, client
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    monkeypatch.undo()
    # `ray start` recorded this head as the machine's current cluster; a later plain ray.init() would try to join it.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit_job(
    address: str, client: JobSubmissionClient, submission_id: str, working_dir: Path, env_vars: dict, script: list[str]
) -> str:
    """`ray job submit` of `script` from `working_dir`; waits for the job to end and returns its logs."""
    command = [
        RAY,
        "job",
        "submit",
        f"--address={address}",
        "--no-wait",
        f"--submission-id={submission_id}",
        f"--working-dir={working_dir}",
        f"--runtime-env-json={json.dumps({'env_vars': env_vars})}",
        "--",
        "python",
        *script,
    ]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent starts after its dashboard, later still on a loaded machine
        submitted = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=""))
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]

    deadline = time.monotonic() + 600
    while (status := client.get_job_status(submission_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, f"job {submission_id} did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


@pytest.mark.slow
def test_ray_job_submit_pretrain_then_finetune_from_its_checkpoint_in_s3(
    ray_head, s3_server, dinov2_dir, pretrain_shards, sweep_scenes, mlflow_server, tmp_path
):
    # The jobs run from an uploaded copy of the working directory, as on a real cluster.
    working_dir = tmp_path / "job"
    shutil.copytree(
        REPO,
        working_dir,
        ignore=shutil.ignore_patterns(".venv", ".git", "demo", "__pycache__", ".device", "*.egg-info"),
    )
    env_vars = {
        k: os.environ[k]
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    storage = [
        f"run.storage_path=s3://{s3_server.bucket}/jobs",
        f"run.endpoint_url={s3_server.endpoint_url}",
        f"mlflow.tracking_uri={mlflow_server}",
    ]
    pretrain = [
        f"data.shards={pretrain_shards}",
        f"model.image_encoder_weights={dinov2_dir}",
        "run.name=job-run",
        *storage,
        "data.seed=0",
        "data.pretrain.crop_h=28",
        "data.pretrain.crop_w=28",
        "data.pretrain.max_size=1024",
        "data.pretrain.enc2d_max_size=1024",
    ]
    address, client = ray_head
    logs = submit_job(
        address,
        client,
        "pretrain-tiny",
        working_dir,
        env_vars,
        [
            "jobs/pretrain.py",
            "--config",
            "configs/pretrain-tiny.yaml",
            *[arg for o in pretrain for arg in ("--set", o)],
        ],
    )
    assert f"finished; latest checkpoint: s3://{s3_server.bucket}/jobs/job-run/step-00000004" in logs
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="jobs/job-run/")["Contents"]}
    assert {"jobs/job-run/step-00000004/model.pt", "jobs/job-run/step-00000004/progress.json"} <= keys

    # A linear probe of that checkpoint, read from S3 by the fine-tuning job.
    semseg = tmp_path / "semseg"
    prepare(sweep_scenes, str(semseg / "shards"), progress=False)
    probe = [
        f"data.shards={semseg / 'shards'}",
        "run.name=probe-job",
        *storage,
        "run.cpus_per_worker=0.5",
        f"pretrained.path=s3://{s3_server.bucket}/jobs/job-run/step-00000004",
        "batch_size=1",
        "epochs=2",
        "eval_epochs=1",
        "transform.test_rotations=[0.0]",
        "transform.test_scales=[]",
        "transform.test_flip=false",
    ]
    logs = submit_job(
        address,
        client,
        "probe-tiny",
        working_dir,
        env_vars,
        ["jobs/finetune.py", "--config", "semseg-tiny-lin", *[arg for o in probe for arg in ("--set", o)]],
    )
    assert f"at s3://{s3_server.bucket}/jobs/probe-job/round-0001" in logs
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="jobs/probe-job/")["Contents"]}
    assert "jobs/probe-job/round-0001/model.pt" in keys


def test_a_config_typo_fails_the_job_script_before_ray(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "pretrain.py"),
            "--config",
            str(REPO / "configs" / "pretrain-tiny.yaml"),
            "--set",
            "optim.lrr=0.1",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, RAY_ADDRESS="127.0.0.1:1"),
    )
    assert result.returncode == 2
    assert "unknown config key 'optim.lrr' (did you mean 'lr'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_job_package_leaves_data_and_outputs_behind(tmp_path):
    """`ray job submit --working-dir .` packages the repository as Ray's own packaging does (.gitignore, .rayignore,
    Ray's default excludes): data and outputs that the README's commands write into it stay on the local machine."""
    working_dir = tmp_path / "repo"
    shutil.copytree(
        REPO,
        working_dir,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".device", "demo", "data", "runs", "mlruns", "__pycache__", "*.egg-info"
        ),
    )
    outputs = [
        "data/synth/splits/train.json",
        "data/synth/scene0/coord.npy",
        "demo/shards/part-00000.parquet",
        "demo/runs/pretrain-tiny/step-00000002/model.pt",
        "runs/x/model.pt",
        "mlruns/0/meta.yaml",
    ]
    for name in outputs:
        (working_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (working_dir / name).write_bytes(os.urandom(1 << 16))
    package = tmp_path / "package.zip"
    create_package(str(working_dir), package, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    names = set(zipfile.ZipFile(package).namelist())
    assert {"jobs/pretrain.py", "configs/pretrain-tiny-s3.yaml", "concerto_ray/cli.py", "pyproject.toml"} <= names
    leaked = sorted(n for n in names if n.split("/")[0] in {"data", "demo", "runs", "mlruns"})
    assert not leaked, f"the job package carries outputs: {leaked}"
