"""A calm terminal for the long-running commands (`demo`, `pretrain`, `finetune`, `sweep`).

Each training stage shows one progress bar (optimizer step, loss, throughput, ETA) and ends with a one-line
summary. Rank 0 posts its latest step to a small Ray actor (`ProgressBoard`); a thread of the driver reads it
and draws the bar, so nothing of the workers' own output is needed on the terminal. Ray's logs, its workers'
output, Ray Data's execution plans and library warnings go to a log file whose path is printed instead.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

# Loggers that write to the terminal of their own accord, directly or through the root logger.
CHATTY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "botocore", "filelock", "torch", "transformers", "py.warnings")
POLL_SECONDS = 0.5


def default_log_file(command: str) -> Path:
    """Where a command without a work folder of its own keeps its log: the temp folder, one file per invocation."""
    return Path(tempfile.gettempdir()) / "concerto-ray" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def start_ray(log_file: Path, address: str | None = None) -> None:
    """Connect to Ray (`address`; None: Ray's default, RAY_ADDRESS or a running cluster or a new local one) with
    everything but our own output in `log_file`, and say where that is. Already connected: the driver's logs are
    redirected, and the workers' output goes wherever that connection was told to send it."""
    log_file = Path(log_file).resolve()
    send_logs_to(log_file)
    if not ray.is_initialized():
        # log_to_driver=False: the workers' stdout and stderr stay in Ray's session logs
        ray.init(address=address, log_to_driver=False)
        send_logs_to(log_file)  # ray.init installs its own terminal handler again
    # The raylet's warnings (e.g. "N worker processes have been started") reach the driver on another channel,
    # printed to stdout whatever log_to_driver says; Ray offers no switch for them.
    ray._private.worker.print_to_stdstream = _log_ray_message  # noqa: SLF001
    # Ray Data's bars and execution plans; a dataset carries the driver's context to the workers that run it.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.verbose_progress = False
    print(f"logs: {log_file} (Ray's own: {ray_log_dir()})")


def ray_log_dir() -> str:
    """The session log folder of the Ray this driver started or joined (on the head node for a remote cluster)."""
    node = ray._private.worker.global_worker.node  # noqa: SLF001 - Ray has no public accessor for it
    return str(Path(node.get_session_dir_path()) / "logs") if node is not None else "the Ray head's session logs"


def _log_ray_message(data: dict, ignore_prefix: bool) -> None:
    logging.getLogger("ray").warning("(%s) %s", data.get("pid"), "\n".join(data["lines"]))


def send_logs_to(log_file: Path) -> None:
    """Library loggers and Python warnings -> `log_file` instead of the terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if isinstance(old, logging.FileHandler) and old.baseFilename == str(log_file):
                old.close()
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest values rank 0 posted (step, loss, ...); the driver's bar reads them."""

    def __init__(self):
        self.latest: dict[str, float] = {}

    def post(self, values: dict[str, float]) -> None:
        self.latest = values

    def read(self) -> dict[str, float]:
        return self.latest


def post_progress(board: Any, step: int, **values: float) -> None:
    """Called by rank 0 after each optimizer step; `board` is None when no bar is shown. Does not wait."""
    if board is not None:
        board.post.remote(dict(values, step=step))


class StageBar:
    """One progress bar over a stage's optimizer steps, drawn from a `ProgressBoard` while the stage runs.

    with StageBar("pre-training", total_steps) as bar:
        run(..., progress=bar.board)   # rank 0 calls post_progress(board, step, loss=...)
    """

    def __init__(self, title: str, total_steps: int, enabled: bool = True):
        self.title = title
        self.total_steps = total_steps
        self.board = None
        if enabled:
            # On the driver's node (the head of a cluster): on any other node, losing that node would take the bar,
            # and with it the driver, down while Ray Train recovers the run.
            on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.board = ProgressBoard.options(scheduling_strategy=on_driver_node).remote()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: tqdm | None = None
        self.latest: dict[str, float] = {}
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> StageBar:
        if self.board is not None:
            # Not a terminal (a log, CI): few redraws, each one a line of its own.
            interval = 1.0 if sys.stderr.isatty() else 60.0
            self._bar = tqdm(
                total=self.total_steps,
                desc=self.title,
                unit="step",
                file=sys.stderr,
                mininterval=interval,
                maxinterval=interval,
                dynamic_ncols=True,
            )
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.monotonic() - self._started
        if self.board is None:
            return
        self._stop.set()
        self._thread.join()
        self._refresh()
        self._bar.close()
        ray.kill(self.board)

    def summary(self) -> str:
        """E.g. "pre-training: 360 steps in 15m59s, loss 3.21"."""
        minutes, seconds = divmod(round(self.seconds), 60)
        text = f"{self.title}: {int(self.latest.get('step', 0))} steps in {minutes}m{seconds:02d}s"
        return text + (f", loss {self.latest['loss']:.4g}" if "loss" in self.latest else "")

    def _follow(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._refresh()

    def _refresh(self) -> None:
        try:
            self.latest = ray.get(self.board.read.remote(), timeout=10) or self.latest
        except ray.exceptions.GetTimeoutError:
            return
        if not self.latest:
            return
        step = int(self.latest["step"])
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(
            ", ".join(f"{key} {value:.4g}" for key, value in self.latest.items() if key != "step"), refresh=False
        )


class TrialBar(ray.tune.Callback):
    """One progress bar over a sweep's trials (ended ones: finished, stopped early or failed) with the best
    `metric` reported so far; Tune calls it on the driver."""

    def __init__(self, metric: str):
        self.metric = metric
        self.best: float | None = None
        self.bar: tqdm | None = None

    def setup(self, **info) -> None:
        # The bar starts with the experiment, not in __init__: Tune pickles its callbacks with the experiment (a
        # resumed sweep unpickles them), and a bar on stderr does not survive that.
        interval = 1.0 if sys.stderr.isatty() else 60.0
        self.bar = tqdm(
            desc="sweep", unit="trial", file=sys.stderr, mininterval=interval, maxinterval=interval, dynamic_ncols=True
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        if self.metric in result and (self.best is None or result[self.metric] > self.best):
            self.best = result[self.metric]
            self.bar.set_postfix_str(f"best {self.metric} {self.best:.4f}", refresh=False)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.bar.total = len(trials)
        ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        if ended > self.bar.n:
            self.bar.update(ended - self.bar.n)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.on_step_end(0, trials)
        self.bar.close()
