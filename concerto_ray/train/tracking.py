"""MLflow bookkeeping: one MLflow run per training run, continued by restarts and by `--resume`.

The driver opens the MLflow run (params = the flattened config, the resolved config YAML as an artifact) and keeps
its id in the run folder (`mlflow_run.json`), where `--resume` finds it again. Rank 0 logs the per-step metrics
while training runs; a restart goes back to the last checkpoint and re-runs the steps after it, and those are not
logged a second time. One worker per node logs that node's system metrics.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import ray.train
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from concerto_ray.config import to_dict
from concerto_ray.data.storage import Location
from concerto_ray.errors import ConfigError
from concerto_ray.redact import redact

RUN_ID_FILE = "mlflow_run.json"
CHECKPOINT_TAG = "checkpoint"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def open_run(
    config: Any,
    run_name: str,
    experiment: str,
    tracking_uri: str,
    run_dir: Location,
    resume: bool,
    artifact_location: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """The id of the MLflow run of the training run in `run_dir`: a new one (a child of `parent_run_id` if given),
    or with `resume` the one it started with. `config` (a config dataclass) becomes its params and config.yaml."""
    client = MlflowClient(tracking_uri)
    logged = redact(to_dict(config))  # whoever reads the tracking server must not read credentials from it
    if resume:
        if not run_dir.exists(RUN_ID_FILE):
            raise ConfigError(
                f"cannot resume: {run_dir.uri_of(RUN_ID_FILE)} is missing, so the MLflow run of {run_name!r} is unknown"
            )
        run_id = json.loads(run_dir.read_bytes(RUN_ID_FILE))["run_id"]
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        experiment_id = experiment_id_of(client, experiment, artifact_location)
        tags = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else None
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in flatten(logged).items()]
        client.log_batch(run_id, params=params)
        run_dir.write_bytes(RUN_ID_FILE, json.dumps({"run_id": run_id}).encode())
    client.log_text(run_id, yaml.safe_dump(logged, sort_keys=False), "config.yaml")
    return run_id


def experiment_id_of(client: MlflowClient, experiment: str, artifact_location: str | None = None) -> str:
    """The id of the named experiment, created if it does not exist yet."""
    found = client.get_experiment_by_name(experiment)
    return (
        found.experiment_id
        if found is not None
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )


def close_run(tracking_uri: str, run_id: str, succeeded: bool) -> None:
    status = RunStatus.FINISHED if succeeded else RunStatus.FAILED
    MlflowClient(tracking_uri).set_terminated(run_id, status=RunStatus.to_string(status))


def log_skipped_samples(tracking_uri: str, run_id: str, messages: list[str]) -> None:
    """The samples the stream skipped as bad (data.skip_bad), one per line, so that none vanishes silently."""
    text = "\n".join(messages) + "\n" if messages else "no sample was skipped\n"
    MlflowClient(tracking_uri).log_text(run_id, text, "skipped_samples.txt")


def log_samples_per_epoch(tracking_uri: str, run_id: str, counts: dict[str, int]) -> None:
    """Each data source's samples per epoch, as metrics `samples_per_epoch/<source>` (the same every epoch)."""
    MlflowClient(tracking_uri).log_batch(
        run_id,
        metrics=[
            Metric(f"samples_per_epoch/{name}", float(n), int(time.time() * 1000), 0) for name, n in counts.items()
        ],
    )


class StepMetrics:
    """Rank 0's per-step metrics, sent to MLflow while training runs (at most every `flush_s` seconds, and at every
    checkpoint). Each (metric, step) is logged once per run: a worker restarted from a checkpoint re-runs the steps
    after it, and those an earlier attempt already logged are not logged again."""

    def __init__(self, tracking_uri: str, run_id: str, flush_s: float = 10.0):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_s = flush_s
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.logged_until: dict[str, int] = {}  # per metric, the last step logged by this run (any attempt)

    def add(self, step: int, values: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        for key, value in values.items():
            if step > self._logged_until(key):
                self.pending.append(Metric(key, float(value), timestamp, step))
                self.logged_until[key] = step
        if time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []
        self.last_flush = time.monotonic()

    def commit(self, checkpoint_uri: str) -> None:
        """Called once the checkpoint at `checkpoint_uri` is saved: log what is pending and point to it."""
        self.flush()
        self.client.set_tag(self.run_id, CHECKPOINT_TAG, checkpoint_uri)

    def _logged_until(self, key: str) -> int:
        if key not in self.logged_until:  # first use in this attempt: what earlier attempts logged
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_until[key] = max((m.step for m in history), default=0)
        return self.logged_until[key]


@contextlib.contextmanager
def node_system_metrics(tracking_uri: str, run_id: str, interval_s: float) -> Iterator[None]:
    """While the block runs, MLflow's system metrics of this node (CPU, memory, disk, network; GPU where pynvml
    finds one) as `system/node<N>/...` on the run: one worker per node (local rank 0) samples them."""
    context = ray.train.get_context()
    if interval_s <= 0 or context.get_local_rank() != 0:
        yield
        return
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=interval_s,
        node_id=f"node{context.get_node_rank()}",
        tracking_uri=tracking_uri,
        resume_logging=True,  # a restarted worker continues the steps of the attempt before it
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
