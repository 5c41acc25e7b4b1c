"""Ray Tune sweeps of fine-tuning runs: each trial is a distributed `run_finetune` (a TorchTrainer of its own).

A sweep YAML (`SweepConfig`) names the fine-tuning configs its trials start from (a grid dimension when there are
several), fixed `overrides` and a search `space`, both keyed by field paths of `FinetuneConfig` (`lr`, `lora.r`,
`data_efficiency.label_budget`, ...). Each dimension is one of

    grid: [values]          every value, crossed with the other grid dimensions (Tune's grid_search)
    choice: [values]        one value drawn per sample
    uniform: [low, high]
    loguniform: [low, high]

Following Ray's pattern for Tune with Train V2, the Tune trainable is a function that builds the trial's run and
launches its TorchTrainer, whose reports reach Tune through `TuneReportCallback`; ASHA stops weak trials on val
mIoU after each evaluation round. MLflow gets one parent run for the sweep and a child run per trial; the best
trial's values, metrics and checkpoint go on the parent and are returned.

Failures, as Ray documents Train inside Tune: each trial's TorchTrainer restarts its own workers after a worker
failure (`run.max_failures`), and Tune runs a failed trial again (`max_trial_failures`: its driver died, or its
fine-tuning failed beyond `run.max_failures`). A trial run again continues its own fine-tuning run: the same
folder `trial-<id>/`, from which Ray Train restores the latest checkpoint, and the same MLflow child run. A stopped
sweep (its driver killed, Ctrl+C, a lost head node) continues with `resume=True`: Tune restores the experiment from
`<storage_path>/<name>/tune/`, keeps the trials that ended, continues the unfinished and errored ones in the same way,
and the sweep's MLflow parent run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
import yaml
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from concerto_ray.config import find_config, from_dict, to_dict
from concerto_ray.console import TrialBar
from concerto_ray.data import storage
from concerto_ray.data.shards import read_shards
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.run_config import (
    FINETUNE_EXPERIMENT,
    FinetuneData,
    FinetuneRun,
    load_finetune_run,
    plan_finetune,
)
from concerto_ray.finetune.trainer import ROUNDS_KEY, SCORE, run_finetune
from concerto_ray.spot_watcher import on_demand_placement
from concerto_ray.train.config import (
    MlflowSection,
    RunSettings,
    absolute_uri,
    apply_overrides,
    check_storage,
)
from concerto_ray.train.tracking import RUN_ID_FILE, close_run
from concerto_ray.train.trainer import start_tracked_run

CONFIG_KEY = "config"  # the trial's starting fine-tuning config, next to the searched field paths
# Tune needs a non-empty resource request per trial; the trial function only waits on its TorchTrainer, whose
# workers hold the CPUs.
TRIAL_DRIVER_CPUS = 0.01
TUNE_DIR = "tune"  # Ray Tune's experiment folder inside the sweep's folder


@dataclass
class SearchDimension:
    """Exactly one of the four."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    def __post_init__(self):
        given = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ConfigError(f"{given[0]}: needs at least one value")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] > bounds[1]:
                raise ConfigError(f"{name}: low {bounds[0]} is above high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ConfigError(f"loguniform: bounds must be > 0, got {list(self.loguniform)}")

    def probe_values(self) -> list[Any]:
        """Values that stand for the dimension when a trial config is checked: all listed ones, or the bounds."""
        values = self.grid if self.grid is not None else self.choice
        return list(values) if values is not None else list(self.uniform or self.loguniform)

    def tune_domain(self) -> Any:
        if self.grid is not None:
            return ray.tune.grid_search(self.grid)
        if self.choice is not None:
            return ray.tune.choice(self.choice)
        if self.uniform is not None:
            return ray.tune.uniform(*self.uniform)
        return ray.tune.loguniform(*self.loguniform)


@dataclass
class AshaSettings:
    """Asynchronous successive halving over evaluation rounds (Tune's training_iteration)."""

    grace_period: int = 1  # rounds every trial runs before it may be stopped
    reduction_factor: float = 2.0

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError(
                f"asha needs grace_period >= 1 and reduction_factor > 1, got {self.grace_period} and "
                f"{self.reduction_factor}"
            )


@dataclass
class SweepConfig:
    configs: list[str]  # fine-tuning configs (names or paths) the trials start from; several: a grid dimension
    data: FinetuneData
    run: RunSettings  # run.name names the sweep; trial i fine-tunes in <storage_path>/<name>/trial-<id>/
    overrides: dict[str, Any] = field(default_factory=dict)  # field path -> value, for every trial
    space: dict[str, SearchDimension] = field(default_factory=dict)  # field path -> dimension
    num_samples: int = 1  # draws of the space (each grid combination is run num_samples times)
    max_concurrent_trials: int = 1
    asha: AshaSettings | None = field(default_factory=AshaSettings)  # null: every trial runs to the end
    mlflow: MlflowSection = field(default_factory=lambda: MlflowSection(experiment=FINETUNE_EXPERIMENT))
    # How often Tune runs a failed trial again, each time continuing that trial's fine-tuning from its latest
    # checkpoint; -1: without limit. A worker failure is first retried inside the trial (run.max_failures).
    max_trial_failures: int = 2

    def __post_init__(self):
        if not self.configs:
            raise ConfigError("configs: name at least one fine-tuning config")
        if self.max_trial_failures < -1:
            raise ConfigError(f"max_trial_failures must be >= -1 (-1: unlimited), got {self.max_trial_failures}")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ConfigError(
                f"num_samples and max_concurrent_trials must be >= 1, got {self.num_samples} and "
                f"{self.max_concurrent_trials}"
            )
        reserved = [key for key in (*self.overrides, *self.space) if key == CONFIG_KEY]
        if reserved:
            raise ConfigError(f"{CONFIG_KEY!r} is not a field path; list starting configs under `configs`")


@dataclass(frozen=True)
class SweepResult:
    best_trial: str  # Tune's trial id
    best_values: dict[str, Any]  # the starting config and the searched field paths' values
    best_metrics: dict[str, float]  # val_miou, val_macc, val_all_acc of the best round
    best_checkpoint: str
    parent_run_id: str
    trials: int

    def summary(self) -> str:
        lines = [f"best of {self.trials} trials: {self.best_trial}"]
        lines += [f"  {key} = {value}" for key, value in self.best_values.items()]
        lines += [f"  {key} = {value:.4f}" for key, value in self.best_metrics.items()]
        lines.append(f"  checkpoint: {self.best_checkpoint}")
        lines.append(f"  MLflow parent run: {self.parent_run_id}")
        return "\n".join(lines)


def load_sweep_config(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """A sweep YAML with `dotted.key=value` overrides, every trial config it can produce checked (no Ray yet)."""
    path = find_config(path, "sweep")
    try:
        sweep = from_dict(SweepConfig, apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides))
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    sweep.run.storage_path = absolute_uri(sweep.run.storage_path)
    check_storage(sweep.run, sweep.mlflow)
    for config in sweep.configs:
        run = trial_run(sweep, config, {}, "check")
        if not run.finetune.evaluate:
            raise ConfigError(f"configs: {config} has evaluate: false, but a sweep ranks its trials by {SCORE}")
        plan_finetune(run)  # the data, storage and files, once per config
        for key, dimension in sweep.space.items():
            for value in dimension.probe_values():
                try:
                    trial_run(sweep, config, {key: value}, "check")
                except ConfigError as exc:
                    raise ConfigError(f"space.{key}: the value {value!r} gives an invalid config: {exc}") from exc
    return sweep


def trial_run(sweep: SweepConfig, config: str, values: dict[str, Any], name: str) -> FinetuneRun:
    """The fine-tuning run of one trial: `config` with the sweep's overrides and the trial's `values`, in the
    sweep's folder, with the sweep's data and MLflow settings."""
    run = RunSettings(**{**to_dict(sweep.run), "name": name, "storage_path": sweep.run.run_uri})
    sections = {"data": to_dict(sweep.data), "run": to_dict(run), "mlflow": to_dict(sweep.mlflow)}
    overrides = {**dotted(sweep.overrides), **values, **dotted(sections)}
    return load_finetune_run(config, overrides)


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, so that an override sets single fields, not whole sections."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(sweep: SweepConfig) -> None:
    """That the sweep's folder holds a Tune experiment to continue. Reads storage only: the CLI checks it before
    Ray starts."""
    sweep_dir = storage.resolve(sweep.run.run_uri, sweep.run.endpoint_url)
    if not ray.tune.Tuner.can_restore(sweep_dir.path(TUNE_DIR), storage_filesystem=sweep_dir.filesystem):
        raise ConfigError(
            f"cannot resume sweep {sweep.run.name!r}: no Ray Tune experiment at {sweep_dir.uri_of(TUNE_DIR)}"
        )


def run_sweep(sweep: SweepConfig, resume: bool = False, show_progress: bool = False) -> SweepResult:
    """Run every trial of the sweep on the connected Ray cluster; the best trial by val mIoU. `resume`: continue
    the stopped sweep of the same `run.name` (trials that ended are not run again). `show_progress`: a progress
    bar of the trials on stderr (the CLI's) instead of Tune's status tables, which are never shown; a resumed
    sweep keeps the choice it was started with (Tune restores its callbacks)."""
    if resume:
        check_resumable(sweep)
    if sweep.data.verify_checksums:
        splits = {split for config in sweep.configs for split in _splits(sweep, config)}
        read_shards(
            sweep.data.shards, splits=sorted(splits), endpoint_url=sweep.data.endpoint_url, verify=True, scenes=True
        )
    tracked = start_tracked_run(sweep, sweep.run, sweep.mlflow, resume=resume)
    # Trials log where the parent does, whatever their own default would be.
    sweep.mlflow.tracking_uri = tracked.tracking_uri
    sweep_dir = storage.resolve(sweep.run.run_uri, sweep.run.endpoint_url)
    trainable = ray.tune.with_resources(  # not on spot nodes
        ray.tune.with_parameters(run_trial, sweep=to_dict(sweep), parent_run_id=tracked.mlflow_run_id),
        on_demand_placement(TRIAL_DRIVER_CPUS),
    )
    if resume:
        # The search space, scheduler and callbacks are the ones the sweep started with. Errored trials continue
        # (resume_errored) rather than restart: a restart would give them new trial ids, hence new fine-tuning
        # runs from scratch next to the old ones.
        tuner = ray.tune.Tuner.restore(
            sweep_dir.path(TUNE_DIR),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=sweep_dir.filesystem,
        )
    else:
        tuner = new_tuner(sweep, trainable, sweep_dir, show_progress)
    try:
        grid = tuner.fit()
        result = _best(grid, sweep, tracked.mlflow_run_id)
    except BaseException:
        _close_trial_runs(tracked.tracking_uri, tracked.mlflow_run_id, stopped=set())
        close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=False)
        raise
    stopped = {_trial_run_name(trial.metrics["trial_id"]) for trial in grid if trial.error is None and trial.metrics}
    _close_trial_runs(tracked.tracking_uri, tracked.mlflow_run_id, stopped)
    client = MlflowClient(tracked.tracking_uri)
    for key, value in result.best_metrics.items():
        client.log_metric(tracked.mlflow_run_id, f"best_{key}", value)
    client.set_tag(tracked.mlflow_run_id, "best_trial", result.best_trial)
    client.set_tag(tracked.mlflow_run_id, "best_checkpoint", result.best_checkpoint)
    client.log_text(tracked.mlflow_run_id, yaml.safe_dump(result.best_values, sort_keys=False), "best_trial.yaml")
    close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=True)
    return result


