"""Sweeps on a real multi-node Ray cluster (tests/multinode.py: a head and two worker nodes, each its own `ray start`):
a trial whose training worker dies continues from its own checkpoint, and a killed sweep driver followed by
`concerto-ray sweep --resume` finishes without running the trials that had ended again.

Each sweep driver is a subprocess joined to that cluster (this process holds conftest's local Ray). On a cluster of
several nodes every path must be reachable from all of them: shards and sweep storage are on S3 (moto), MLflow is
its server. Two trials of the tiny linear probe, one at a time: 2 rounds of `STEPS_PER_ROUND` optimizer steps each.

Run as a script, this file is the `concerto-ray` command with a worker fault in one trial (`FAULT_ENV`), the way
tests/conftest.py's `inject_faults` replaces the workers' loop: the product has no fault hooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from multinode import MultiNodeCluster  # tests/ is on sys.path (under pytest, and as this script's folder)

from concerto_ray.data import storage as storage_module

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "configs" / "sweep-semseg-tiny.yaml"
FAULT_ENV = "CONCERTO_RAY_TEST_WORKER_FAULT"  # read by this file's __main__ only
STEPS_PER_ROUND = 4  # 2 training scenes x loop 2 (epochs 4 / eval_epochs 2), batch 1, one worker
ROUNDS = 2
GOOD_LR, OTHER_LR = 0.05, 0.02
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in the run's folder
ONE_TEST_PASS = "{test_rotations: [0.0], test_scales: [], test_flip: false}"
DRIVER_TIMEOUT_S = 600


# -- the driver with a worker fault (runs as __main__ in a subprocess; its functions reach Ray by value) ----------


def install_worker_fault(fault: dict) -> None:
    """In the trial whose lr is `fault["lr"]`, the training worker of the attempt that starts without a checkpoint
    exits abruptly (os._exit) at its first optimizer step of round 2, once Ray Train has recorded round 1's
    checkpoint. Every worker attempt of every trial appends {"run", "checkpoint"} (the checkpoint it started from) to
    the file `fault["attempts"]`."""
    import concerto_ray.finetune.sweep as sweep_module

    def run_trial(values: dict, sweep: dict, parent_run_id: str) -> None:  # in the trial's process
        import concerto_ray.finetune.sweep
        import concerto_ray.finetune.trainer

        kill = values["lr"] == fault["lr"]
        concerto_ray.finetune.trainer.finetune_loop_per_worker = lambda config: faulty_loop(kill, config)
        concerto_ray.finetune.sweep.run_trial(values, sweep, parent_run_id)  # this process's: the product's

    def faulty_loop(kill: bool, loop_config: dict) -> None:  # on the training worker
        import ray.train
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        from concerto_ray.finetune.trainer import finetune_loop_per_worker  # this process's: the product's

        context = ray.train.get_context()
        checkpoint = ray.train.get_checkpoint()
        with open(fault["attempts"], "a") as attempts:
            line = {"run": context.get_experiment_name(), "checkpoint": checkpoint.path if checkpoint else None}
            attempts.write(json.dumps(line) + "\n")
        if kill and checkpoint is None:
            run_uri = f"{fault['sweep_uri']}/{context.get_experiment_name()}"
            steps = []

            def before_step(optimizer, args, kwargs) -> None:
                steps.append(1)
                if len(steps) == STEPS_PER_ROUND + 1:
                    # A worker reports a checkpoint without waiting for the controller to record it; dying before
                    # that would restart from nothing.
                    deadline = time.monotonic() + 300
                    while not round_one_recorded(run_uri):
                        assert time.monotonic() < deadline, f"Ray Train did not record round-0001 in {run_uri}"
                        time.sleep(0.5)
                    os._exit(1)

            register_optimizer_step_pre_hook(before_step)
        finetune_loop_per_worker(loop_config)

    sweep_module.run_trial = run_trial


def round_one_recorded(run_uri: str) -> bool:
    """Whether Ray Train's record of the fine-tuning run in `run_uri` lists its round-1 checkpoint."""
    run_dir = storage_module.resolve(run_uri)
    return run_dir.exists(SNAPSHOT) and "round-0001" in run_dir.read_bytes(SNAPSHOT).decode()


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_shards(s3_server, sweep_scenes):
    """Parquet shards of the 3 tiny sweep scenes (2 train, 1 val) on S3."""
    from concerto_ray.data.shards import prepare

    uri = f"s3://{s3_server.bucket}/mn-sweep/shards"
    prepare(sweep_scenes, uri, progress=False)
    return uri


