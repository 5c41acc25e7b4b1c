"""The training function each Ray Train worker runs.

Per optimizer step: set the weight decay and the model's schedules (mask, teacher temperature, EMA momentum) for
the step, run `grad_accumulation` micro-batches (forward under autocast, backward), clip, then either step
(optimizer, then the EMA teacher) or, if the loss or the gradient is non-finite on any worker, skip the update and
count it (too many in a row stop the run, or roll it back to its latest checkpoint: `run.on_nonfinite`). The lr
schedule advances either way, so the schedules stay tied to the data position. The step reads
back from the device once (`reduce_step`: the finiteness decision and every logged value), and `DevicePrefetch`
copies the next step's batches to the GPU while a step runs.

Every `checkpoint_every` steps, every `checkpoint_every_minutes` if set, and at the end, rank 0 saves the state
(`state.py`) and every worker calls `ray.train.report`; Ray Train uploads the checkpoint in the background
(`runtime.py`). A restarted worker resumes from `ray.train.get_checkpoint()`, and the stream from the first sample
of the interrupted epoch that the checkpoint's steps have not consumed (`StreamPosition`, set by rank 0 from the
checkpoint's progress before each epoch): no sample or optimizer step is repeated or skipped, and nothing consumed
is read again.
"""

from __future__ import annotations

import contextlib
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from concerto_ray.config import from_dict
from concerto_ray.console import post_progress
from concerto_ray.data import storage
from concerto_ray.data.pipeline import EpochReadAhead, batch_points, batch_samples, batch_to_device
from concerto_ray.data.sources import StreamPosition
from concerto_ray.model.build import build_ssl_model
from concerto_ray.model.concerto import Concerto
from concerto_ray.model.schedules import SslSchedules
from concerto_ray.model.sonata import Sonata
from concerto_ray.train.config import PretrainConfig
from concerto_ray.train.optim import build_optimizer, set_weight_decay, weight_decay_schedule
from concerto_ray.train.runtime import (
    CheckpointCadence,
    DevicePrefetch,
    NonFiniteGuard,
    NonFiniteLossError,
    clip_gradients,
    close_epoch,
    commit_metrics,
    epoch_steps,
    reduce_step,
    report_checkpoint,
    seed_draws,
    seed_model_init,
    wait_for_uploads,
    world_size,
)
from concerto_ray.train.state import CheckpointError, Progress, checkpoint_uri, load_checkpoint, save_checkpoint
from concerto_ray.train.tracking import StepMetrics, node_system_metrics
from concerto_ray.viz import FeatureImages

CHECKPOINT_DIR_FORMAT = "step-{:08d}"


def train_loop_per_worker(config_dict: dict) -> None:
    """`config_dict`: {"config": the PretrainConfig as a dict, "steps_per_epoch", "keep_short_batch",
    "stream_position": the training stream's `StreamPosition`, "tracking_uri", "mlflow_run_id", "progress": the
    driver's ProgressBoard or None}."""
    config = from_dict(PretrainConfig, config_dict["config"])
    tracking_uri, run_id = config_dict["tracking_uri"], config_dict["mlflow_run_id"]
    with node_system_metrics(tracking_uri, run_id, config.mlflow.system_metrics_interval_s):
        Worker(
            config,
            config_dict["steps_per_epoch"],
            tracking_uri,
            run_id,
            config_dict.get("progress"),
            keep_short_batch=config_dict["keep_short_batch"],
            stream_position=config_dict["stream_position"],
        ).run()


def build_training_model(config: PretrainConfig) -> Sonata | Concerto:
    """The model a worker trains, with the same initial weights on every worker."""
    seed_model_init(config.run.seed)
    model = build_ssl_model(config.model_config())
    # The student alone: the teacher runs without gradients, where there is nothing to recompute.
    model.student["backbone"].set_activation_checkpointing(config.model.activation_checkpointing)
    return model


