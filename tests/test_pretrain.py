"""Pre-training on Ray Train: the shipped tiny config on a real local Ray, S3 (moto) and an MLflow server.

Runs are 2 workers x 0.5 CPU, 1 sample per worker and step, 2 steps per epoch, so each takes seconds of compute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import boto3
import pytest
import ray
import torch
from conftest import recorded  # tests/ is on sys.path under pytest
from mlflow.tracking import MlflowClient

import concerto_ray.train.trainer
from concerto_ray.cli import main as cli_main
from concerto_ray.errors import ConfigError
from concerto_ray.model.build import build_ssl_model
from concerto_ray.model.configs import get_model_config
from concerto_ray.train.config import OptimConfig, load_pretrain_config
from concerto_ray.train.loop import CHECKPOINT_DIR_FORMAT, train_loop_per_worker
from concerto_ray.train.optim import build_optimizer, param_groups, weight_decay_schedule
from concerto_ray.train.runtime import NonFiniteLossError
from concerto_ray.train.state import CheckpointError, load_checkpoint
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain, scaling_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain-tiny.yaml"
STEPS = 4  # 2 epochs x (4 train samples // 2 workers // batch 1)
LOSS_TERMS = ("loss", "mask_loss", "roll_mask_loss", "unmask_loss", "enc2d_loss")


def tiny_overrides(shards: Path, dinov2_dir: Path, name: str, storage: str) -> list[str]:
    """Point the shipped tiny config at this test's data and storage, with 28-pixel crops (2 x 2 patches)."""
    return [
        f"data.shards={shards}",
        f"model.image_encoder_weights={dinov2_dir}",
        f"run.name={name}",
        f"run.storage_path={storage}",
        "data.seed=0",
        "data.pretrain.crop_h=28",
        "data.pretrain.crop_w=28",
        "data.pretrain.max_size=1024",
        "data.pretrain.enc2d_max_size=1024",
    ]


@pytest.fixture
def tiny(dinov2_dir, pretrain_shards, mlflow_server, tmp_path):
    """The tiny config for a run in a local folder, tracked by the MLflow server."""

    def load(name: str, *overrides: str):
        base = tiny_overrides(pretrain_shards, dinov2_dir, name, str(tmp_path / "runs"))
        return load_pretrain_config(TINY_CONFIG, [*base, f"mlflow.tracking_uri={mlflow_server}", *overrides])

    return load


def mlflow_run_id(config) -> str:
    run_dir = Path(config.run.storage_path) / config.run.name
    return json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]


def logged_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def progress_of(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "progress.json").read_text())


def train_attempts(run_name: str) -> list[str]:
    """The statuses of the attempts Ray Train made at the run named `run_name`, from its own state records (kept
    while RAY_TRAIN_ENABLE_STATE_TRACKING=1)."""
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    runs = [run for run in ray.get(actor.get_train_runs.remote()).values() if run.name == run_name]
    assert len(runs) == 1, f"{len(runs)} Ray Train runs named {run_name!r}"
    attempts = ray.get(actor.get_train_run_attempts.remote())[runs[0].id].values()
    return [attempt.status.value for attempt in sorted(attempts, key=lambda attempt: attempt.start_time_ns)]


# -- optimizer setup (no Ray) -----------------------------------------------------------------------------------------


def test_layer_wise_lr_follows_the_reference_formula():
    model = build_ssl_model(get_model_config("tiny-sonata"))
    optim = OptimConfig(lr=0.01, layer_decay=0.5)
    with pytest.raises(ValueError, match="enc1.block0"):
        param_groups(model, optim, (1, 0, 1, 1, 1))
    groups = {g["name"]: g for g in param_groups(model, optim, (1, 1, 1, 1, 1))}
    # The last of the 5 blocks trains at lr, each earlier one at one more factor 0.5.
    assert [groups[f"enc{e}.block0"]["lr"] for e in range(5)] == [0.01 * 0.5 ** (4 - e) for e in range(5)]
    assert groups["other"]["lr"] == 0.01
    grouped = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert not any(p is q for p in grouped for q in model.teacher.parameters())


