"""The README's main command, `concerto-ray demo`, end to end on a few small scenes: every stage runs and the
mIoU table is printed and written."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from concerto_ray.demo import RESULTS_FILE, run_demo

ROW = re.compile(r"^(pre-trained|random init)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})$")


@pytest.mark.slow
def test_demo_prints_and_writes_the_probe_table(ray_local, tmp_path, capsys):
    run_demo(tmp_path, scenes=4, pretrain_epochs=1)

    out, err = capsys.readouterr()
    # A calm terminal: the stages, one bar each (stderr; redrawn with \r), the summaries and the table; Ray's own
    # logs, its workers' output and library warnings are in the log file named first.
    assert out.count("\n") + err.count("\n") < 60, out + err
    for internal in ("pid=", "Execution plan", "INFO", "WARNING", "Warning"):
        assert internal not in out + err, internal
    assert out.startswith(f"logs: {tmp_path / 'logs' / 'demo.log'} (Ray's own: ")
    assert "pre-training: 3 steps in " in out and "probe-pretrained: " in out and "probe-random: " in out
    assert (tmp_path / "logs" / "demo.log").stat().st_size > 0
    table = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert table[0] == "linear probe on held-out synthetic scenes (ScanNet-20 classes)"
    rows = {match[1]: [float(v) for v in match.groups()[1:]] for match in map(ROW.match, table[2:])}
    assert set(rows) == {"pre-trained", "random init"}
    assert all(0.0 < value <= 1.0 for values in rows.values() for value in values)
    assert "\n".join(table) in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out

    # 4 scenes: 3 train (2 samples each), 1 held out; one epoch on 2 workers of batch 1 = 3 optimizer steps
    assert sorted(p.name for p in (tmp_path / "runs" / "pretrain-tiny").glob("step-*")) == ["step-00000003"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert {run.info.run_name: run.info.status for run in runs} == {
        "pretrain-tiny": "FINISHED",
        "probe-pretrained": "FINISHED",
        "probe-random": "FINISHED",
    }
