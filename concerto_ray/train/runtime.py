"""What every training worker does around its optimizer step, shared by pre-training (`loop.py`) and fine-tuning
(`concerto_ray.finetune.trainer`). Each piece has one job; a worker's loop is a thin sequence of them:

    seeding            `seed_model_init` (the same initial weights on every worker), `seed_draws` (the random draws
                       of a step or attempt, derived from the run's seed and where training is)
    gradients          `clip_gradients`, `agree_across_workers` (one all-reduce: whether any worker's step was
                       non-finite, plus sums), `reduce_step` (the same and the step's logged values, from device
                       tensors with one device-to-host copy), `NonFiniteGuard` (too many skipped steps in a row stop
                       the run)
    epochs             `epoch_steps` (an epoch's optimizer steps, from where the run stands in it),
                       `DevicePrefetch` (each step's batches pinned and copied to the GPU while the step before
                       runs), `close_epoch` (an epoch whose stream ended early still counts as done)
    checkpoints        `CheckpointCadence` (every N steps and/or every M minutes, the same decision on every
                       worker), `report_checkpoint` (rank 0 saves, Ray Train uploads in the background),
                       `wait_for_uploads`, `commit_metrics` (MLflow: pending step metrics, newest checkpoint)

Checkpoints are uploaded with Ray Train's `CheckpointUploadMode.ASYNC`: `ray.train.report` returns as soon as rank 0
has written the state to a local folder, and Ray Train's upload thread copies it to `run.storage_path` and then
deletes it. Ray Train records a checkpoint only once its upload is complete, so a restart or `--resume` always
continues from the last complete one; one still uploading when a worker dies is never resumed from.
"""

from __future__ import annotations

import itertools
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from concerto_ray.data.pipeline import put_unless_stopped
from concerto_ray.data.storage import Location
from concerto_ray.errors import TrainingError
from concerto_ray.train.state import Progress
from concerto_ray.train.tracking import StepMetrics

# ------------------------------------------------------------------------------------------------------- seeding


def seed_model_init(seed: int) -> None:
    """Seed torch before the model is built: every worker starts from the same initial weights."""
    torch.manual_seed(seed)


def seed_draws(*entropy: int) -> np.random.SeedSequence:
    """Seed torch's generator (masks, drop path) from `entropy` (the run's seed and where training is: step, rank),
    so that a run of a seed, resumed or not, draws the same; the sequence seeds any numpy generator as well."""
    sequence = np.random.SeedSequence(list(entropy))
    torch.manual_seed(int(sequence.generate_state(1)[0]))
    return sequence


# ----------------------------------------------------------------------------------------------------- gradients