def sweep_args(shards: str, storage: str, name: str, tracking_uri: str) -> list[str]:
    """`concerto-ray sweep` of two lr values (a grid, no ASHA: both run their rounds), one trial at a time."""
    sets = [
        f"data.shards={shards}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"space={{lr: {{grid: [{GOOD_LR}, {OTHER_LR}]}}}}",
        "num_samples=1",
        "asha=null",
        "run.max_failures=0",  # a worker failure fails the trial: Tune's retry (max_trial_failures) takes it over
        "overrides.batch_size=1",
        f"overrides.transform={ONE_TEST_PASS}",
    ]
    return ["sweep", "--config", str(TINY_SWEEP), *[f"--set={value}" for value in sets]]


def children_by_lr(client: MlflowClient, parent_run_id: str) -> dict[float, object]:
    """The sweep's child runs by their lr, checking that each trial has exactly one."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}'"
    )
    by_lr = {float(child.data.params["finetune.lr"]): child for child in children}
    assert len(children) == len(by_lr) == 2, [child.info.run_name for child in children]
    return by_lr


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_trained_once(client: MlflowClient, child) -> None:
    """Every optimizer step and round of the child's fine-tuning logged exactly once, and the run finished."""
    run_id = child.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id, "loss") == list(range(1, ROUNDS * STEPS_PER_ROUND + 1))
    assert steps(client, run_id, "val_miou") == [STEPS_PER_ROUND * r for r in range(1, ROUNDS + 1)]
    assert len(client.get_metric_history(run_id, "best_val_miou")) == 1  # logged once, when the fine-tuning ends


def parent_run_id(storage: str, name: str) -> str:
    from concerto_ray.train.tracking import RUN_ID_FILE

    return json.loads(storage_module.resolve(f"{storage}/{name}").read_bytes(RUN_ID_FILE))["run_id"]


def tune_trials(storage: str, name: str) -> list[dict]:
    """Status and failure count of every trial, from Tune's own record of the experiment (its latest snapshot)."""
    tune_dir = storage_module.resolve(f"{storage}/{name}/tune")
    files = tune_dir.filesystem.get_file_info(pafs.FileSelector(tune_dir.root, allow_not_found=True))
    states = sorted(info.path for info in files if Path(info.path).name.startswith("experiment_state"))
    if not states:
        return []
    with tune_dir.filesystem.open_input_file(states[-1]) as f:
        state = json.loads(f.read())
    trials = []
    for trial_state, runtime in state["trial_data"]:
        trial_state, runtime = json.loads(trial_state), json.loads(runtime)
        trials.append(
            {
                "id": trial_state["trial_id"],
                "lr": trial_state["config"]["lr"],
                "status": trial_state["status"],
                "failures": runtime["num_failures"],
            }
        )
    return trials