def test_one_cycle_and_weight_decay_schedules():
    model = build_ssl_model(get_model_config("tiny-sonata"))
    optim = OptimConfig(lr=0.004, pct_start=0.25, div_factor=10.0, final_div_factor=1000.0)
    optimizer, scheduler = build_optimizer(model, optim, (1, 1, 1, 1, 1), total_steps=8)
    first = [g["lr"] for g in optimizer.param_groups]
    peaks = [g["max_lr"] for g in optimizer.param_groups]
    assert first == pytest.approx([p / 10.0 for p in peaks])
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # torch's warm-up ends at step pct_start * total_steps - 1
    assert max(lrs) == pytest.approx(0.004) and lrs.index(max(lrs)) == 1
    assert lrs[-1] < 0.004 / 100
    wd = weight_decay_schedule(optim, total_steps=8)
    assert wd(0) == pytest.approx(0.04) and wd(4) == pytest.approx(0.12) and wd(8) == pytest.approx(0.2)


# -- config validation: before anything starts ----------------------------------------------------------------------


def test_config_typos_fail_before_ray_starts(dinov2_dir, pretrain_shards, tmp_path, monkeypatch, capsys):
    def load(*overrides: str):
        base = tiny_overrides(pretrain_shards, dinov2_dir, "typo", str(tmp_path))
        return load_pretrain_config(TINY_CONFIG, [*base, *overrides])

    assert load().run.name == "typo"
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy' \(did you mean 'weight_decay'\?\)"):
        load("optim.weight_decy=0.1")
    with pytest.raises(ConfigError, match=r"run.epochs: expected an integer, got 'two'"):
        load("run.epochs=two")
    with pytest.raises(ConfigError, match=r"data.shards: .*no shard manifest"):
        load("data.shards=/nonexistent/shards")
    with pytest.raises(ConfigError, match="one epoch gives no optimizer step"):  # 2 samples a worker, 2 x 2 a step
        load("data.batch_size=2", "optim.grad_accumulation=2")
    with pytest.raises(ConfigError, match="model.image_encoder_weights: '/nonexistent' is neither"):
        load("model.image_encoder_weights=/nonexistent")
    assert load().model_config().backbone.in_channels == 9
    assert load("data.pretrain.feat_keys=[coord, normal]").model_config().backbone.in_channels == 6
    with pytest.raises(ConfigError, match=r"feat_keys: distinct names out of"):
        load("data.pretrain.feat_keys=[coord, coord]")
    with pytest.raises(ConfigError, match="data.sources_root is still the placeholder"):
        load_pretrain_config(REPO / "configs" / "pretrain-concerto-v1m1-0-base.yaml")
    # Elastic: 1 or 2 workers, the global batch of 2 kept by accumulating 2 micro-batches on 1 worker.
    elastic = load("run.num_workers=[1, 2]")
    assert (elastic.run.min_workers, elastic.run.num_workers, elastic.workers_batch()) == (1, 2, 2)
    assert (elastic.accumulation(1), elastic.accumulation(2)) == (2, 1)
    scaling = scaling_config(elastic.run)
    assert (scaling.min_workers, scaling.max_workers) == (1, 2)
    with pytest.raises(ConfigError, match=r"num_workers \[min, max\] needs 1 <= min <= max, got \[3, 2\]"):
        load("run.num_workers=[3, 2]")
    with pytest.raises(ConfigError, match=r"num_workers must be a number or \[min, max\]"):
        load("run.num_workers=[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"\[2, 3\]: with 2 workers the global batch .* cannot be split evenly"):
        load("run.num_workers=[2, 3]")  # 3 micro-batches a step: not over 2 workers
    with pytest.raises(ConfigError, match="one short batch per worker"):
        load("data.batch_size=4", "run.num_workers=[1, 2]")

    # The command (which jobs/pretrain.py runs) reports the error and exits before connecting to Ray.
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli_main(["pretrain", "--config", str(TINY_CONFIG), "--set", "run.epochs=two"]) == 2
    assert "run.epochs: expected an integer" in capsys.readouterr().err


# -- runs on the local Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_server, dinov2_dir, pretrain_shards, mlflow_server):
    """A complete tiny run checkpointing into S3."""
    overrides = [
        *tiny_overrides(pretrain_shards, dinov2_dir, "s3-run", f"s3://{s3_server.bucket}/runs"),
        f"run.endpoint_url={s3_server.endpoint_url}",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.system_metrics_interval_s=1.0",
    ]
    return overrides, run_pretrain(load_pretrain_config(TINY_CONFIG, overrides))


@pytest.mark.slow
def test_run_checkpoints_to_s3_and_logs_to_mlflow(s3_run, s3_server, mlflow_server):
    _, result = s3_run
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/s3-run/")["Contents"]}
    # checkpoint_every 2 and 2 checkpoints kept: the ones at steps 2 and 4.
    for step in (2, 4):
        for name in ("model.pt", "optimizer.pt", "progress.json"):
            assert f"runs/s3-run/step-{step:08d}/{name}" in keys
    assert result.checkpoint.path == f"{s3_server.bucket}/runs/s3-run/step-{STEPS:08d}"
    progress = json.loads(
        s3.get_object(Bucket=s3_server.bucket, Key=f"runs/s3-run/step-{STEPS:08d}/progress.json")["Body"].read()
    )
    assert progress == {"global_step": STEPS, "epoch": 2, "step_in_epoch": 0, "skipped_steps": 0}

    run_id = json.loads(s3.get_object(Bucket=s3_server.bucket, Key=f"runs/s3-run/{RUN_ID_FILE}")["Body"].read())[
        "run_id"
    ]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in (
        *LOSS_TERMS,
        "lr",
        "weight_decay",
        "adam_beta1",
        "teacher_momentum",
        "teacher_temp",
        "points_per_s",
        "data_wait_s",
        "data_wait_fraction",
        "points_imbalance",
        "skipped_steps",
        "samples",
    ):
        assert logged_steps(mlflow_server, run_id, key) == list(range(1, STEPS + 1)), key
    # 2 workers: the most points over the mean lies in [1, 2]
    assert all(1.0 <= m.value <= 2.0 for m in client.get_metric_history(run_id, "points_imbalance"))
    losses = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert run.data.params["optim.layer_decay"] == "0.9" and run.data.params["run.num_workers"] == "2"
    assert run.data.params["data.pretrain.crop_h"] == "28" and run.data.params["model.name"] == "tiny-concerto"
    assert run.data.tags["checkpoint"] == f"s3://{s3_server.bucket}/runs/s3-run/step-{STEPS:08d}"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    # the node's system metrics, sampled by one of its two workers (one node here: node0)
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= system
    assert all(key.startswith("system/node0/") for key in system)
    # the teacher's feature picture of one fixed scene at each checkpoint
    for step in (2, 4):
        folder = f"features/step-{step:08d}"
        assert [a.path for a in client.list_artifacts(run_id, folder)] == [f"{folder}/pca.png"]


@pytest.mark.slow
def test_corrupt_checkpoint_names_it(s3_run, s3_server):
    overrides, _ = s3_run
    config = load_pretrain_config(TINY_CONFIG, [*overrides, "run.max_failures=0"])  # no retry of a lost cause
    key = f"runs/s3-run/step-{STEPS:08d}/model.pt"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(
        Bucket=s3_server.bucket, Key=key, Body=b"not a checkpoint"
    )
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint s3://{s3_server.bucket}/{key.removesuffix('/model.pt')}: "
        r"model.pt cannot be loaded",
    ):
        run_pretrain(config, resume=True)


