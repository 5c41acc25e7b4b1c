"""The end-to-end demo on embedded defaults: local Ray, synthetic scenes, local storage, local MLflow.

    synthetic rooms -> parquet shards -> Concerto pre-training (Ray Train, CPU workers)
      -> linear probes of the pre-trained backbone and of the same backbone before pre-training -> mIoU table

The random-init probe reads the very weights pre-training started from (the run's seed), and both probes share
their own seed, so the two rows differ only by what pre-training changed.

Every stage is resumable: a rerun reuses the scenes, shards and finished runs already in the work folder.
The frozen 2D teacher is a tiny DINOv2 with random weights (nothing may be downloaded here); pass
`dinov2` to use real weights of the same architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import torch
from transformers import Dinov2WithRegistersModel

from concerto_ray.config import CONFIG_DIR
from concerto_ray.console import start_ray
from concerto_ray.data.shards import prepare
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.run_config import load_finetune_run
from concerto_ray.finetune.trainer import SCORE, run_finetune
from concerto_ray.model.configs import get_model_config
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.loop import build_training_model
from concerto_ray.train.state import save_model
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain

PRETRAIN_CONFIG = CONFIG_DIR / "pretrain-tiny.yaml"
PROBE_CONFIG = "semseg-tiny-lin"
# Two evaluation rounds of one test-time pass each: the reference's 13 test-time augmentations per round would
# make the probes, not the pre-training, most of the demo's time on two cores.
DEMO_PROBE = {
    "eval_epochs": 2,
    "transform.test_rotations": [0.0],
    "transform.test_scales": [],
    "transform.test_flip": False,
}
# A checkpoint every few minutes rather than the tiny config's every 2 steps (which the recovery tests need).
DEMO_CHECKPOINT_EVERY = 60
RESULTS_FILE = "results.txt"
INITIAL_WEIGHTS_FILE = "initial-weights.pt"


def run_demo(
    workdir: Path,
    scenes: int = 16,
    seed: int = 0,
    pretrain_epochs: int = 30,
    probe_epochs: int = 20,
    dinov2: Path | None = None,
) -> None:
    rounds = DEMO_PROBE["eval_epochs"]
    if probe_epochs < rounds or probe_epochs % rounds:  # found now, not after the pre-training
        raise ConfigError(
            f"probe epochs ({probe_epochs}) must be a positive multiple of {rounds}: "
            f"each probe evaluates {rounds} times"
        )
    workdir = workdir.resolve()
    scenes_dir, shards_dir = workdir / "scenes", workdir / "shards"
    # A Ray of its own unless RAY_ADDRESS names a cluster (never one that a stale `ray start` left behind), or the
    # caller's if it is already connected; with its dashboard: Ray Train's clean-up of stopped runs asks the state
    # API it serves.
    own_ray = not ray.is_initialized()
    start_ray(workdir / "logs" / "demo.log", address=os.environ.get("RAY_ADDRESS", "local"))
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    runs = workdir / "runs"
    if not (scenes_dir / "splits").is_dir():
        print(f"[1/4] writing {scenes} synthetic scenes to {scenes_dir}")
        write_synthetic_dataset(
            scenes_dir, SynthConfig(scenes=scenes, seed=seed, points_per_scene=20000, views_per_scene=8)
        )
    print(f"[2/4] converting them to parquet shards in {shards_dir}")
    print(prepare(scenes_dir, str(shards_dir), target_shard_mb=8).summary())
    if dinov2 is None:
        dinov2 = workdir / "dinov2-tiny"
        if not (dinov2 / "config.json").is_file():
            torch.manual_seed(seed)
            architecture = get_model_config("tiny-concerto").image_encoder.architecture()
            Dinov2WithRegistersModel(architecture).save_pretrained(dinov2)

    pretrain = load_pretrain_config(
        PRETRAIN_CONFIG,
        [
            f"data.shards={shards_dir}",
            f"model.image_encoder_weights={dinov2}",
            f"run.storage_path={runs}",
            f"run.epochs={pretrain_epochs}",
            f"run.seed={seed}",
            f"run.checkpoint_every={DEMO_CHECKPOINT_EVERY}",
            f"mlflow.tracking_uri={tracking_uri}",
        ],
    )
    print(
        f"[3/4] pre-training tiny Concerto for {pretrain_epochs} epochs on {pretrain.run.num_workers} CPU workers, "
        f"fed by Ray Data"
    )
    run_dir = runs / pretrain.run.name
    initial_weights = workdir / INITIAL_WEIGHTS_FILE
    if not initial_weights.is_file():
        save_model(build_training_model(pretrain), initial_weights, pretrain.model.name)
    # a finished run resumes to its end at once
    run_pretrain(pretrain, resume=(run_dir / RUN_ID_FILE).exists(), show_progress=True)
    checkpoint = sorted(run_dir.glob("step-*"))[-1]
    print(f"      checkpoint: {checkpoint}")

    print("[4/4] linear probes on the held-out scenes: the backbone after vs before pre-training")
    results = {}
    for label, name, pretrained in (
        ("pre-trained", "probe-pretrained", checkpoint / "model.pt"),
        ("random init", "probe-random", initial_weights),
    ):
        probe = load_finetune_run(
            PROBE_CONFIG,
            {
                "data.shards": str(shards_dir),
                "run.storage_path": str(runs),
                "run.name": name,
                "mlflow.tracking_uri": tracking_uri,
                "pretrained.path": str(pretrained),
                "epochs": probe_epochs,
                **DEMO_PROBE,
            },
        )
        result = run_finetune(probe, resume=(runs / name).exists(), show_progress=True)
        results[label] = max((metrics for _, metrics in result.best_checkpoints), key=lambda m: m[SCORE])

    if own_ray:
        ray.shutdown()
    lines = [
        "linear probe on held-out synthetic scenes (ScanNet-20 classes)",
        f"{'backbone':14s} {'mIoU':>7s} {'mAcc':>7s} {'allAcc':>7s}",
    ]
    lines += [
        f"{label:14s} {metrics['val_miou']:7.3f} {metrics['val_macc']:7.3f} {metrics['val_all_acc']:7.3f}"
        for label, metrics in results.items()
    ]
    (workdir / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\n(also in {workdir / RESULTS_FILE})")
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
