"""A real multi-node Ray cluster on one machine, for tests: a head node and worker nodes, each its own `ray start`.

    from multinode import MultiNodeCluster   # tests/ is on sys.path under pytest

    with MultiNodeCluster(tmp_path, workers=2, cpus_per_worker=2) as cluster:
        subprocess.run(["concerto-ray", "pretrain", ...], env=cluster.driver_env(), check=True)
        cluster.kill_node(0)             # SIGKILL node 0: its raylet, its Ray workers and agents, all at once
        cluster.add_node()               # a fresh worker node; returns its index
        cluster.nodes[1].cache           # that node's $CONCERTO_RAY_CACHE

or the `multinode_cluster` fixture (a factory taking the same arguments; every cluster it made is shut down after the
test): `from multinode import multinode_cluster  # noqa: F401` in a test module makes it available there.

`MultiNodeCluster(root, workers=2, cpus_per_worker=2, env=None, dashboard=True)`:
- `root`: a folder for the nodes' logs and caches (a test's `tmp_path`);
- the head offers no CPUs (as cluster.yaml's head), so tasks, actors and training workers run on the worker nodes;
  only what asks for no CPU (Ray Train's controller, a driver's zero-CPU actors) runs there;
- every worker node has `cpus_per_worker` CPUs, its own Ray temp folder (`ray start --temp-dir` may differ per node:
  its session folder, sockets, logs and spill files are then really separate) and its own
  `CONCERTO_RAY_CACHE=<root>/node<i>/cache` (concerto_ray.node_cache), so node-local caches are separate;
- `env`: extra environment variables of every node's Ray processes (hence of the tasks and actors they run);
- `dashboard`: start the head's dashboard (Ray Train frees a stopped Tune trial's workers through its state API).
Attributes and methods: `address` (the GCS address, `RAY_ADDRESS` of a driver), `dashboard_url`, `nodes` (the
worker nodes, `WorkerNode`: `.index`, `.cache`, `.alive`), `driver_env(**extra)` (this process's environment
pointed at the cluster, for a driver in a subprocess: a process can join only one Ray cluster, and the test process
holds conftest's local one), `add_node(cpus=None)`, `kill_node(i)`, `nodes_running(title)` (the worker nodes running a
process of that title, e.g. "RayTrainWorker"), `node_id(i)` (Ray's hex id of worker node i), `shutdown()`.

Each node is one `ray start --block` in a process group of its own: Ray starts the node's processes (raylet, agents,
log monitor) in the group of `ray start` and ties them to its life (kernel fate sharing); the raylet starts its Ray
workers in groups of their own. So `kill_node` SIGKILLs that group and every process under `ray start`: exactly that
node, abruptly, as a lost machine. Every port is chosen free,
so the cluster shares the machine with other Ray instances (conftest's, other tests'); `ray stop` is never used, as it
stops every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180  # `ray start` on a loaded 2-core machine
STARTED = "Ray runtime started."  # printed by `ray start` once its node is registered with the GCS

# A dead node is noticed by the GCS after health_check_failure_threshold missed checks of health_check_period_ms
# (default 5 x 3 s); checks every second keep a killed node's detection, and so a failure test, short.
HEAD_SYSTEM_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_ports(*names: str) -> list[str]:
    # The defaults of several of these are fixed numbers, held by whichever Ray on the machine started first.
    return [f"--{name}={free_port()}" for name in names]


@dataclass
class WorkerNode:
    index: int
    cache: Path  # its $CONCERTO_RAY_CACHE
    process: subprocess.Popen  # `ray start --block`, leader of the node's process group
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class MultiNodeCluster:
    """A head and `workers` worker nodes on 127.0.0.1 (see the module's docstring)."""

    def __init__(
        self,
        root: Path,
        workers: int = 2,
        cpus_per_worker: float = 2,
        env: dict[str, str] | None = None,
        dashboard: bool = True,
    ):
        self.root = Path(root)
        self.cpus_per_worker = cpus_per_worker
        # Ray's temp folders hold Unix sockets, whose paths may not exceed 107 bytes: a short folder in /tmp, not the
        # test's deep tmp_path.
        self._temp = Path(tempfile.mkdtemp(prefix="ray-mn-"))
        # Token authentication, as on a real cluster (cluster.yaml): `ray start --head` turns it on by default, and
        # every node and driver must then carry the cluster's token.
        self._auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        # RAY_ADDRESS: a node started from a process that joined another cluster (the test's) must not follow it.
        self._env = {**os.environ, **(env or {}), **self._auth, "RAY_ADDRESS": ""}
        self._head: subprocess.Popen | None = None
        self.nodes: list[WorkerNode] = []
        gcs_port = free_port()
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = None
        try:
            dashboard_args = ["--include-dashboard=false"]
            if dashboard:
                dashboard_port = free_port()
                self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
                dashboard_args = [
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                ]
            self._head = self._start(
                "head",
                [
                    "--head",
                    f"--port={gcs_port}",
                    "--num-cpus=0",
                    *dashboard_args,
                    *_own_ports("ray-client-server-port"),
                ],
                HEAD_SYSTEM_ENV,
            )
            for _ in range(workers):
                self.add_node()
        except BaseException:
            self.shutdown()
            raise

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        """`ray start --block` of one node, returned once the node is registered."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "ray-start.log"
        process = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={self._temp / name}",
                "--disable-usage-stats",
                *_own_ports(
                    "node-manager-port",
                    "object-manager-port",
                    "metrics-export-port",
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                ),
                *args,
            ],
            env={**self._env, **env},
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the node's own process group: see the module's docstring
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                _kill_node(process)
                raise RuntimeError(f"Ray node {name} did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        return process

    def add_node(self, cpus: float | None = None) -> int:
        """Start one more worker node (`cpus`, default `cpus_per_worker`); returns its index in `nodes`."""
        index = len(self.nodes)
        name = f"node{index}"
        cache = self.root / name / "cache"
        process = self._start(
            name,
            [f"--address={self.address}", f"--num-cpus={self.cpus_per_worker if cpus is None else cpus}"],
            {"CONCERTO_RAY_CACHE": str(cache)},
        )
        self.nodes.append(WorkerNode(index, cache, process, self.root / name / "ray-start.log"))
        return index

    def kill_node(self, index: int) -> None:
        """SIGKILL worker node `index` whole: its raylet, the Ray workers it started, its agents."""
        _kill_node(self.nodes[index].process)

    def nodes_running(self, title: str) -> list[int]:
        """The alive worker nodes with a process whose title contains `title` (a Ray worker's is `ray::<actor or
        task name>...`, e.g. "RayTrainWorker" for Ray Train's workers)."""
        found = []
        for node in self.nodes:
            if node.alive:
                try:
                    processes = psutil.Process(node.process.pid).children(recursive=True)
                except psutil.NoSuchProcess:  # it has just died
                    continue
                if any(title in " ".join(_cmdline(process)) for process in processes):
                    found.append(node.index)
        return found

    def node_id(self, index: int) -> str:
        """Ray's hex id of worker node `index`, from its raylet's command line (`--node_id=`): the nodes of one
        machine share its IP, so only their processes tell them apart."""
        for process in psutil.Process(self.nodes[index].process.pid).children(recursive=True):
            for arg in _cmdline(process):
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
        raise LookupError(f"worker node {index} runs no raylet")

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment for a driver in a subprocess that joins this cluster."""
        return {**os.environ, **self._auth, "RAY_ADDRESS": self.address, **extra}

    def shutdown(self) -> None:
        """Kill every node. SIGKILL, not `ray start`'s SIGTERM: on SIGTERM a node first tries to drain for up to
        30 s, and nothing of the cluster is kept anyway."""
        for process in [node.process for node in self.nodes] + ([self._head] if self._head else []):
            _kill_node(process)
        shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:  # ended while listed
        return []


def _kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node's `ray start --block` process group and every process under it: the raylet starts its Ray
    workers in process groups of their own, so the group alone would leave them to exit when they notice."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # already gone
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the raylet first, so that it starts no worker after the listing
    except ProcessLookupError:  # the group is already empty
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


@pytest.fixture
def multinode_cluster(tmp_path):
    """A factory of `MultiNodeCluster`s (same arguments but `root`, which is this test's tmp_path/cluster<N>); each
    is shut down after the test."""
    clusters: list[MultiNodeCluster] = []

    def start(**kwargs) -> MultiNodeCluster:
        clusters.append(MultiNodeCluster(tmp_path / f"cluster{len(clusters)}", **kwargs))
        return clusters[-1]

    yield start
    for cluster in clusters:
        cluster.shutdown()