@pytest.mark.slow
def test_killed_worker_recovers_mid_epoch_exactly_where_it_stopped(
    ray_local, tiny, mlflow_server, inject_faults, monkeypatch, tmp_path
):
    """Rank 0 dies before step 4, the second step of the second epoch; Ray Train restarts the workers from the
    step-3 checkpoint. The run is the uninterrupted run of its seed: the same samples on the same workers at every
    step, the same losses, and the restarted stream reads on from the first sample the checkpoint had not
    consumed."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")

    def losses(config) -> list[float]:
        history = MlflowClient(mlflow_server).get_metric_history(mlflow_run_id(config), "loss")
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    def steps_trained(events: dict[int, list[dict]]) -> dict[tuple[int, int], list[str]]:
        """(step, rank) -> sample names; a step begun before the failure counts as retrained after it."""
        return {(e["step"], rank): e["names"] for rank, log in events.items() for e in log if e["kind"] == "step"}

    inject_faults(record_to=tmp_path / "plain")
    plain = tiny("plain", "run.checkpoint_every=1", "run.log_sample_names=true")
    run_pretrain(plain)
    # run.log_sample_names: each step's samples, worker by worker, as MLflow artifacts
    client, run_id, plain_steps = (
        MlflowClient(mlflow_server),
        mlflow_run_id(plain),
        steps_trained(recorded(tmp_path / "plain")),
    )
    logged = {}
    for artifact in client.list_artifacts(run_id, "samples"):
        logged.update(json.loads(Path(client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text()))
    assert logged == {str(step): [plain_steps[(step, 0)], plain_steps[(step, 1)]] for step in range(1, STEPS + 1)}
    inject_faults(exit_before_step=4, record_to=tmp_path / "recovered")
    config = tiny("recovered", "run.max_failures=1", "run.checkpoint_every=1")
    result = run_pretrain(config)
    # Ray Train saw the failure of its first attempt and finished in a second one.
    assert train_attempts("recovered") == ["ERRORED", "FINISHED"]
    assert result.metrics["step"] == STEPS
    assert progress_of(Path(result.checkpoint.path))["global_step"] == STEPS
    # every optimizer step logged once: none was repeated or skipped across the restart
    run_id = mlflow_run_id(config)
    for key in LOSS_TERMS:
        assert logged_steps(mlflow_server, run_id, key) == list(range(1, STEPS + 1)), key

    trained = steps_trained(recorded(tmp_path / "recovered"))
    assert trained == steps_trained(recorded(tmp_path / "plain"))
    for epoch in range(2):  # each epoch's 4 samples, each once: 2 steps x 2 workers
        names = [n for (step, _), batch in trained.items() if (step - 1) // 2 == epoch for n in batch]
        assert sorted(names) == sorted(set(names)) and len(names) == 4
    assert losses(config) == losses(plain)
    # The restarted attempt read only step 4's samples of the interrupted epoch: step 3's were not read again.
    for rank, log in recorded(tmp_path / "recovered").items():
        reread = [n for e in log if e["kind"] == "read" and e["restarted"] and e["epoch"] == 1 for n in e["names"]]
        assert reread == trained[(4, rank)], rank


@pytest.mark.slow
def test_resume_continues_a_stopped_run_on_another_number_of_workers(
    ray_local, tiny, mlflow_server, inject_faults, tmp_path
):
    """A 2-worker run stops before step 4 (mid second epoch); it is resumed on 1 worker accumulating 2 micro-batches,
    the same global batch: the same steps, and each epoch's samples each trained on once."""
    inject_faults(exit_before_step=4, record_to=tmp_path / "samples")
    stopped = tiny("stopped", "run.max_failures=0", "run.checkpoint_every=1")
    with pytest.raises(ray.train.WorkerGroupError):
        run_pretrain(stopped)
    run_id = mlflow_run_id(stopped)
    assert logged_steps(mlflow_server, run_id, "loss") == [1, 2, 3]  # what the step-3 checkpoint covers
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FAILED"

    with pytest.raises(ConfigError, match="already exists"):
        run_pretrain(stopped)
    with pytest.raises(CheckpointError, match="global batch"):  # another global batch: another run
        run_pretrain(tiny("stopped", "run.num_workers=1", "run.max_failures=0"), resume=True)
    inject_faults(record_to=tmp_path / "samples")  # no fault now: records only
    result = run_pretrain(tiny("stopped", "run.num_workers=1", "optim.grad_accumulation=2"), resume=True)
    assert progress_of(Path(result.checkpoint.path)) == {
        "global_step": STEPS,
        "epoch": 2,
        "step_in_epoch": 0,
        "skipped_steps": 0,
    }
    assert logged_steps(mlflow_server, run_id, "loss") == list(range(1, STEPS + 1))
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FINISHED"
    trained: dict[int, list[str]] = {}  # step -> its samples over all workers, as finally trained
    for log in recorded(tmp_path / "samples").values():
        for event in (e for e in log if e["kind"] == "step"):
            if event["restarted"] or event["step"] < 4:  # step 4 of the stopped attempt never finished
                trained.setdefault(event["step"], []).extend(event["names"])
    assert sorted(trained) == [1, 2, 3, 4] and all(len(names) == 2 for names in trained.values())
    for first in (1, 3):  # each epoch: its 4 samples, each once
        assert len(set(trained[first] + trained[first + 1])) == 4


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(ray_local, tiny, mlflow_server, inject_faults):
    inject_faults(nonfinite_steps=(2, 4, 5))
    config = tiny(
        "nonfinite",
        "run.epochs=3",
        "run.checkpoint_every=1",
        "run.checkpoints_to_keep=10",
        "run.max_failures=0",
        "run.max_nonfinite_steps=2",
    )
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row \(4..5\)"):
        run_pretrain(config)
    run_dir = Path(config.run.storage_path) / config.run.name
    states = {step: torch.load(run_dir / f"step-{step:08d}" / "model.pt")["state_dict"] for step in (1, 2, 3)}
    # Step 2 was skipped: no optimizer step, no EMA update; step 3 trained again.
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    assert not all(torch.equal(states[2][k], states[3][k]) for k in states[2])
    assert progress_of(run_dir / "step-00000004")["skipped_steps"] == 2
    history = MlflowClient(mlflow_server).get_metric_history(mlflow_run_id(config), "skipped_steps")
    assert [(m.step, m.value) for m in history] == [(1, 0), (2, 1), (3, 1), (4, 2)]


