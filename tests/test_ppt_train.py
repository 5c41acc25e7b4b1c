"""Point Prompt Training on Ray Train (local Ray, MLflow server): the tiny PPT config trains on three synthetic
flavours (Structured3D, ScanNet, S3DIS), each from its own shards under data.sources_root, in the reference's turns,
and validates and tests on ScanNet with ScanNet's classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from concerto_ray.data.scannet_classes import SCANNET20_IDS
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.evaluate import evaluate_scene
from concerto_ray.finetune.multi_dataset import compose_round
from concerto_ray.finetune.run_config import load_finetune_run, plan_finetune
from concerto_ray.finetune.segmentor import for_evaluation
from concerto_ray.finetune.trainer import (
    CONDITION_METRIC,
    SUBMISSION_DIR,
    load_finetuned,
    read_test_scenes,
    run_finetune,
)
from concerto_ray.model.text_encoder import write_random_clip
from concerto_ray.train.tracking import RUN_ID_FILE

SPLITS = {
    "structured3d": {"train": 0.75, "val": 0.25},
    "scannet": {"train": 0.5, "val": 0.25, "test": 0.25},
    "s3dis": {"Area_1": 1.0},
}


@pytest.fixture(scope="module")
def sources_root(tmp_path_factory) -> Path:
    """Each flavour prepared to <root>/<flavour>, as the PPT configs expect."""
    base = tmp_path_factory.mktemp("ppt")
    for flavour, splits in SPLITS.items():
        config = SynthConfig(
            scenes=4,
            points_per_scene=800,
            views_per_scene=1,
            image_width=16,
            image_height=16,
            splits=splits,
            flavor=flavour,
        )
        write_synthetic_dataset(base / "raw" / flavour, config, progress=False)
        prepare(base / "raw" / flavour, str(base / "shards" / flavour), progress=False)
    write_random_clip(base / "clip")
    return base


def _run(root: Path, storage: Path, tracking_uri: str, **overrides):
    values = {
        "data.shards": str(root / "shards" / "scannet"),
        "data.sources_root": str(root / "shards"),
        "ppt.clip_model": str(root / "clip"),
        "run.name": "ppt",
        "run.storage_path": str(storage),
        "run.num_workers": 1,
        "run.cpus_per_worker": 0.5,
        "mlflow.tracking_uri": tracking_uri,
        "mix_prob": 0.0,
        "batch_size": 1,
        "transform.test_rotations": [0.0],
        "transform.test_scales": [],
        "transform.test_flip": False,
    }
    return load_finetune_run("semseg-tiny-ppt", {**values, **overrides})


def test_joint_training_takes_the_reference_turns_and_validates_on_its_own_dataset(
    ray_local, sources_root, mlflow_server, tmp_path
):
    run = _run(sources_root, tmp_path, mlflow_server)
    plan = plan_finetune(run)
    scenes = [
        len([n for s in read_manifest(sources_root / "shards" / f).scenes[split].shards for n in s.samples])
        for f, split in (("structured3d", "train"), ("scannet", "train"), ("s3dis", "Area_1"))
    ]
    # the first source (Structured3D) sets the round: its batches (of 1), in turns of 2 / 1 / 1 batches
    batches = scenes
    expected = [i for i, _ in compose_round([lambda n=n: iter(range(n)) for n in batches], (2, 1, 1))]
    assert plan.round.ratios == (2, 1, 1) and plan.round.steps == len(expected) >= 4
    result = run_finetune(run)

    client = MlflowClient(mlflow_server)
    run_id = json.loads((Path(run.run.run_uri) / RUN_ID_FILE).read_text())["run_id"]
    conditions = [
        int(m.value) for m in sorted(client.get_metric_history(run_id, CONDITION_METRIC), key=lambda m: m.step)
    ]
    assert conditions == expected * 2  # two rounds, each in the reference's turns (0 Structured3D, 1 ScanNet, 2 S3DIS)
    assert 0 <= result.metrics["val_miou"] <= 1 and 0 <= result.metrics["test_miou"] <= 1
    table = Path(client.download_artifacts(run_id, "eval/round-0002/per_class_iou.txt", str(tmp_path)))
    assert [line.split()[1] for line in table.read_text().splitlines()[1:3]] == ["wall", "floor"]
    assert len(table.read_text().splitlines()) >= 1 + 20  # ScanNet's 20 classes, not another dataset's
    state = torch.load(Path(result.checkpoint.path) / "model.pt", weights_only=True)["state_dict"]
    assert {"proj_head.weight", "proj_head.bias", "logit_scale"} <= set(state)


def test_a_submit_run_trains_on_train_and_val_and_writes_the_last_rounds_test_predictions(
    ray_local, sources_root, mlflow_server, tmp_path
):
    """The -submit configs' settings: no validation, the last round tested on the unlabelled test split, each
    test scene's ScanNet label ids written to submit/<scene>.txt."""
    sources = _sources(Area_5=False)
    sources[1]["splits"] = ["train", "val"]
    run = _run(
        sources_root,
        tmp_path,
        mlflow_server,
        **{
            "run.name": "ppt-submit",
            "val_split": [],
            "test_split": ["test"],
            "evaluate": False,
            "test_last": True,
            "submission": True,
            "ppt.sources": sources,
            # a deterministic test pass, so that the predictions can be recomputed here from the checkpoint
            "backbone.shuffle_orders": False,
            "backbone.pooling_shuffle_orders": False,
        },
    )
    plan = plan_finetune(run)
    test_root = sources_root / "raw" / "scannet" / "test"
    scenes = sorted(path.name for path in test_root.iterdir() if path.is_dir())  # as Pointcept lists them
    assert plan.val_scenes == [] and sorted(plan.test_scenes) == scenes != []
    result = run_finetune(run)

    client = MlflowClient(mlflow_server)
    run_id = json.loads((Path(run.run.run_uri) / RUN_ID_FILE).read_text())["run_id"]
    logged = client.get_run(run_id).data.metrics
    assert not [key for key in logged if key.startswith(("val_", "test_", "best_"))]  # unlabelled: no test metric
    assert result.metrics["round"] == 2
    submit = Path(run.run.run_uri) / SUBMISSION_DIR
    assert sorted(path.stem for path in submit.iterdir()) == scenes
    model = for_evaluation(load_finetuned(run.finetune, result.checkpoint.path), run.finetune)  # the last round's
    for scene in read_test_scenes(run).take_all():
        ids = np.loadtxt(submit / f"{scene['name']}.txt", dtype=np.int64, ndmin=1)
        raw = np.load(test_root / scene["name"] / "coord.npy")
        assert ids.shape == (len(raw),) and set(ids) <= set(SCANNET20_IDS)
        np.testing.assert_array_equal(ids, np.asarray(SCANNET20_IDS)[evaluate_scene(model, scene, run.finetune)])


def test_ppt_runs_are_checked_before_ray(sources_root, tmp_path):
    with pytest.raises(ConfigError, match=r"relative to data.sources_root, which is not set"):
        plan_finetune(_run(sources_root, tmp_path, "sqlite:///x.db", **{"data.sources_root": None}))
    with pytest.raises(ConfigError, match=r"finetune.ppt.sources\[2\].splits: 'Area_5' has no scene folders"):
        plan_finetune(_run(sources_root, tmp_path, "sqlite:///x.db", **{"ppt.sources": _sources(Area_5=True)}))
    with pytest.raises(ConfigError, match=r"ppt trains the whole model: mode must be 'ft'"):
        _run(sources_root, tmp_path, "sqlite:///x.db", mode="dec", **{"backbone.freeze_encoder": True})


def _sources(Area_5: bool) -> list[dict]:
    return [
        {"condition": "Structured3D", "dataset": "structured3d", "splits": ["train"], "ratio": 2},
        {"condition": "ScanNet", "dataset": "scannet", "splits": ["train"]},
        {"condition": "S3DIS", "dataset": "s3dis", "splits": ["Area_5" if Area_5 else "Area_1"]},
    ]
