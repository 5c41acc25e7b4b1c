"""Ray Tune sweeps of fine-tuning runs: bad search spaces fail before Ray; a 4-trial ASHA sweep on the local Ray
with one MLflow parent run and a child run per trial."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from concerto_ray.cli import main as cli_main
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.sweep import load_sweep_config, run_sweep

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "configs" / "sweep-semseg-tiny.yaml"
ONE_TEST_PASS = {"transform": {"test_rotations": [0.0], "test_scales": [], "test_flip": False}}


@pytest.fixture(scope="module")
def sweep_shards(tmp_path_factory):
    from concerto_ray.data.shards import prepare
    from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("sweep")
    write_synthetic_dataset(
        root / "scenes",
        SynthConfig(
            scenes=3,
            points_per_scene=1000,
            views_per_scene=1,
            image_width=16,
            image_height=16,
            splits={"train": 0.67, "val": 0.33},
        ),
        progress=False,
    )
    prepare(root / "scenes", str(root / "shards"), progress=False)
    return root / "shards"


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


@pytest.mark.slow
def test_four_trial_asha_sweep_stops_the_bad_trials_early_with_an_mlflow_child_per_trial(
    ray_local, sweep_shards, mlflow_server, tmp_path
):
    # Two good trials (the tiny probe's lr) and two bad ones (an lr that leaves the random head where it started),
    # alternating and one at a time: ASHA (grace period 1, reduction factor 2) compares each trial's first round
    # with those before it and stops the bad ones there; a FIFO scheduler would run all four to the end.
    good_lr, bad_lr = 0.05, 1e-9
    sweep = load_sweep_config(
        TINY_SWEEP,
        overrides(
            sweep_shards,
            tmp_path,
            f"mlflow.tracking_uri={mlflow_server}",
            "run.name=sweep-asha",
            "space={lr: {grid: [0.05, 1.0e-9]}}",
            "num_samples=2",
            f"overrides.transform={yaml.safe_dump(ONE_TEST_PASS['transform'], default_flow_style=True).strip()}",
        ),
    )
    assert sweep.asha is not None and sweep.max_concurrent_trials == 1
    result = run_sweep(sweep)

    assert result.trials == 4
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{result.parent_run_id}'"
    )
    assert len(children) == 4
    rounds = {
        child.info.run_id: [m.value for m in client.get_metric_history(child.info.run_id, "val_miou")]
        for child in children
    }
    by_lr = {
        lr: [child for child in children if float(child.data.params["finetune.lr"]) == lr] for lr in (good_lr, bad_lr)
    }
    assert [len(trials) for trials in by_lr.values()] == [2, 2]
    # the good trials ran both rounds (max_t) and ended by themselves; the bad ones were stopped after the first
    assert all(child.info.status == "FINISHED" and len(rounds[child.info.run_id]) == 2 for child in by_lr[good_lr])
    assert all(child.info.status == "KILLED" and len(rounds[child.info.run_id]) == 1 for child in by_lr[bad_lr])
    assert result.best_values["lr"] == good_lr
    assert result.best_metrics["val_miou"] == pytest.approx(max(max(values) for values in rounds.values()))
    assert parent.data.metrics["best_val_miou"] == pytest.approx(result.best_metrics["val_miou"])
    assert (Path(result.best_checkpoint) / "model.pt").is_file()