@pytest.mark.slow
def test_a_nonfinite_streak_rolls_back_to_the_latest_checkpoint(ray_local, tiny, mlflow_server, inject_faults):
    inject_faults(nonfinite_steps=(4,))
    config = tiny(
        "rollback",
        "run.epochs=3",
        "run.checkpoint_every=2",
        "run.checkpoints_to_keep=10",
        "run.max_failures=0",
        "run.max_nonfinite_steps=1",
        "run.on_nonfinite=rollback",
    )
    result = run_pretrain(config)
    assert result.metrics["step"] == 6
    run_dir = Path(config.run.storage_path) / config.run.name
    states = {step: torch.load(run_dir / f"step-{step:08d}" / "model.pt")["state_dict"] for step in (2, 4, 6)}
    # Step 4 was non-finite: the weights went back to the step-2 checkpoint's (step 3's update is undone); steps 5
    # and 6 trained on from there.
    assert all(torch.equal(states[2][k], states[4][k]) for k in states[2])
    assert not all(torch.equal(states[4][k], states[6][k]) for k in states[4])
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(mlflow_run_id(config), "rolled_back_to_step")
    assert [(m.step, m.value) for m in history] == [(4, 2)]
    assert progress_of(run_dir / "step-00000006") == {
        "global_step": 6,
        "epoch": 3,
        "step_in_epoch": 0,
        "skipped_steps": 1,
    }


