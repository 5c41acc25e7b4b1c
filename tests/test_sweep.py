"""Ray Tune sweeps of fine-tuning runs: bad search spaces fail before Ray; an ASHA sweep on the local Ray that
stops its bad trial, with one MLflow parent run and a child run per trial."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from concerto_ray.cli import main as cli_main
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.sweep import LastRoundPassesASHA, load_sweep_config, run_sweep

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "configs" / "sweep-semseg-tiny.yaml"
ONE_TEST_PASS = {"transform": {"test_rotations": [0.0], "test_scales": [], "test_flip": False}}


@pytest.fixture(scope="module")
def sweep_shards(sweep_scenes, tmp_path_factory):
    from concerto_ray.data.shards import prepare

    shards = tmp_path_factory.mktemp("sweep") / "shards"
    prepare(sweep_scenes, str(shards), progress=False)
    return shards


def overrides(shards: Path, storage: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.storage_path={storage}", "overrides.batch_size=1", *extra]


@pytest.mark.parametrize(
    "space, message",
    [
        ("{lr_rate: {choice: [0.1]}}", r"space.lr_rate: .*unknown config key 'finetune.lr_rate'"),
        ("{lr: {choice: []}}", r"space.lr: choice: needs at least one value"),
        ("{lr: {uniform: [0.1, 0.01]}}", r"uniform: low 0.1 is above high 0.01"),
        ("{lr: {loguniform: [0.0, 0.1]}}", r"loguniform: bounds must be > 0"),
        ("{lr: {normal: [0.0, 0.1]}}", r"unknown config key 'space.lr.normal'"),
        ("{lora.r: {grid: [0, 8]}}", r"space.lora.r: the value 0 gives an invalid config: .*lora needs r >= 1"),
    ],
)
def test_bad_search_spaces_fail_before_ray(sweep_shards, tmp_path, monkeypatch, capsys, space, message):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(TINY_SWEEP, overrides(sweep_shards, tmp_path, f"space={space}"))
    assert (
        cli_main(
            [
                "sweep",
                "--config",
                str(TINY_SWEEP),
                *[f"--set={o}" for o in overrides(sweep_shards, tmp_path, f"space={space}")],
            ]
        )
        == 2
    )
    assert "concerto-ray sweep: error:" in capsys.readouterr().err


def test_shipped_sweeps_load(sweep_shards, tmp_path):
    tiny = load_sweep_config(TINY_SWEEP, overrides(sweep_shards, tmp_path))
    assert tiny.num_samples == 4 and tiny.asha is not None and set(tiny.space) == {"lr", "weight_decay"}
    data_efficiency = yaml.safe_load(
        (REPO / "configs" / "sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml").read_text()
    )
    assert [name.split("-")[4] for name in data_efficiency["configs"]] == [f"0e{i}" for i in range(16)]
    with pytest.raises(ConfigError, match="data.shards is still the placeholder"):
        load_sweep_config(
            REPO / "configs" / "sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml",
            [f"run.storage_path={tmp_path}"],
        )


@pytest.mark.parametrize("scheduler_class", [ASHAScheduler, LastRoundPassesASHA])
def test_asha_stops_a_weak_trial_at_a_rung_but_never_at_its_last_round(scheduler_class):
    # Grace period 1 and reduction factor 2 over 2 rounds: rungs at rounds 1 and 2. Trial b scores below a at round
    # 2, b's last round: plain ASHA stops it there (racing the trial's own end), ours lets it end by itself. Trial
    # c has 3 rounds, so round 2 is a rung it must pass; trial d is stopped at round 1 by both.
    scheduler = scheduler_class(
        time_attr="training_iteration", metric="val_miou", mode="max", grace_period=1, reduction_factor=2, max_t=3
    )
    trials = {name: SimpleNamespace(trial_id=name) for name in "abcd"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name: str, round_index: int, rounds: int, miou: float) -> str:
        result = {"training_iteration": round_index, "round": round_index, "rounds": rounds, "val_miou": miou}
        return scheduler.on_trial_result(None, trials[name], result)

    assert [report("a", 1, 2, 0.5), report("b", 1, 2, 0.6), report("c", 1, 3, 0.7)] == [TrialScheduler.CONTINUE] * 3
    assert report("d", 1, 2, 0.1) == TrialScheduler.STOP
    assert report("a", 2, 2, 0.6) == TrialScheduler.CONTINUE
    last_round = report("b", 2, 2, 0.55)
    assert last_round == (TrialScheduler.CONTINUE if scheduler_class is LastRoundPassesASHA else TrialScheduler.STOP)
    assert report("c", 2, 3, 0.4) == TrialScheduler.STOP


@pytest.mark.slow
def test_asha_sweep_stops_the_bad_trial_early_with_an_mlflow_child_per_trial(
    ray_local, sweep_shards, mlflow_server, tmp_path
):
    # A good trial (the tiny probe's lr), then a bad one (an lr that leaves the random head where it started), one
    # at a time, three rounds each: ASHA (grace period 1, reduction factor 2) compares the bad trial's first round
    # with the good one's and stops it there; a FIFO scheduler would run both to the end. (That a good trial is
    # never stopped at its last round is the scheduler test's.) The trial's workers go on while Tune decides, so a
    # stopped trial may log one more round before it is killed (a CI run saw it): three rounds leave room for that.
    good_lr, bad_lr = 0.05, 1e-9
    sweep = load_sweep_config(
        TINY_SWEEP,
        overrides(
            sweep_shards,
            tmp_path,
            f"mlflow.tracking_uri={mlflow_server}",
            "run.name=sweep-asha",
            "space={lr: {grid: [0.05, 1.0e-9]}}",
            "num_samples=1",
            "overrides.epochs=3",
            "overrides.eval_epochs=3",
            f"overrides.transform={yaml.safe_dump(ONE_TEST_PASS['transform'], default_flow_style=True).strip()}",
        ),
    )
    assert sweep.asha is not None and sweep.max_concurrent_trials == 1
    result = run_sweep(sweep)

    assert result.trials == 2
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{result.parent_run_id}'"
    )
    assert len(children) == 2
    rounds = {
        child.info.run_id: [m.value for m in client.get_metric_history(child.info.run_id, "val_miou")]
        for child in children
    }
    by_lr = {
        lr: [child for child in children if float(child.data.params["finetune.lr"]) == lr] for lr in (good_lr, bad_lr)
    }
    assert [len(trials) for trials in by_lr.values()] == [1, 1]
    # the good trial ran its three rounds and ended by itself; the bad one was stopped before its last
    assert all(child.info.status == "FINISHED" and len(rounds[child.info.run_id]) == 3 for child in by_lr[good_lr])
    assert all(child.info.status == "KILLED" and 1 <= len(rounds[child.info.run_id]) < 3 for child in by_lr[bad_lr])
    assert result.best_values["lr"] == good_lr
    assert result.best_metrics["val_miou"] == pytest.approx(max(max(values) for values in rounds.values()))
    assert parent.data.metrics["best_val_miou"] == pytest.approx(result.best_metrics["val_miou"])
    assert (Path(result.best_checkpoint) / "model.pt").is_file()
