"""`run.seed` fixes a run: the epoch order, every augmentation of a sample and the model's masks.

The pre-training runs are the shipped tiny config on one CPU worker for one epoch (4 steps of one sample), with
`data.preserve_order` (the default) so that the single worker sees the samples in the plan's order. (Without it the
epoch's two read tasks hand their samples over as they finish: two same-seed runs once agreed at steps 1-2 and not at
3-4.) Each step's sample names are compared as well as its loss: a changed order fails every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import recorded  # tests/ is on sys.path under pytest
from mlflow.tracking import MlflowClient

from concerto_ray.data.layout import list_samples, read_sample
from concerto_ray.data.pipeline import SampleTransform, StreamConfig
from concerto_ray.data.presets import ConcertoPretrainTransformConfig
from concerto_ray.data.record import record_to_row
from concerto_ray.data.sources import DRAW_COLUMN, EPOCH_COLUMN, SOURCE_COLUMN
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain-tiny.yaml"
TINY = ConcertoPretrainTransformConfig(crop_h=28, crop_w=28, max_size=1024, enc2d_max_size=1024)


def test_a_sample_is_augmented_by_seed_epoch_and_draw(tmp_path):
    write_synthetic_dataset(
        tmp_path,
        SynthConfig(
            scenes=1, points_per_scene=1500, views_per_scene=2, image_width=48, image_height=32, splits={"train": 1.0}
        ),
        progress=False,
    )
    row = record_to_row(read_sample(list_samples(tmp_path)[0], "synth"))

    def views(seed: int | None, epoch: int, draw: int = 0) -> np.ndarray:
        transform = SampleTransform(StreamConfig(shards="unused", seed=seed, pretrain=TINY))
        sample = transform({**row, SOURCE_COLUMN: "synth", EPOCH_COLUMN: epoch, DRAW_COLUMN: draw})[0]
        return sample["global_coord"]

    first = views(7, epoch=3)
    assert np.array_equal(first, views(7, epoch=3))  # a new transform object, the same draws
    for other in (views(8, epoch=3), views(7, epoch=4), views(7, epoch=3, draw=1)):
        assert other.shape != first.shape or not np.allclose(other, first)


def _epoch_losses(config, inject_faults, record_to: Path) -> list[float]:
    """The losses of a run's steps; checks the per-source sample count it logged (the fixture's 4 scenes). Each
    step's sample names are recorded in `record_to` (`inject_faults`)."""
    inject_faults(record_to=record_to)
    run_pretrain(config)
    run_id = json.loads((Path(config.run.storage_path) / config.run.name / RUN_ID_FILE).read_text())["run_id"]
    client = MlflowClient(config.mlflow.tracking_uri)
    assert client.get_run(run_id).data.metrics["samples_per_epoch/scenes"] == 4
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_same_seed_same_losses_other_seed_other_losses(
    ray_local, dinov2_dir, pretrain_shards, mlflow_server, inject_faults, tmp_path
):
    def config(name: str, seed: int, *extra: str):
        return load_pretrain_config(
            TINY_CONFIG,
            [
                f"data.shards={pretrain_shards}",
                f"model.image_encoder_weights={dinov2_dir}",
                f"run.name={name}",
                f"run.storage_path={tmp_path}",
                f"mlflow.tracking_uri={mlflow_server}",
                f"run.seed={seed}",
                "run.num_workers=1",
                "run.epochs=1",
                "run.checkpoint_every=100",
                "data.pretrain.crop_h=28",
                "data.pretrain.crop_w=28",
                "data.pretrain.max_size=1024",
                "data.pretrain.enc2d_max_size=1024",
                *extra,
            ],
        )

    def run(name: str, seed: int, *extra: str) -> tuple[list[float], list[list[str]]]:
        losses = _epoch_losses(config(name, seed, *extra), inject_faults, tmp_path / name)
        return losses, [e["names"] for e in recorded(tmp_path / name)[0] if e["kind"] == "step"]

    first, first_names = run("seed0-a", 0)
    assert len(first) == 4 and all(np.isfinite(first))
    every_name = [n for names in first_names for n in names]
    assert len(every_name) == len(set(every_name)) == 4  # the epoch: each of the 4 scenes once
    assert run("seed0-b", 0) == (first, first_names)
    other, other_names = run("seed1", 1)
    assert len(other) == 4 and all(a != b for a, b in zip(other, first))
    assert other_names != first_names  # another seed, another order
    # An epoch smaller than the batch trains as Pointcept's loader does: one short batch, one step.
    losses = _epoch_losses(config("short", 0, "data.batch_size=8"), inject_faults, tmp_path / "short")
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] not in first