class LastRoundPassesASHA(ASHAScheduler):
    """ASHA that never stops a trial at its own last round (its score still counts at that rung for the trials with
    more rounds). By then the trial has trained and run its test, and a stop would only race its ending: Tune would
    kill it while it logs its best round and closes its MLflow run. Plain ASHA stops there whenever the last round
    is a rung (grace_period * reduction_factor**k) and scores below the earlier trials', and the trial ends KILLED."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if ROUNDS_KEY in result and result.get("round", 0) >= result[ROUNDS_KEY]:
            return TrialScheduler.CONTINUE
        return action


def new_tuner(sweep: SweepConfig, trainable: Any, sweep_dir: storage.Location, show_progress: bool) -> ray.tune.Tuner:
    """The sweep's Tuner, its experiment in `<sweep folder>/tune/`."""
    param_space = {key: dimension.tune_domain() for key, dimension in sweep.space.items()}
    param_space[CONFIG_KEY] = ray.tune.grid_search(sweep.configs)
    scheduler = (
        LastRoundPassesASHA(
            time_attr="training_iteration",
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
            max_t=_max_rounds(sweep) + 1,  # never reached: a last round is a rung like the others, not a stop
        )
        if sweep.asha is not None
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=SCORE,
            mode="max",
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=sweep_dir.root,
            storage_filesystem=sweep_dir.filesystem,
            failure_config=ray.tune.FailureConfig(max_failures=sweep.max_trial_failures),
            verbose=0,
            callbacks=[TrialBar(SCORE)] if show_progress else None,
        ),
    )


