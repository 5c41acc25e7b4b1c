"""Per-step metrics reach MLflow while a run goes on, and a restarted worker logs no step twice."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from concerto_ray.train.tracking import CHECKPOINT_TAG, StepMetrics


def test_step_metrics_are_live_and_logged_once_across_a_restart(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("live-metrics")).info.run_id

    first = StepMetrics(mlflow_server, run_id, flush_s=0.0)  # flush at every step
    for step in (1, 2, 3):
        first.add(step, {"loss": 10.0 - step, "lr": 0.1})
    # no checkpoint yet, and the steps are already in MLflow
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert CHECKPOINT_TAG not in client.get_run(run_id).data.tags

    # The worker dies after step 3; its replacement restarts from a checkpoint at step 1 and re-runs steps 2 and 3.
    second = StepMetrics(mlflow_server, run_id, flush_s=3600.0)  # only checkpoints flush
    for step in (2, 3, 4, 5):
        second.add(step, {"loss": 100.0 + step, "lr": 0.1, "val_miou": 0.5})
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]  # 4 and 5 wait for a flush
    second.commit("s3://bucket/runs/step-00000005")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 9.0),
        (2, 8.0),
        (3, 7.0),
        (4, 104.0),
        (5, 105.0),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run_id, "val_miou")] == [2, 3, 4, 5]  # a new key: all of it
    assert client.get_run(run_id).data.tags[CHECKPOINT_TAG] == "s3://bucket/runs/step-00000005"