@pytest.mark.slow
def test_a_killed_worker_then_a_killed_driver_and_resume(s3_server, s3_shards, mlflow_server, tmp_path):
    """One sweep, both failures (each start of a fine-tuning costs minutes on 2 cores): the first trial's worker
    dies in round 2 and Tune runs the trial again; the sweep's driver is killed while the second trial runs, after
    the first ended; `--resume` finishes the sweep."""
    storage, name = f"s3://{s3_server.bucket}/mn-sweep", "fault-and-resume"
    sweep_path = f"{s3_server.bucket}/mn-sweep/{name}"  # as Ray names checkpoints: a path in the S3 filesystem
    attempts = tmp_path / "attempts.jsonl"
    fault = {"lr": GOOD_LR, "attempts": str(attempts), "sweep_uri": f"{storage}/{name}"}
    command = [sys.executable, __file__, *sweep_args(s3_shards, storage, name, mlflow_server)]
    client = MlflowClient(mlflow_server)
    with MultiNodeCluster(tmp_path / "cluster", workers=2, cpus_per_worker=2) as cluster:
        env = cluster.driver_env(**{FAULT_ENV: json.dumps(fault)})
        with open(tmp_path / "first.log", "w") as log:
            driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
            # Kill the driver once Tune has recorded the first trial as ended, and the second has recorded a
            # checkpoint of its own.
            deadline = time.monotonic() + DRIVER_TIMEOUT_S
            while True:
                assert driver.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "the sweep did not get to its second trial's first round"
                trials = {trial["lr"]: trial for trial in tune_trials(storage, name)}
                second = trials.get(OTHER_LR)
                if (
                    trials.get(GOOD_LR, {}).get("status") == "TERMINATED"
                    and second is not None
                    and round_one_recorded(f"{storage}/{name}/trial-{second['id']}")
                ):
                    break
                time.sleep(1)
            driver.send_signal(signal.SIGKILL)
            driver.wait()

        # The first trial: Tune saw it fail once, and ran it again from its own round-1 checkpoint.
        first, second = (f"trial-{trials[lr]['id']}" for lr in (GOOD_LR, OTHER_LR))
        assert trials[GOOD_LR]["failures"] == 1
        assert checkpoints_started_from(attempts, first) == [None, f"{sweep_path}/{first}/round-0001"]
        parent = parent_run_id(storage, name)
        assert client.get_run(parent).info.status == "RUNNING"  # the killed driver did not close it
        ended = children_by_lr(client, parent)[GOOD_LR]
        assert_trained_once(client, ended)  # one MLflow child run, every step logged once across the restart

        done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
        assert done.returncode == 0, done.stdout + done.stderr[-4000:]
        assert "best of 2 trials" in done.stdout

    # The ended trial was not run again: its child run is the one that finished before the driver was killed.
    again = client.get_run(ended.info.run_id)
    assert (again.info.start_time, again.info.end_time) == (ended.info.start_time, ended.info.end_time)
    assert checkpoints_started_from(attempts, first) == [None, f"{sweep_path}/{first}/round-0001"]
    # The interrupted trial continued from its own round-1 checkpoint, in its own child run.
    assert checkpoints_started_from(attempts, second) == [None, f"{sweep_path}/{second}/round-0001"]
    children = children_by_lr(client, parent)
    for child in children.values():
        assert_trained_once(client, child)
    assert {(trial["lr"], trial["status"]) for trial in tune_trials(storage, name)} == {
        (GOOD_LR, "TERMINATED"),
        (OTHER_LR, "TERMINATED"),
    }
    # The same parent run, closed with the better of the two trials.
    finished = client.get_run(parent)
    assert finished.info.status == "FINISHED"
    best = max(children.values(), key=lambda child: client.get_run(child.info.run_id).data.metrics["best_val_miou"])
    assert finished.data.metrics["best_val_miou"] == pytest.approx(
        client.get_run(best.info.run_id).data.metrics["best_val_miou"]
    )
    assert f"trial-{finished.data.tags['best_trial']}" == best.info.run_name


def checkpoints_started_from(attempts: Path, run_name: str) -> list[str | None]:
    """The checkpoint each training-worker attempt of the trial's fine-tuning run started from, in order."""
    lines = [json.loads(line) for line in attempts.read_text().splitlines()]
    return [line["checkpoint"] for line in lines if line["run"] == run_name]


def test_resume_of_a_sweep_that_never_ran_names_the_folder(s3_server, s3_shards, mlflow_server, capsys):
    from concerto_ray.cli import main

    storage = f"s3://{s3_server.bucket}/mn-sweep/never"
    args = sweep_args(s3_shards, storage, "never-ran", mlflow_server)
    assert main([*args, "--resume"]) == 2
    assert (
        f"cannot resume sweep 'never-ran': no Ray Tune experiment at {storage}/never-ran/tune"
        in capsys.readouterr().err
    )


if __name__ == "__main__":
    from concerto_ray.cli import main

    install_worker_fault(json.loads(os.environ[FAULT_ENV]))
    sys.exit(main(sys.argv[1:]))
