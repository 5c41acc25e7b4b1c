"""A spot reclaim of the training node on a real multi-node Ray cluster (tests/multinode.py): the node's spot watcher
(`python -m concerto_ray.spot_watcher`, reading a stand-in IMDS) drains it through the live GCS, Ray Train counts
the lost workers as a preemption, not a failure (`run.max_failures=0`), and resumes from the latest checkpoint on
the other node.
"""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from multinode import multinode_cluster  # noqa: F401
from test_multinode import (  # noqa: F401 (s3_inputs: a fixture)
    RUN_TIMEOUT_S,
    assert_resumed_and_complete,
    driver_query,
    overrides,
    pretrain,
    s3_inputs,
    train_run,
    wait_for_first_checkpoint,
)
from test_spot_watcher import FakeImds

# From the notice to the reclaim (whole seconds: up to one more); AWS gives about 120 s. Ray Train keeps the workers
# of a draining node training until then, so the rest of the run must outlast it for a restart to happen: after the
# first checkpoint (step 2) a step takes about a second and a checkpoint two on a busy 2-core machine.
DRAIN_WINDOW_S = 4
EPOCHS = 6  # 12 steps
WATCH_INTERVAL_S = 0.5
WATCHER_START_TIMEOUT_S = 120


def start_watcher(cluster, imds: FakeImds, log: Path, node_id: str | None) -> subprocess.Popen:
    """A spot watcher polling `imds` for node `node_id` (`--node-id`: the nodes share this machine)."""
    command = [sys.executable, "-m", "concerto_ray.spot_watcher", "--address", cluster.address]
    command += ["--imds-url", imds.url, "--interval", str(WATCH_INTERVAL_S)]
    command += ["--node-id", node_id] if node_id else []
    return subprocess.Popen(command, env=cluster.driver_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def node_state(cluster, node_id: str) -> dict:
    """The GCS's view of a node: its state and, once dead, why."""
    return driver_query(
        cluster,
        f"""
        import json, ray
        from ray._raylet import GcsClient
        from ray.core.generated.common_pb2 import NodeDeathInfo
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        ray.init(log_to_driver=False)
        infos = GcsClient(address=ray.get_runtime_context().gcs_address).get_all_node_info().values()
        (info,) = [info for info in infos if info.node_id.hex() == {node_id!r}]
        print(json.dumps({{
            "state": GcsNodeInfo.GcsNodeState.Name(info.state),
            "death": NodeDeathInfo.Reason.Name(info.death_info.reason),
            "message": info.death_info.reason_message,
        }}))
        """,
    )


@pytest.mark.slow
def test_a_spot_notice_drains_the_training_node_and_the_run_resumes_elsewhere(
    multinode_cluster,  # noqa: F811
    s3_inputs,  # noqa: F811
    s3_server,
    mlflow_server,
    tmp_path,
):
    # After s3_inputs: the nodes' Ray processes inherit this process's environment, S3 credentials included.
    cluster = multinode_cluster(workers=2, cpus_per_worker=2, dashboard=False)
    node_ids = [cluster.node_id(node.index) for node in cluster.nodes]
    # One watcher per worker node, each with its own instance metadata, as on AWS.
    imds = [FakeImds(notice_after=10**6) for _ in node_ids]
    watchers = [start_watcher(cluster, imds[i], tmp_path / f"watcher{i}.log", node_ids[i]) for i in range(2)]
    # Without --node-id, a watcher on a machine of several Ray nodes refuses to guess which one is its own.
    unnamed = start_watcher(cluster, imds[0], tmp_path / "watcher-unnamed.log", None)
    try:
        name = "mn-preempted"
        run_prefix = f"multinode-runs/{name}/"
        s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
        log = tmp_path / "driver.log"
        sets = [*overrides(s3_inputs, s3_server, mlflow_server, name), f"run.epochs={EPOCHS}", "run.max_failures=0"]
        # Ray Train polls the GCS's draining nodes every second instead of 5 (the controller passes it on).
        driver = pretrain(cluster, sets, log, RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="1")

        deadline = time.monotonic() + WATCHER_START_TIMEOUT_S
        while not all(fake.polls for fake in imds):
            assert all(watcher.poll() is None for watcher in watchers), "a spot watcher ended before any notice"
            assert time.monotonic() < deadline, "the spot watchers did not start polling"
            time.sleep(0.2)
        wait_for_first_checkpoint(driver, log, s3, s3_server.bucket, run_prefix)
        training = cluster.nodes_running("RayTrainWorker")
        assert training, "no worker node runs a training worker"
        preempted = training[0]
        noticed_at = datetime.datetime.now(datetime.timezone.utc)
        reclaim_at = datetime.datetime.fromtimestamp(
            math.ceil(noticed_at.timestamp()) + DRAIN_WINDOW_S, datetime.timezone.utc
        )
        imds[preempted].announce(reclaim_at)

        assert watchers[preempted].wait(timeout=60) == 0, (tmp_path / f"watcher{preempted}.log").read_text()
        assert "draining this node" in (tmp_path / f"watcher{preempted}.log").read_text()
        assert watchers[1 - preempted].poll() is None, "the other node's watcher ended without a notice"
        # On AWS the instance is reclaimed at the notice's time; here the drained node would live on (a drain only
        # stops new work on it), so the test reclaims it then, not before: it SIGKILLs the node, a lost machine to
        # Ray, whose GCS calls a draining node's death after its deadline a preemption.
        time.sleep(max(0.0, reclaim_at.timestamp() - time.time()))
        cluster.kill_node(preempted)

        assert driver.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
        assert unnamed.wait(timeout=60) != 0
        assert "3 Ray nodes run on this machine" in (tmp_path / "watcher-unnamed.log").read_text()
    finally:
        for watcher in [*watchers, unnamed]:
            watcher.kill()
            watcher.wait()
        for fake in imds:
            fake.server.shutdown()

    # The GCS recorded the drained node's death as the preemption the watcher announced.
    assert node_state(cluster, node_ids[preempted]) == {
        "state": "DEAD",
        "death": "AUTOSCALER_DRAIN_PREEMPTED",
        "message": f"spot interruption notice: terminate at {int(reclaim_at.timestamp() * 1000)} ms",
    }
    # Ray Train ended the first attempt at the reclaim and finished in a second one on the other node: it counted the
    # lost workers as a preemption (FailureConfig.max_preemption_failures), as with max_failures=0 a failure would
    # have ended the run.
    run = train_run(cluster, name)
    assert run["status"] == "FINISHED"
    first, second = run["attempts"]
    assert first["end_time_ns"] >= reclaim_at.timestamp() * 1e9, "the first attempt ended before the reclaim"
    assert node_ids[preempted] in first["node_ids"] and node_ids[preempted] not in second["node_ids"]
    assert second["status"] == "FINISHED"
    assert_resumed_and_complete(s3, s3_server.bucket, run_prefix, mlflow_server, noticed_at, EPOCHS)