@pytest.fixture(scope="module")
def timed_run(ray_local, dinov2_dir, pretrain_shards, mlflow_server, tmp_path_factory):
    """A tiny run checkpointing by time only (a step cadence it never reaches, a time cadence every step passes),
    its workers recording each checkpoint they report: upload mode, local folder, checkpoint name."""
    tmp_path = tmp_path_factory.mktemp("timed")
    reports = tmp_path / "reports.jsonl"

    def spied_loop(loop_config: dict) -> None:  # a closure: Ray ships it to the workers by value
        real_report = ray.train.report

        def report(metrics, checkpoint=None, **kwargs):
            if checkpoint is not None:
                mode = kwargs.get("checkpoint_upload_mode", ray.train.CheckpointUploadMode.SYNC)
                record = {"mode": mode.value, "folder": checkpoint.path, "name": kwargs["checkpoint_dir_name"]}
                with open(reports, "a") as file:
                    file.write(json.dumps(record) + "\n")
            return real_report(metrics, checkpoint=checkpoint, **kwargs)

        ray.train.report = report  # in this worker process only
        train_loop_per_worker(loop_config)

    config = load_pretrain_config(
        TINY_CONFIG,
        [
            *tiny_overrides(pretrain_shards, dinov2_dir, "timed", str(tmp_path / "runs")),
            f"mlflow.tracking_uri={mlflow_server}",
            "run.checkpoint_every=100",
            "run.checkpoint_every_minutes=0.0001",
            "run.checkpoints_to_keep=10",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(concerto_ray.train.trainer, "train_loop_per_worker", spied_loop)
        result = run_pretrain(config)
    return config, result, [json.loads(line) for line in reports.read_text().splitlines()]


@pytest.mark.slow
def test_time_cadence_checkpoints_where_the_step_cadence_would_not(timed_run):
    config, result, _ = timed_run
    run_dir = Path(config.run.storage_path) / config.run.name
    # checkpoint_every=100 alone would checkpoint the last step only; 6 ms pass in every step
    assert sorted(p.name for p in run_dir.glob("step-*")) == [CHECKPOINT_DIR_FORMAT.format(s) for s in (1, 2, 3, 4)]
    assert [progress_of(run_dir / CHECKPOINT_DIR_FORMAT.format(s))["global_step"] for s in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert result.checkpoint.path == str(run_dir / CHECKPOINT_DIR_FORMAT.format(STEPS))


@pytest.mark.slow
def test_checkpoints_upload_asynchronously_complete_and_resumable(timed_run, mlflow_server):
    config, result, reports = timed_run
    # rank 0 reported every checkpoint through Ray Train's background upload ...
    assert [r["name"] for r in reports] == [CHECKPOINT_DIR_FORMAT.format(s) for s in (1, 2, 3, 4)]
    assert {r["mode"] for r in reports} == {"ASYNC"}
    # ... from a folder of its own, which Ray Train deleted once uploaded (not before: every upload is complete)
    assert not any(Path(r["folder"]).exists() for r in reports)
    run_dir = Path(config.run.storage_path) / config.run.name
    for step in (1, 2, 3, 4):
        folder = run_dir / CHECKPOINT_DIR_FORMAT.format(step)
        assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "optimizer.pt", "progress.json"]
    # Ray Train's record (what a restart resumes from) and the MLflow run both name the last, complete checkpoint.
    assert result.checkpoint.path == str(run_dir / CHECKPOINT_DIR_FORMAT.format(STEPS))
    run = MlflowClient(mlflow_server).get_run(mlflow_run_id(config))
    assert run.data.tags["checkpoint"] == str(run_dir / CHECKPOINT_DIR_FORMAT.format(STEPS))
    model_config = config.model_config()
    model = build_ssl_model(model_config)
    optimizer, scheduler = build_optimizer(model, config.optim, model_config.backbone.enc_depths, STEPS)
    progress = load_checkpoint(result.checkpoint, model, optimizer, scheduler)
    assert (progress.global_step, progress.epoch, progress.step_in_epoch) == (STEPS, 2, 0)
    assert scheduler.last_epoch == STEPS