class NonFiniteLossError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts consecutive optimizer steps skipped for a non-finite loss or gradient; too many stop the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0

    def record(self, nonfinite: bool, step_number: int) -> None:
        self.consecutive = self.consecutive + 1 if nonfinite else 0
        if self.consecutive >= self.limit:
            first = step_number - self.consecutive + 1
            raise NonFiniteLossError(
                f"stopping: {self.consecutive} optimizer steps in a row "
                f"({first}..{step_number}) had a non-finite loss or gradient "
                f"(max_nonfinite_steps = {self.limit}); lower the lr or check the data"
            )


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm of the optimizer's parameters to `max_norm` (None: no clipping); the norm
    before clipping, for logging and the finiteness check."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_across_workers(nonfinite: bool, sums: list[float], device: torch.device) -> tuple[bool, list[float]]:
    """Whether any worker had a non-finite step (so that all of them skip the same steps), and `sums` summed over
    the workers, in one all-reduce."""
    shared = torch.tensor([float(nonfinite), *sums], dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(shared)
    return bool(shared[0] > 0), shared[1:].tolist()


@dataclass
class StepTotals:
    """What the workers agree on after an optimizer step's backward and clipping (`reduce_step`)."""

    nonfinite: bool  # whether any worker's loss or gradient norm was non-finite: every worker skips the step
    loss: float  # the workers' summed loss
    points: float  # the workers' summed points
    points_imbalance: float  # the most points any worker had over the workers' mean; 1.0: equal work
    logged: list[float]  # this worker's `logged` values


def reduce_step(nonfinite: torch.Tensor, loss: torch.Tensor, points: int, logged: torch.Tensor) -> StepTotals:
    """Agree on the step across workers from device tensors, in one all-reduce and one device-to-host copy: the step
    waits for the device once, not once per value. `nonfinite`: this worker's flag; `loss`: its loss; `points`: its
    points; `logged`: values to read back as they are (loss terms, the gradient norm).

    Each worker puts its points in its own slot, so that the sum gives both their total and the most any had: every
    worker waits for the slowest at the gradient all-reduce, and a worker's time grows with its points."""
    workers = world_size()
    shared = torch.zeros(2 + workers, dtype=torch.float64, device=loss.device)
    shared[0] = nonfinite
    shared[1] = loss
    shared[2 + (dist.get_rank() if workers > 1 else 0)] = points
    if workers > 1:
        dist.all_reduce(shared)
    values = torch.cat([shared, logged.double()]).tolist()
    per_worker = values[2 : 2 + workers]
    total = sum(per_worker)
    return StepTotals(
        nonfinite=values[0] > 0,
        loss=values[1],
        points=total,
        points_imbalance=max(per_worker) * workers / max(total, 1.0) if workers > 1 else 1.0,
        logged=values[2 + workers :],
    )


def rank0_decides(decision: bool, device: torch.device) -> bool:
    """Rank 0's `decision` on every worker: a choice made on a clock must be the same everywhere, since every worker
    has to call `ray.train.report` the same number of times."""
    if world_size() == 1:
        return decision
    shared = torch.tensor([float(decision)], device=device)
    dist.broadcast(shared, src=0)
    return bool(shared[0] > 0)


# -------------------------------------------------------------------------------------------------------- epochs


def epoch_steps(
    batches: Iterator[dict], accumulation: int, steps: int, *, dropped_steps: int = 0
) -> Iterator[tuple[list[dict], float]]:
    """(micro-batches, seconds spent waiting for them) of the next `steps` optimizer steps of one epoch's `batches`.

    `dropped_steps`: steps whose batches are read and dropped first, for a stream that starts its epoch over from
    the beginning after an interruption (fine-tuning's rounds); pre-training's stream starts where it stopped.
    """
    for _ in range(dropped_steps * accumulation):
        if next(batches, None) is None:
            return
    for _ in range(steps):
        started = time.perf_counter()
        group = list(itertools.islice(batches, accumulation))
        if len(group) < accumulation:
            return
        yield group, time.perf_counter() - started


class DevicePrefetch:
    """The optimizer steps of `steps` ((micro-batches, data wait), as `epoch_steps` yields them) with their tensors
    on `device`: a background thread pins the next step's batches and copies them on a side stream while the step
    before runs, so the training thread neither copies nor waits for a copy. The data wait it yields is the time
    the training thread waited for a step's batches (read and copied). On a CPU device the batches pass through.

    Ray Data hands each worker its collated batches as CPU tensors in pageable memory; copied from the training
    thread, such a copy holds the thread until it is done (hundreds of MB a step at the paper's batch).

    Use as a context manager and iterate once."""

    _END = object()

    def __init__(self, steps: Iterator[tuple[list[dict], float]], device: torch.device):
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # one step ahead: one more batch in device memory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy, args=(steps,), daemon=True, name="device-prefetch")

    def __enter__(self) -> DevicePrefetch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a copier blocked on the stream is a daemon: it must not hold up an error

    def __iter__(self) -> Iterator[tuple[list[dict], float]]:
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):  # the copier's (or the stream's) error, raised here
                raise item
            micro_batches, copied = item
            if copied is not None:
                stream = torch.cuda.current_stream(self._device)
                stream.wait_event(copied)  # the device waits for the copy, the host does not
                for batch in micro_batches:
                    for value in batch.values():
                        if isinstance(value, torch.Tensor):
                            value.record_stream(stream)  # allocated on the side stream, freed after this one's use
            yield micro_batches, time.perf_counter() - started

    def _copy(self, steps: Iterator[tuple[list[dict], float]]) -> None:
        try:
            for micro_batches, _ in steps:
                if not self._put(self._to_device(micro_batches)):
                    return
            self._put(self._END)
        except BaseException as exc:
            self._put(exc)

    def _to_device(self, micro_batches: list[dict]) -> tuple[list[dict], torch.cuda.Event | None]:
        if self._stream is None:
            return micro_batches, None
        with torch.cuda.stream(self._stream):
            moved = [
                {
                    key: value.pin_memory().to(self._device, non_blocking=True)
                    if isinstance(value, torch.Tensor)
                    else value
                    for key, value in batch.items()
                }
                for batch in micro_batches
            ]
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return moved, copied

    def _put(self, item) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)


def close_epoch(progress: Progress, epoch: int) -> None:
    """After the steps of epoch `epoch`: if its stream ended early (samples were skipped as bad), `progress` has not
    moved on by itself; the epoch counts as done."""
    if progress.epoch == epoch:
        progress.epoch += 1
        progress.step_in_epoch = 0


# --------------------------------------------------------------------------------------------------- checkpoints


class CheckpointCadence:
    """When to checkpoint: after every `every_steps`-th optimizer step (None: never by steps) and after the first
    step that ends `every_minutes` or more after the last checkpoint or the start of this attempt (None: never by
    time). Rank 0's clock decides for every worker."""

    def __init__(
        self,
        every_steps: int | None,
        every_minutes: float | None,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every_steps = every_steps
        self.every_s = every_minutes * 60 if every_minutes is not None else None
        self.device = device
        self.clock = clock
        self.last = clock()

    def due(self, global_step: int) -> bool:
        """Whether to checkpoint after optimizer step `global_step` (1-based). With a time cadence this is a
        collective: every worker must ask after every step."""
        by_steps = self.every_steps is not None and global_step % self.every_steps == 0
        if self.every_s is None:
            return by_steps
        by_time = rank0_decides(self.clock() - self.last >= self.every_s, self.device)
        return by_steps or by_time

    def saved(self) -> None:
        """A checkpoint was just taken: the time cadence counts from now."""
        self.last = self.clock()


def report_checkpoint(name: str, metrics: dict[str, float], save: Callable[[Path], None]) -> None:
    """Every worker reports `metrics`; rank 0 also `save`s a checkpoint, which Ray Train persists as
    `<run folder>/<name>/` in the background.

    The state is written before this returns, so training may change the model right away. The folder is a fresh
    one that Ray Train's upload thread deletes once the upload is done: a `with TemporaryDirectory()` here would
    delete it under the upload."""
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        save(folder)
        checkpoint = ray.train.Checkpoint.from_directory(folder)
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_dir_name=name,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )


def wait_for_uploads() -> None:
    """Block until every checkpoint this worker has reported is uploaded and recorded by Ray Train."""
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def commit_metrics(metrics: StepMetrics, run_dir: Location) -> None:
    """After a report: send rank 0's pending step metrics, and point the MLflow run at the newest checkpoint whose
    upload is complete (the one just reported may still be on its way; `wait_for_uploads` first to name it)."""
    latest = ray.train.get_checkpoint()  # what a restart would resume from: updated as each upload completes
    if latest is None:
        metrics.flush()
    else:
        metrics.commit(run_dir.uri_of_path(latest.path))
