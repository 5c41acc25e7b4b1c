"""compare_runs against a real MLflow tracking server: the table, the loss-curve PNG, and unknown runs."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from concerto_ray.compare import compare_runs
from concerto_ray.errors import ConfigError

STEPS = 30
LINE_COLORS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))  # matplotlib's C0 and C1


def _loss_curve(start: float, rate: float) -> list[float]:
    steps = np.arange(STEPS)
    return list(start * np.exp(-rate * steps) + 0.05 * np.sin(steps))


@pytest.fixture(scope="module")
def runs(mlflow_server):
    """Two runs in a fresh experiment: differing lr and seed, shared batch size and note, known loss histories."""
    client = MlflowClient(mlflow_server)
    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    specs = {
        "lr-high": {
            "params": {
                "model.name": "sonata-tiny",
                "optim.lr": "0.004",
                "data.batch_size": "4",
                "run.note": "same",
                "run.seed": "0",
            },
            "loss": _loss_curve(3.0, 0.10),
            "enc2d_loss": _loss_curve(1.0, 0.05),
            "val_miou": 0.41,
        },
        "lr-low": {
            "params": {
                "model.name": "sonata-tiny",
                "optim.lr": "0.0005",
                "data.batch_size": "4",
                "run.note": "same",
                "run.seed": "1",
                "optim.clip_grad": "3.0",
            },
            "loss": _loss_curve(3.0, 0.02),
            "enc2d_loss": _loss_curve(1.0, 0.01),
            "val_miou": 0.27,
        },
    }
    ids = {}
    now = int(time.time() * 1000)
    for name, spec in specs.items():
        run = client.create_run(experiment_id, run_name=name)
        metrics = [
            Metric(key, value, now + step, step)
            for key in ("loss", "enc2d_loss")
            for step, value in enumerate(spec[key])
        ]
        metrics.append(Metric("val_miou", spec["val_miou"], now, STEPS - 1))
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in spec["params"].items()])
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    return {"uri": mlflow_server, "experiment": experiment, "ids": ids, "specs": specs}


def _row(table: str, label: str) -> list[str]:
    """The cells of the table row whose label is `label` (labels hold no double spaces, cells are split by them)."""
    line = next((line for line in table.splitlines() if line.startswith(label + "  ")), None)
    assert line is not None, f"no row {label!r} in:\n{table}"
    return line[len(label) :].split()


def test_table_shows_differing_and_headline_params_and_final_metrics(runs, tmp_path):
    table = compare_runs(["lr-high", runs["ids"]["lr-low"]], tracking_uri=runs["uri"], out=tmp_path / "c.png")
    header = table.splitlines()[0]
    assert header.split() == ["lr-high", "lr-low"]
    assert _row(table, "run id") == [runs["ids"]["lr-high"], runs["ids"]["lr-low"]]
    assert _row(table, "param optim.lr") == ["0.004", "0.0005"]
    assert _row(table, "param run.seed") == ["0", "1"]
    assert _row(table, "param optim.clip_grad") == ["-", "3.0"]
    assert _row(table, "param model.name") == ["sonata-tiny", "sonata-tiny"]  # headline, shown though equal
    assert "run.note" not in table  # equal and not a headline param
    high, low = runs["specs"]["lr-high"], runs["specs"]["lr-low"]
    assert [float(v) for v in _row(table, "loss final")] == pytest.approx([high["loss"][-1], low["loss"][-1]], rel=1e-5)
    assert [float(v) for v in _row(table, "loss min")] == pytest.approx([min(high["loss"]), min(low["loss"])], rel=1e-5)
    assert [float(v) for v in _row(table, "enc2d_loss final")] == pytest.approx(
        [high["enc2d_loss"][-1], low["enc2d_loss"][-1]], rel=1e-5
    )
    assert [float(v) for v in _row(table, "val_miou final")] == pytest.approx([0.41, 0.27])
    assert "val_miou min" not in table  # only losses get a minimum
    # Aligned: every row's second cell starts in the column of the second run's header.
    column = header.index("lr-low")
    for line in table.splitlines()[1:]:
        if line and not line.startswith("loss curves"):
            assert line[column - 2 : column] == "  " and line[column] != " ", line


def test_loss_curves_png_is_a_real_plot(runs, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    table = compare_runs(["lr-high", "lr-low"], tracking_uri=runs["uri"], out=out)
    assert f"loss curves: {out}" in table
    assert out.stat().st_size > 10_000
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 500 and height >= 500  # two stacked panels: loss and enc2d_loss
        pixels = np.asarray(image.convert("RGB"))
    # Each panel (loss above, enc2d_loss below) holds both runs' curves in matplotlib's first two line colours:
    # measured ~600 pixels of each colour per panel; the legend's line samples alone give 60.
    for panel in (pixels[: height // 2], pixels[height // 2 :]):
        for color in LINE_COLORS:
            assert np.all(panel == color, axis=-1).sum() > 300, color


def test_names_are_looked_up_in_the_given_experiment(runs, tmp_path):
    table = compare_runs(["lr-low"], tracking_uri=runs["uri"], out=tmp_path / "c.png", experiment=runs["experiment"])
    assert _row(table, "run id") == [runs["ids"]["lr-low"]]
    with pytest.raises(ConfigError, match="no MLflow experiment named 'nope'"):
        compare_runs(["lr-low"], tracking_uri=runs["uri"], out=tmp_path / "c.png", experiment="nope")


def test_unknown_run_is_a_clear_error(runs, tmp_path):
    missing = uuid.uuid4().hex
    with pytest.raises(ConfigError, match=f"no MLflow run with id or name '{missing}' in any experiment"):
        compare_runs(["lr-high", missing], tracking_uri=runs["uri"], out=tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_a_name_shared_by_two_runs_asks_for_an_id(runs, tmp_path):
    client = MlflowClient(runs["uri"])
    experiment_id = client.get_experiment_by_name(runs["experiment"]).experiment_id
    first, second = (client.create_run(experiment_id, run_name="twin").info.run_id for _ in range(2))
    with pytest.raises(ConfigError, match="run name 'twin' matches 2 runs") as error:
        compare_runs(["twin"], tracking_uri=runs["uri"], out=tmp_path / "c.png")
    assert first in str(error.value) and second in str(error.value)
