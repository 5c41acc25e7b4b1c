"""The pieces every training worker shares (concerto_ray.train.runtime), without Ray; and the retry budget of the
shipped configs."""

from __future__ import annotations

import pytest
import torch
import yaml

from concerto_ray.config import CONFIG_DIR, from_dict, shipped_config_names
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.run_config import load_finetune_run
from concerto_ray.finetune.sweep import SweepConfig, trial_run
from concerto_ray.train.config import PretrainConfig, RunSettings
from concerto_ray.train.runtime import CheckpointCadence, DevicePrefetch, close_epoch, epoch_steps, reduce_step
from concerto_ray.train.state import Progress

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_checkpoint_cadence_by_steps_and_by_time():
    clock = FakeClock()
    cadence = CheckpointCadence(every_steps=100, every_minutes=2.0, device=CPU, clock=clock)
    clock.now = 119.0
    assert not cadence.due(1)  # neither 100 steps nor 2 minutes yet
    clock.now = 120.0
    assert cadence.due(2)  # 2 minutes since the start
    cadence.saved()
    clock.now = 200.0
    assert not cadence.due(3)  # the time counts from the last checkpoint
    assert cadence.due(100)  # the step cadence holds as before
    cadence.saved()
    clock.now = 320.0
    assert cadence.due(101)

    by_steps_only = CheckpointCadence(every_steps=2, every_minutes=None, device=CPU, clock=clock)
    clock.now = 10_000.0
    assert not by_steps_only.due(3) and by_steps_only.due(4)
    by_time_only = CheckpointCadence(every_steps=None, every_minutes=0.5, device=CPU, clock=clock)
    assert not by_time_only.due(4)
    clock.now += 30.0
    assert by_time_only.due(5)


def test_epoch_steps_drop_the_steps_a_checkpoint_holds_and_close_an_epoch_cut_short():
    batches = iter([{"i": i} for i in range(7)])  # 3 steps of 2 micro-batches, and one left over
    steps = [[b["i"] for b in group] for group, _ in epoch_steps(batches, 2, 3, dropped_steps=1)]
    assert steps == [[2, 3], [4, 5]]  # step 0 was trained before the interruption; step 3 has no full group
    batches = iter([{"i": i} for i in range(7)])  # a stream that starts where the run stopped: nothing dropped
    assert [[b["i"] for b in group] for group, _ in epoch_steps(batches, 2, 2)] == [[0, 1], [2, 3]]
    progress = Progress(global_step=3, epoch=0, step_in_epoch=3)
    close_epoch(progress, 0)
    assert (progress.epoch, progress.step_in_epoch) == (1, 0)
    close_epoch(progress, 0)  # an epoch that ended by itself is left as it is
    assert progress.epoch == 1


def test_reduce_step_reads_back_once_on_one_worker():
    totals = reduce_step(
        torch.tensor(False), torch.tensor(2.5, dtype=torch.float64), 1234, torch.tensor([1.0, 2.0], dtype=torch.float32)
    )
    assert (totals.nonfinite, totals.loss, totals.points, totals.points_imbalance) == (False, 2.5, 1234.0, 1.0)
    assert totals.logged == [1.0, 2.0]
    assert reduce_step(torch.tensor(True), torch.tensor(0.0), 1, torch.zeros(0)).nonfinite


def test_device_prefetch_passes_cpu_steps_through_and_raises_the_stream_errors():
    def steps():
        yield [{"a": torch.ones(2), "name": ["x"]}], 0.5
        yield [{"a": torch.zeros(2)}, {"a": torch.ones(1)}], 0.0
        raise ValueError("bad shard")

    received = []
    with pytest.raises(ValueError, match="bad shard"), DevicePrefetch(steps(), CPU) as on_device:
        for micro_batches, wait in on_device:
            assert wait >= 0.0
            received.append([batch["a"].tolist() for batch in micro_batches])
    assert received == [[[1.0, 1.0]], [[0.0, 0.0], [1.0]]]
    with DevicePrefetch(iter([]), CPU) as on_device:
        assert list(on_device) == []


def test_checkpoint_every_minutes_is_checked():
    with pytest.raises(ValueError, match="checkpoint_every_minutes must be positive"):
        RunSettings(name="x", storage_path="/tmp", checkpoint_every_minutes=0)
    assert RunSettings(name="x", storage_path="/tmp", checkpoint_every_minutes=0.5).checkpoint_every_minutes == 0.5
    with pytest.raises(ConfigError, match="checkpoint_every_minutes"):
        load_finetune_run(
            "semseg-tiny-lin",
            {"data.shards": "/shards", "run.name": "x", "run.storage_path": "/tmp", "run.checkpoint_every_minutes": -1},
        )


def test_every_shipped_config_retries_failed_workers():
    """Spot nodes go away: every shipped run recovers from a few worker failures by default."""
    run_sections = {"data.shards": "/shards", "run.name": "check", "run.storage_path": "/tmp/runs"}
    budgets = {}
    for name in shipped_config_names():
        if name.startswith("pretrain-"):
            tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
            tree["run"].setdefault("storage_path", "/tmp/runs")  # pretrain-tiny-s3 leaves it to the user
            budgets[name] = from_dict(PretrainConfig, tree).run.max_failures
        elif name.startswith("semseg-"):  # the fine-tuning config alone; its run section is the schema's
            budgets[name] = load_finetune_run(name, run_sections).run.max_failures
        elif name.startswith("sweep-"):
            sweep = from_dict(SweepConfig, yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()))
            budgets[name] = trial_run(sweep, sweep.configs[0], {}, "check").run.max_failures
    assert len(budgets) == len(shipped_config_names()), "a shipped config of a kind this test does not know"
    assert {name: n for name, n in budgets.items() if not (n > 0 or n == -1)} == {}