def run_trial(values: dict[str, Any], sweep: dict, parent_run_id: str) -> None:
    """The Tune trainable: one fine-tuning run, reporting each evaluation round to Tune."""
    sweep_config = from_dict(SweepConfig, sweep)
    values = dict(values)
    config = values.pop(CONFIG_KEY)
    run = trial_run(sweep_config, config, values, _trial_run_name(ray.tune.get_context().get_trial_id()))
    # run_sweep verified the shards once; the check's tasks would not fit this trial's tiny resource request.
    run.data.verify_checksums = False
    # Tune runs a trial again after a failure, and when a stopped sweep resumes. The trial's fine-tuning run then
    # exists (it is named by the trial id): continue it, from its latest checkpoint and in its MLflow child run.
    started = storage.resolve(run.run.run_uri, run.run.endpoint_url).exists(RUN_ID_FILE)
    run_finetune(run, resume=started, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])


def _splits(sweep: SweepConfig, config: str) -> tuple[str, ...]:
    finetune = trial_run(sweep, config, {}, "check").finetune
    return (*finetune.train_split, *finetune.val_split, *finetune.test_splits)


def _max_rounds(sweep: SweepConfig) -> int:
    """The most evaluation rounds any trial can have (ASHA's max_t)."""
    rounds = [trial_run(sweep, config, {}, "check").finetune.eval_epochs for config in sweep.configs]
    if "eval_epochs" in sweep.space:
        rounds += sweep.space["eval_epochs"].probe_values()
    return int(max(rounds))


