"""Pre-training on a real multi-node Ray cluster on this machine (tests/multinode.py): a head offering no CPUs and
worker nodes with caches of their own, everything the workers read in S3 (moto), MLflow on the session's server.

The driver is `concerto-ray pretrain` in a subprocess: this process already belongs to conftest's local Ray.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from multinode import MultiNodeCluster

from concerto_ray.train.tracking import RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain-tiny.yaml"
CLI = str(Path(sys.executable).with_name("concerto-ray"))
EPOCHS = 3
STEPS = EPOCHS * 2  # 4 train samples // 2 workers // batch 1 per epoch
LOSS_TERMS = ("loss", "mask_loss", "roll_mask_loss", "unmask_loss", "enc2d_loss")
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def s3_inputs(s3_server, pretrain_shards, dinov2_dir):
    """The session's shards and DINOv2 weights, uploaded to S3: a multi-node run may not read the head's files."""
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    for name, folder in (("shards", pretrain_shards), ("dinov2", dinov2_dir)):
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), s3_server.bucket, f"multinode/{name}/{path.relative_to(folder)}")
    return f"s3://{s3_server.bucket}/multinode"


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """A head (0 CPUs) and two worker nodes of 2 CPUs. After `s3_server`: the nodes' Ray processes inherit this
    process's environment, S3 credentials and endpoint included."""
    with MultiNodeCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_worker=2, dashboard=False) as nodes:
        yield nodes


def overrides(s3_inputs: str, s3_server, mlflow_server: str, name: str) -> list[str]:
    """The shipped tiny config with every path in S3, 28-pixel crops, a checkpoint every 2 steps, all kept."""
    return [
        f"data.shards={s3_inputs}/shards",
        f"model.image_encoder_weights={s3_inputs}/dinov2",
        f"run.storage_path=s3://{s3_server.bucket}/multinode-runs",
        f"run.endpoint_url={s3_server.endpoint_url}",
        f"mlflow.tracking_uri={mlflow_server}",
        f"run.name={name}",
        f"run.epochs={EPOCHS}",
        "run.checkpoint_every=2",
        "run.checkpoints_to_keep=10",
        "run.max_failures=1",
        "data.seed=0",
        "data.pretrain.crop_h=28",
        "data.pretrain.crop_w=28",
        "data.pretrain.max_size=1024",
        "data.pretrain.enc2d_max_size=1024",
    ]


def pretrain(cluster: MultiNodeCluster, sets: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`concerto-ray pretrain` on the cluster, its output in `log`; `env`: more driver variables. The driver's own
    cache is the head's."""
    command = [CLI, "pretrain", "--config", str(TINY_CONFIG)] + [arg for value in sets for arg in ("--set", value)]
    env = cluster.driver_env(
        RAY_TRAIN_ENABLE_STATE_TRACKING="1", CONCERTO_RAY_CACHE=str(cluster.root / "head-cache"), **env
    )
    return subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def driver_query(cluster: MultiNodeCluster, script: str):
    """Run `script` as a driver of `cluster` in a subprocess (this process belongs to conftest's Ray); the JSON object
    it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=cluster.driver_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray may print notices (a node's lost heartbeats) after it: the JSON is the last line that is an object.
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


def train_run(cluster: MultiNodeCluster, run_name: str) -> dict:
    """Ray Train's record of `run_name`, from its state actor on the head (kept while
    RAY_TRAIN_ENABLE_STATE_TRACKING=1): its status and its attempts in order, each with its status, end time (ns)
    and its workers' node ids."""
    return driver_query(
        cluster,
        f"""
        import json, ray
        from ray.train.v2._internal.state.state_actor import get_state_actor
        ray.init(log_to_driver=False)
        actor = get_state_actor()
        runs = [run for run in ray.get(actor.get_train_runs.remote()).values() if run.name == {run_name!r}]
        assert len(runs) == 1, runs
        attempts = ray.get(actor.get_train_run_attempts.remote())[runs[0].id].values()
        print(json.dumps({{
            "status": runs[0].status.value,
            "attempts": [
                {{"status": a.status.value, "end_time_ns": a.end_time_ns, "node_ids": [w.node_id for w in a.workers]}}
                for a in sorted(attempts, key=lambda a: a.start_time_ns)
            ],
        }}))
        """,
    )