class Worker:
    def __init__(
        self,
        config: PretrainConfig,
        steps_per_epoch: int,
        tracking_uri: str,
        mlflow_run_id: str,
        board: ray.actor.ActorHandle | None = None,
        *,
        keep_short_batch: bool,
        stream_position: StreamPosition,
    ):
        self.config = config
        self.stream_position = stream_position
        self.steps_per_epoch = steps_per_epoch
        self.keep_short_batch = keep_short_batch  # `train.config.keeps_short_batch`
        self.total_steps = steps_per_epoch * config.run.epochs
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

        model_config = config.model_config()
        ssl_model = build_training_model(config)
        self.model = ray.train.torch.prepare_model(
            ssl_model, parallel_strategy_kwargs={"find_unused_parameters": config.run.find_unused_parameters}
        )
        self.ssl_model = ssl_model  # the unwrapped module: schedules, EMA, state dict
        self.optimizer, self.scheduler = build_optimizer(
            ssl_model, config.optim, model_config.backbone.enc_depths, self.total_steps
        )
        self.weight_decay = weight_decay_schedule(config.optim, self.total_steps)
        self.schedules = SslSchedules.from_config(model_config, self.total_steps)

        checkpoint = ray.train.get_checkpoint()
        self.progress = Progress()
        if checkpoint is not None:
            self.progress = load_checkpoint(checkpoint, ssl_model, self.optimizer, self.scheduler)
            if self.scheduler.total_steps != self.total_steps:  # loading replaced it with the checkpoint's
                raise CheckpointError(
                    f"checkpoint {checkpoint_uri(checkpoint)} belongs to a run of {self.scheduler.total_steps} "
                    f"optimizer steps but this config plans {self.total_steps}: keep run.epochs and the global "
                    f"batch (run.num_workers x data.batch_size x optim.grad_accumulation) as they were when resuming"
                )
        self.metrics = StepMetrics(tracking_uri, mlflow_run_id) if self.rank == 0 else None
        # The teacher's features of one fixed scene at every checkpoint, so a run can be judged by eye in MLflow.
        source = config.data.source_configs()[0]
        self.feature_images = FeatureImages(
            source.shards,
            source.splits[0] if source.splits else None,
            config.data.endpoint_url,
            up_cast_levels=model_config.up_cast_level,
            feat_keys=config.data.pretrain.feat_keys,
        )
        self.board = board if self.rank == 0 else None  # the driver's progress bar
        self.run_dir = storage.resolve(config.run.run_uri, config.run.endpoint_url)
        self.nonfinite_guard = NonFiniteGuard(config.run.max_nonfinite_steps)
        self.rolled_back_to: int | None = None  # the step of the checkpoint the last rollback restored
        self.sample_names: list[tuple[int, list[str]]] = []  # run.log_sample_names: (step, names) since the last report
        self.cadence = CheckpointCadence(config.run.checkpoint_every, config.run.checkpoint_every_minutes, self.device)
        self.last_saved_step = self.progress.global_step

    def run(self) -> None:
        shard = ray.train.get_dataset_shard("train")
        accumulation = self.config.accumulation(world_size())  # more micro-batches when an elastic group is smaller
        step_started = time.perf_counter()
        last_metrics: dict[str, float] = {}
        epochs_left = self.config.run.epochs - self.progress.epoch
        first_epoch = self.progress.epoch
        # The global batch's samples are consumed in the plan's order (a streaming split hands them out in turn).
        consumed = self.progress.step_in_epoch * self.config.workers_batch()

        def set_position(index: int) -> None:  # this attempt's epoch `index`: the interrupted one reads on
            self.stream_position.set(first_epoch + index, consumed if index == 0 else 0)

        with EpochReadAhead(
            shard,
            self.config.data,
            epochs_left,
            drop_last=not self.keep_short_batch,
            before_epoch=set_position if self.rank == 0 else None,
        ) as reader:
            while self.progress.epoch < self.config.run.epochs:
                epoch = self.progress.epoch
                steps = epoch_steps(
                    reader.next_epoch(), accumulation, self.steps_per_epoch - self.progress.step_in_epoch
                )
                with DevicePrefetch(steps, self.device) as on_device:
                    for micro_batches, data_wait in on_device:
                        values = self.optimizer_step(micro_batches)
                        step_seconds = time.perf_counter() - step_started
                        step_started = time.perf_counter()
                        values.update(
                            points_per_s=values.pop("points") / step_seconds,
                            step_time_s=step_seconds,
                            data_wait_s=data_wait,
                            data_wait_fraction=data_wait / step_seconds,
                        )
                        self.progress.advance(self.steps_per_epoch)
                        if self.config.run.log_sample_names:
                            names = [name for batch in micro_batches for name in batch["name"]]
                            self.sample_names.append((self.progress.global_step, names))
                        last_metrics = values
                        if self.metrics is not None:
                            self.metrics.add(self.progress.global_step, values)
                        post_progress(
                            self.board,
                            self.progress.global_step,
                            loss=values["loss"],
                            points_per_s=values["points_per_s"],
                        )
                        if self.cadence.due(self.progress.global_step):
                            self.save_and_report(values)
                close_epoch(self.progress, epoch)
        if self.progress.global_step > self.last_saved_step:
            self.save_and_report(last_metrics)
        if self.metrics is not None:  # the MLflow run points at the final checkpoint once it is uploaded
            wait_for_uploads()
            commit_metrics(self.metrics, self.run_dir)

    def optimizer_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over `micro_batches`; returns its metrics (loss terms averaged over workers)."""
        step = self.progress.global_step  # 0-based index of this step
        # Masks and drop-path differ per worker and step, and derive from (seed, step, rank) alone.
        seed_draws(self.config.run.seed, step, self.rank)
        weight_decay = self.weight_decay(step)
        set_weight_decay(self.optimizer, weight_decay)
        schedule = self.schedules.at(step)
        self.ssl_model.set_schedule(schedule)
        self.optimizer.zero_grad(set_to_none=True)

        # Loss terms and the finiteness flag stay on the device until `reduce_step` reads them back once.
        names: list[str] = []
        terms: torch.Tensor | None = None  # float64, averaged over the micro-batches
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        points = samples = 0
        for index, batch in enumerate(micro_batches):
            with self.gradient_sync(last=index == len(micro_batches) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.run.amp == "bf16"):
                    # a no-op for DevicePrefetch's batches, already on the device
                    losses = self.model(batch_to_device(batch, self.device))
                loss = losses["loss"]
                (loss / len(micro_batches)).backward()
            nonfinite |= ~torch.isfinite(loss.detach())
            names = list(losses)
            values = torch.stack([v.detach().float() for v in losses.values()]).double() / len(micro_batches)
            terms = values if terms is None else terms + values
            points += batch_points(batch)
            samples += batch_samples(batch)

        grad_norm = clip_gradients(self.optimizer, self.config.optim.clip_grad)
        nonfinite |= ~torch.isfinite(grad_norm)
        total = reduce_step(
            nonfinite, terms[names.index("loss")], points, torch.cat([terms, grad_norm.reshape(1).double()])
        )
        logged = dict(zip(names, total.logged))
        logged["loss"] = total.loss / world_size()

        if total.nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
        else:
            self.optimizer.step()
            self.ssl_model.update_teacher()
        rolled_back = self.check_nonfinite_streak(total.nonfinite, step + 1)
        group = self.optimizer.param_groups[0]  # the parameters outside the encoder blocks, at the peak lr
        values = dict(
            logged,
            lr=group["lr"],
            weight_decay=weight_decay,
            adam_beta1=group["betas"][0],
            teacher_momentum=schedule.momentum,
            teacher_temp=schedule.teacher_temp,
            mask_size=schedule.mask_size,
            mask_ratio=schedule.mask_ratio,
            grad_norm=total.logged[-1],
            skipped_steps=self.progress.skipped_steps,
            epoch=self.progress.epoch,
            points=total.points,
            # the global batch (workers hold full batches alike): what an elastic run keeps at every size
            samples=samples * world_size(),
            points_imbalance=total.points_imbalance,
        )
        if rolled_back is not None:
            values["rolled_back_to_step"] = rolled_back
        self.scheduler.step()
        return values

    def check_nonfinite_streak(self, nonfinite: bool, step_number: int) -> int | None:
        """Count the step in the non-finite streak; at `run.max_nonfinite_steps` in a row, stop the run or (with
        `run.on_nonfinite: rollback`) restore the latest checkpoint's weights and optimizer moments and return its
        step. The schedules and the stream go on from here: the batches that gave non-finite steps are passed."""
        try:
            self.nonfinite_guard.record(nonfinite, step_number)
            return None
        except NonFiniteLossError as exc:
            if self.config.run.on_nonfinite == "stop":
                raise
            # The run's checkpoints, every upload complete (ray.train.get_checkpoint() names only the one this
            # attempt started from, and only on rank 0 the ones it reported since).
            reported = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
            )
            if not reported:
                raise NonFiniteLossError(f"{exc}; no checkpoint yet to roll back to") from exc
            latest = max(reported, key=lambda r: r.metrics["step"]).checkpoint
            restored = load_checkpoint(latest, self.ssl_model, self.optimizer, scheduler=None).global_step
            if restored == self.rolled_back_to:
                raise NonFiniteLossError(
                    f"{exc}, again after rolling back to the checkpoint of step {restored}"
                ) from exc
            self.rolled_back_to = restored
            self.nonfinite_guard.consecutive = 0
            return restored

    def log_sample_names(self, checkpoint_name: str) -> None:
        """Rank 0 logs every worker's sample names of the steps up to this checkpoint (a collective: every worker
        calls it). Steps redone after a restart are logged again with their checkpoint, over the same file."""
        steps, self.sample_names = self.sample_names, []
        every_worker = [steps]
        if world_size() > 1:
            every_worker = [None] * world_size()
            dist.all_gather_object(every_worker, steps)
        if self.metrics is not None:
            by_step = {step: [dict(worker)[step] for worker in every_worker] for step, _ in steps}
            self.metrics.client.log_dict(self.metrics.run_id, by_step, f"samples/{checkpoint_name}.json")

    def gradient_sync(self, last: bool):
        """DDP all-reduces gradients only on the last micro-batch of an accumulated step."""
        if isinstance(self.model, DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def save_and_report(self, values: dict[str, float]) -> None:
        name = CHECKPOINT_DIR_FORMAT.format(self.progress.global_step)
        report_checkpoint(
            name,
            dict(values, step=self.progress.global_step),
            lambda folder: save_checkpoint(
                folder, self.ssl_model, self.optimizer, self.scheduler, self.progress, self.config.model.name
            ),
        )
        self.last_saved_step = self.progress.global_step
        self.cadence.saved()
        if self.config.run.log_sample_names:
            self.log_sample_names(name)
        if self.metrics is not None:
            commit_metrics(self.metrics, self.run_dir)
            self.feature_images.log(
                self.metrics.client, self.metrics.run_id, self.ssl_model.teacher["backbone"], f"features/{name}"
            )