def _best(grid: ray.tune.ResultGrid, sweep: SweepConfig, parent_run_id: str) -> SweepResult:
    rows = []
    for trial in grid:
        if trial.metrics_dataframe is not None and SCORE in trial.metrics_dataframe:
            rows += [(row, trial) for _, row in trial.metrics_dataframe.iterrows()]
    if not rows:
        errors = [str(trial.error) for trial in grid if trial.error is not None]
        raise RuntimeError(
            f"no trial of sweep {sweep.run.name!r} finished an evaluation round"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    row, trial = max(rows, key=lambda pair: pair[0][SCORE])
    values = {key: trial.config[key] for key in (CONFIG_KEY, *sweep.space)}
    metrics = {key: float(row[key]) for key in ("val_miou", "val_macc", "val_all_acc")}
    # Ray reports filesystem paths (bucket/prefix on S3); users get URIs.
    checkpoint = storage.resolve(sweep.run.storage_path, sweep.run.endpoint_url).uri_of_path(row[CHECKPOINT_PATH_KEY])
    return SweepResult(
        best_trial=trial.metrics["trial_id"],
        best_values=values,
        best_metrics=metrics,
        best_checkpoint=checkpoint,
        parent_run_id=parent_run_id,
        trials=len(grid),
    )


def _trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _close_trial_runs(tracking_uri: str, parent_run_id: str, stopped: set[str]) -> None:
    """Mark KILLED the child runs of trials that did not end by themselves: those still RUNNING (Tune ended the
    trial's process) and those that FAILED only because the scheduler stopped them (`stopped`: the run names of
    trials that Tune saw end without an error)."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}' and attributes.status != 'FINISHED'",
    )
    for child in children:
        if child.info.status == "RUNNING" or (child.info.status == "FAILED" and child.info.run_name in stopped):
            client.set_terminated(child.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