def wait_for_first_checkpoint(driver: subprocess.Popen, log: Path, s3, bucket: str, run_prefix: str) -> None:
    """Until Ray Train has recorded the run's first checkpoint (step 2): an interruption before that restarts from
    nothing."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while '"step-00000002"' not in read_object(s3, bucket, f"{run_prefix}checkpoint_manager_snapshot.json"):
        assert driver.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint recorded in {RUN_TIMEOUT_S} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def assert_resumed_and_complete(
    s3, bucket: str, run_prefix: str, mlflow_server: str, interrupted_at: datetime.datetime, epochs: int = EPOCHS
) -> None:
    """The run (`run.epochs=epochs`) continued from a checkpoint after `interrupted_at` and ended with exactly its
    planned steps: the first checkpoint, recorded before the interruption, was not written again (a restart from
    nothing would have), the last one, the planned step, was written after it, and MLflow has every optimizer step
    once."""
    steps = epochs * STEPS // EPOCHS
    written = checkpoints(s3, bucket, run_prefix)
    assert sorted(written) == [f"step-{step:08d}" for step in range(2, steps + 1, 2)]
    assert written["step-00000002"] < interrupted_at, "the first checkpoint was written again after the restart"
    # S3 times are whole seconds
    assert written[f"step-{steps:08d}"] >= interrupted_at.replace(microsecond=0), "interrupted after the last step"
    progress = json.loads(read_object(s3, bucket, f"{run_prefix}step-{steps:08d}/progress.json"))
    assert progress == {"global_step": steps, "epoch": epochs, "step_in_epoch": 0, "skipped_steps": 0}
    run_id = json.loads(read_object(s3, bucket, f"{run_prefix}{RUN_ID_FILE}"))["run_id"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in LOSS_TERMS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, steps + 1)), key


def checkpoints(s3, bucket: str, run_prefix: str) -> dict[str, datetime.datetime]:
    """The run's checkpoint folders and when the newest file of each was written."""
    written: dict[str, datetime.datetime] = {}
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=run_prefix).get("Contents", ()):
        folder = item["Key"].removeprefix(run_prefix).split("/")[0]
        if folder.startswith("step-"):
            written[folder] = max(written.get(folder, item["LastModified"]), item["LastModified"])
    return written


@pytest.mark.slow
def test_head_local_paths_are_refused_before_training(
    cluster, s3_inputs, s3_server, mlflow_server, pretrain_shards, tmp_path
):
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client = MlflowClient(mlflow_server)
    all_s3 = overrides(s3_inputs, s3_server, mlflow_server, "mn-refused")
    # a field of the config; MLflow's store named by the driver's $MLFLOW_TRACKING_URI, which the workers log to
    local_mlflow = f"sqlite:///{tmp_path}/mlflow.db"
    for field, local, sets, env in (
        ("data.shards", str(pretrain_shards), [*all_s3, f"data.shards={pretrain_shards}"], {}),
        (
            "mlflow.tracking_uri",
            local_mlflow,
            [value for value in all_s3 if not value.startswith("mlflow.tracking_uri=")],
            {"MLFLOW_TRACKING_URI": local_mlflow},
        ),
    ):
        log = tmp_path / f"{field}.log"
        driver = pretrain(cluster, sets, log, **env)
        assert driver.wait(timeout=RUN_TIMEOUT_S) == 2, log.read_text()[-3000:]
        assert f"{field}: {local!r} is a path on one machine, but this Ray cluster has 3 nodes" in log.read_text()
        # refused before anything started: no run folder in storage, no MLflow run
        assert s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="multinode-runs/mn-refused/")["KeyCount"] == 0
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        assert not client.search_runs(experiments, filter_string="attributes.run_name = 'mn-refused'")
        assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_killed_training_node_is_replaced_and_the_run_resumes(
    cluster, s3_inputs, s3_server, mlflow_server, dinov2_dir, tmp_path
):
    name = "mn-killed"
    run_prefix = f"multinode-runs/{name}/"
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    log = tmp_path / "driver.log"
    driver = pretrain(cluster, overrides(s3_inputs, s3_server, mlflow_server, name), log)

    wait_for_first_checkpoint(driver, log, s3, s3_server.bucket, run_prefix)
    training = cluster.nodes_running("RayTrainWorker")
    assert training, "no worker node runs a training worker"
    for index in training:
        cluster.kill_node(index)
    killed_at = datetime.datetime.now(datetime.timezone.utc)
    cluster.add_node()  # a fresh node, as the autoscaler would start; the spare node may be used first

    assert driver.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    # Ray Train saw the lost node fail its first attempt, and finished in a second one.
    assert [attempt["status"] for attempt in train_run(cluster, name)["attempts"]] == ["ERRORED", "FINISHED"]
    assert_resumed_and_complete(s3, s3_server.bucket, run_prefix, mlflow_server, killed_at)

    # Each node that ran a training worker fetched the DINOv2 weights into its own cache; the head fetched nothing.
    weights = sorted(path.relative_to(dinov2_dir) for path in dinov2_dir.rglob("*") if path.is_file())
    holders = []
    for node in cluster.nodes:
        copies = list(node.cache.glob("*-dinov2")) if node.cache.is_dir() else []
        if copies:
            (copy,) = copies
            assert sorted(path.relative_to(copy) for path in copy.rglob("*") if path.is_file()) == weights
            assert all((copy / path).read_bytes() == (dinov2_dir / path).read_bytes() for path in weights)
            holders.append(node.index)
    assert set(training) <= set(holders), (training, holders)
    assert set(holders) - set(training), "no surviving node fetched the weights for the second attempt"
    assert not list((cluster.root / "head-cache").glob("*-dinov2"))


