"""Start (or resume) a pre-training run on the connected Ray cluster: Ray Data stream -> TorchTrainer.

Ray Train keeps the run's state in `<storage_path>/<run.name>/`: the checkpoints (`step-NNNNNNNN/`, the newest
`run.checkpoints_to_keep`) and its own record of them, from which both a failure restart (`run.max_failures`) and
`resume=True` continue. Next to them `mlflow_run.json` names the run's MLflow run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from concerto_ray.config import to_dict
from concerto_ray.console import StageBar
from concerto_ray.data import storage
from concerto_ray.data.pipeline import BadSampleLog, StreamConfig, build_dataset, samples_per_epoch
from concerto_ray.data.sources import StreamPosition
from concerto_ray.errors import ConfigError
from concerto_ray.node_cache import check_config_reachable
from concerto_ray.train.config import (
    MlflowSection,
    PretrainConfig,
    RunSettings,
    keeps_short_batch,
    resolve_tracking_uri,
    steps_per_epoch,
)
from concerto_ray.train.loop import train_loop_per_worker
from concerto_ray.train.runtime import NonFiniteLossError
from concerto_ray.train.state import CheckpointError
from concerto_ray.train.tracking import RUN_ID_FILE, close_run, log_samples_per_epoch, log_skipped_samples, open_run

# Worker errors that explain themselves; `run_pretrain` raises them as they are instead of Ray's wrapper.
_CLEAR_WORKER_ERRORS = (CheckpointError, NonFiniteLossError)


def run_pretrain(config: PretrainConfig, resume: bool = False, show_progress: bool = False) -> ray.train.Result:
    """Train until `run.epochs` are done; with `resume`, continue the stopped run of the same `run.name`.
    `show_progress`: a progress bar of the optimizer steps on stderr and a summary line (the CLI's, the demo's)."""
    run = config.run
    tracked = start_tracked_run(config, run, config.mlflow, resume)
    log_samples_per_epoch(tracked.tracking_uri, tracked.mlflow_run_id, samples_per_epoch(config.data))
    bad_log = BadSampleLog.remote() if config.data.skip_bad else None
    total_steps = steps_per_epoch(config) * run.epochs
    position = StreamPosition()
    # A model without Concerto's 2D-3D term reads no camera frames: the stream then reads, decodes and views none.
    frames = config.model_config().reads_frames()
    with StageBar("pre-training", total_steps, enabled=show_progress) as bar:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": to_dict(config),
                "steps_per_epoch": steps_per_epoch(config),
                "keep_short_batch": keeps_short_batch(config),
                "stream_position": position,
                "tracking_uri": tracked.tracking_uri,
                "mlflow_run_id": tracked.mlflow_run_id,
                "progress": bar.board,
            },
            scaling_config=scaling_config(run),
            run_config=ray_run_config(run, ray.train.CheckpointConfig(num_to_keep=run.checkpoints_to_keep)),
            datasets={
                "train": build_dataset(config.data, bad_log, workers=run.num_workers, position=position, frames=frames)
            },
            dataset_config=ray.train.DataConfig(execution_options={"train": ingest_options(config.data)}),
        )
        result = fit(trainer, tracked, _CLEAR_WORKER_ERRORS)
    if show_progress:
        print(bar.summary())
    if bad_log is not None:
        log_skipped_samples(tracked.tracking_uri, tracked.mlflow_run_id, ray.get(bad_log.get.remote()))
    close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=True)
    return result


def ingest_options(data: StreamConfig) -> ray.data.ExecutionOptions:
    """Ray Data's options for a training stream. Ray Train replaces a dataset's own execution options with these
    (by default: the driver's global ones), so `data.preserve_order` has to be passed here to take effect."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = data.preserve_order
    return options


@dataclass(frozen=True)
class TrackedRun:
    run_dir: storage.Location  # <storage_path>/<name>/
    tracking_uri: str
    mlflow_run_id: str


def start_tracked_run(
    config: Any, run: RunSettings, mlflow: MlflowSection, resume: bool, parent_run_id: str | None = None
) -> TrackedRun:
    """Check that the run folder is new (or, with `resume`, started) and open the run's MLflow run in it."""
    check_config_reachable(to_dict(config))  # on a multi-node cluster, workers cannot read the driver's local paths
    run_dir = storage.resolve(run.run_uri, run.endpoint_url)
    started = run_dir.exists(RUN_ID_FILE)
    if resume and not started:
        raise ConfigError(f"cannot resume run {run.name!r}: nothing was started at {run_dir.uri}")
    if started and not resume:
        raise ConfigError(
            f"run {run.name!r} already exists at {run_dir.uri}: resume it (--resume) or choose another run name"
        )
    local = isinstance(run_dir.filesystem, pafs.LocalFileSystem)
    if local:
        run_dir.filesystem.create_dir(run_dir.root, recursive=True)
    tracking_uri = resolve_tracking_uri(mlflow, run_dir.root if local else None)
    # Also when it comes from $MLFLOW_TRACKING_URI: the workers log to it, and a file there is on one machine only.
    check_config_reachable({"mlflow": {"tracking_uri": tracking_uri}})
    uses_default_store = local and tracking_uri.startswith(f"sqlite:///{run_dir.root}")
    run_id = open_run(
        config,
        run.name,
        mlflow.experiment,
        tracking_uri,
        run_dir,
        resume,
        artifact_location=run_dir.path("mlflow-artifacts") if uses_default_store else None,
        parent_run_id=parent_run_id,
    )
    return TrackedRun(run_dir, tracking_uri, run_id)


def scaling_config(run: RunSettings) -> ray.train.ScalingConfig:
    """Ray Train's workers: `run.num_workers`, or an elastic group of `run.min_workers` to `run.num_workers`."""
    return ray.train.ScalingConfig(
        num_workers=run.num_workers if run.min_workers is None else (run.min_workers, run.num_workers),
        elastic_resize_monitor_interval_s=run.resize_check_s,
        use_gpu=run.use_gpu,
        accelerator_type=run.accelerator_type,
        resources_per_worker={"CPU": run.cpus_per_worker},
    )


def ray_run_config(
    run: RunSettings, checkpoint_config: ray.train.CheckpointConfig, callbacks: Sequence[ray.train.UserCallback] = ()
) -> ray.train.RunConfig:
    """Ray Train's state and checkpoints in `<storage_path>/<name>/`, on the local filesystem or S3."""
    storage_root = storage.resolve(run.storage_path, run.endpoint_url)
    return ray.train.RunConfig(
        name=run.name,
        storage_path=storage_root.root,
        storage_filesystem=storage_root.filesystem,
        checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        callbacks=list(callbacks),
    )


def fit(
    trainer: TorchTrainer, tracked: TrackedRun, clear_errors: tuple[type[BaseException], ...] = _CLEAR_WORKER_ERRORS
) -> ray.train.Result:
    """`trainer.fit()`, marking the MLflow run failed if it fails. A worker error of a `clear_errors` type is
    raised as it is, instead of inside Ray's wrapper."""
    try:
        return trainer.fit()
    except BaseException as exc:
        close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=False)
        failures = exc.worker_failures.values() if isinstance(exc, ray.train.WorkerGroupError) else ()
        clear = next((error for error in failures if isinstance(error, clear_errors)), None)
        if clear is not None:
            raise clear from exc
        raise
