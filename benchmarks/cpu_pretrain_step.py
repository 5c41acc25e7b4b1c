"""Step time and data-wait fraction of the tiny pre-training config on CPU workers (configs/pretrain-tiny.yaml).

Writes tiny synthetic scenes and shards, pre-trains for --epochs on a local Ray, then reads the per-step metrics the
run logged to MLflow (step_time_s, data_wait_s, data_wait_fraction, points_per_s) and prints their medians over
the steps after the first (which carries start-up).

    PYTHONPATH=. python benchmarks/cpu_pretrain_step.py --epochs 5 --out result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from transformers import Dinov2WithRegistersModel

from concerto_ray.data.shards import prepare
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.model.configs import get_model_config
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"
METRICS = ("step_time_s", "data_wait_s", "data_wait_fraction", "points_per_s", "loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="concerto-cpu-step-"))
    write_synthetic_dataset(work / "scenes", SynthConfig(scenes=args.scenes, points_per_scene=20000,
                                                         views_per_scene=8), progress=False)
    prepare(work / "scenes", str(work / "shards"), target_shard_mb=8, progress=False)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(get_model_config("tiny-concerto").image_encoder.architecture()).save_pretrained(
        work / "dinov2")
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    config = load_pretrain_config(CONFIG, [
        f"data.shards={work / 'shards'}", f"model.image_encoder_weights={work / 'dinov2'}",
        f"run.storage_path={work / 'runs'}", f"run.epochs={args.epochs}", f"mlflow.tracking_uri={tracking_uri}"])
    ray.init(address="local", include_dashboard=False)
    run_pretrain(config)
    run_id = json.loads((work / "runs" / config.run.name / RUN_ID_FILE).read_text())["run_id"]
    client = MlflowClient(tracking_uri)
    result = {"workers": config.run.num_workers, "cpus_per_worker": config.run.cpus_per_worker,
              "batch_per_worker": config.data.batch_size, "epochs": args.epochs}
    for key in METRICS:
        values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)][1:]
        result[f"{key}_median"] = statistics.median(values)
    result["steps"] = len(client.get_metric_history(run_id, "loss"))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