def read_object(s3, bucket: str, key: str) -> str:
    """The object's text; empty if it does not exist (yet)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return ""


@pytest.mark.slow
def test_an_elastic_run_shrinks_to_the_nodes_left_and_grows_back(
    cluster, s3_inputs, s3_server, mlflow_server, tmp_path
):
    """`run.num_workers: [1, 2]`: two nodes that fit one training worker each (3 CPUs, 2.5 a worker; the module's 2-CPU
    nodes fit none and run the data tasks). One is killed: the run goes on with 1 worker. A node is added: it grows
    back to 2. The global batch, so every step, stays as planned: each optimizer step is logged once, with 2
    samples, and each epoch trains on each sample once (`run.log_sample_names`)."""
    name, epochs = "mn-elastic", 25  # 50 steps: room for a node to start while the 1-worker attempt trains
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    first, second = cluster.add_node(cpus=3), cluster.add_node(cpus=3)
    sets = overrides(s3_inputs, s3_server, mlflow_server, name)
    sets += [f"run.epochs={epochs}", "run.num_workers=[1, 2]", "run.cpus_per_worker=2.5", "run.resize_check_s=5"]
    sets += ["run.log_sample_names=true"]
    log = tmp_path / "driver.log"
    driver = pretrain(cluster, sets, log)

    wait_for_first_checkpoint(driver, log, s3, s3_server.bucket, f"multinode-runs/{name}/")
    assert sorted(cluster.nodes_running("RayTrainWorker")) == [first, second]
    cluster.kill_node(second)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(len(a["node_ids"]) == 1 and a["status"] == "RUNNING" for a in train_run(cluster, name)["attempts"]):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    # The lone worker trains and checkpoints (its steps' metrics are sent with a checkpoint) before the group grows.
    client = MlflowClient(mlflow_server)
    run_id = json.loads(read_object(s3, s3_server.bucket, f"multinode-runs/{name}/{RUN_ID_FILE}"))["run_id"]
    shrunk_at = len(client.get_metric_history(run_id, "loss"))
    while len(client.get_metric_history(run_id, "loss")) < shrunk_at + 2:
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    cluster.add_node(cpus=3)

    assert driver.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    attempts = train_run(cluster, name)["attempts"]
    assert [len(a["node_ids"]) for a in attempts] == [2, 1, 2], attempts
    assert attempts[0]["status"] == "ERRORED" and attempts[-1]["status"] == "FINISHED"
    steps = 2 * epochs
    latest = f"multinode-runs/{name}/step-{steps:08d}/progress.json"
    assert json.loads(read_object(s3, s3_server.bucket, latest)) == {
        "global_step": steps,
        "epoch": epochs,
        "step_in_epoch": 0,
        "skipped_steps": 0,
    }
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    # the global batch at both sizes: 2 workers x 1 sample, or 1 worker x 2 micro-batches of 1
    samples = client.get_metric_history(run_id, "samples")
    assert len(samples) == steps and {m.value for m in samples} == {2}
    # Every epoch trained on each of the 4 scenes once, whatever the size of the group at each of its steps.
    trained: dict[int, list[str]] = {}
    for artifact in client.list_artifacts(run_id, "samples"):
        by_step = json.loads(Path(client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text())
        trained.update({int(step): [n for worker in names for n in worker] for step, names in by_step.items()})
    assert sorted(trained) == list(range(1, steps + 1))
    for epoch in range(epochs):
        names = trained[2 * epoch + 1] + trained[2 * epoch + 2]
        assert len(names) == len(set(names)) == 4, (epoch, names)
