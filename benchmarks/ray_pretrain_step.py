"""Pre-training step time, data-wait fraction and worker scaling through Ray (Ray Data stream -> Ray Train).

Writes synthetic scenes and parquet shards, then pre-trains with each worker count of --workers on a local Ray and
reads the per-step metrics that rank 0 logged to MLflow: step_time_s, data_wait_s (time the step waited for its
batches), data_wait_fraction and points_per_s (points of all workers per second). Medians skip the first
--skip-steps steps (start-up); the data-wait fraction is also given as the share of all those steps' time, which
counts the waits at epoch starts. With several worker counts it prints the throughput of each relative to the first.

    # the tiny config on CPU workers (issue: pre-training)
    PYTHONPATH=. python benchmarks/ray_pretrain_step.py --epochs 5 --out cpu.json
    # the base config on 1 and 2 GPUs, ScanNet-sized scenes (issue: GPU throughput)
    PYTHONPATH=.:/tmp/site python benchmarks/ray_pretrain_step.py --config configs/pretrain-concerto-v1m1-0-base.yaml \
        --gpu --workers 1,2 --scenes 32 --points 150000 --views 12 --image-size 640x480 --epochs 2 \
        --set data.batch_size=2 --out gpu.json
    # CPU cores per GPU: one GPU worker at the paper's batch, the local Ray given 4, 8 and 16 CPUs in turn
    PYTHONPATH=.:/tmp/site python benchmarks/ray_pretrain_step.py --config configs/pretrain-concerto-v1m1-0-base.yaml \
        --gpu --workers 1 --cpus 16,8,4 --scenes 32 --points 150000 --views 12 --image-size 640x480 --epochs 2 \
        --set data.sources=[] --set data.sources_root=null --set data.splits=[train] --set run.cpus_per_worker=1 \
        --out cores.json
    # before / after a change, on the same scenes: --work keeps them; --profile-steps writes step_profile.py's
    # breakdown of rank 0's steps 6..6+N (the whole step as the loop runs it: the wait for data, the copy, the
    # model, the metrics) to --out's folder; those steps and the one after are left out of the medians
    PYTHONPATH=.:benchmarks:/tmp/site python benchmarks/ray_pretrain_step.py --config \
        configs/pretrain-concerto-v1m1-0-base.yaml --gpu --workers 1 --scenes 8 --points 150000 --views 12 \
        --image-size 640x480 --epochs 2 --set data.batch_size=2 --work /tmp/step --label after --profile-steps 2 \
        --out after.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import step_profile
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch.profiler import ProfilerActivity, profile
from transformers import Dinov2WithRegistersModel

from concerto_ray.data.shards import prepare
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.model.configs import get_model_config
from concerto_ray.train import loop, trainer
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"
PROFILE_FIRST = 6  # the first profiled optimizer step (0-based): past start-up


def write_inputs(work: Path, model_name: str, scenes: int, points: int, views: int, width: int, height: int) -> Path:
    """Synthetic train scenes and their shards in `work/shards`, and a random-weight DINOv2 of the model config's
    architecture (no downloads), unless `work` has them from an earlier invocation; returns the DINOv2 folder."""
    started = time.perf_counter()
    if not (work / "shards").exists():
        write_synthetic_dataset(
            work / "scenes",
            SynthConfig(
                scenes=scenes,
                points_per_scene=points,
                views_per_scene=views,
                image_width=width,
                image_height=height,
                splits={"train": 1.0},
            ),
            progress=False,
        )
        prepare(work / "scenes", str(work / "shards"), target_shard_mb=16, progress=False)
        print(f"scenes and shards written in {time.perf_counter() - started:.0f} s")
    dinov2 = work / f"dinov2-{model_name}"
    if not dinov2.exists():
        torch.manual_seed(0)
        Dinov2WithRegistersModel(get_model_config(model_name).image_encoder.architecture()).save_pretrained(dinov2)
    return dinov2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: the config's)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument(
        "--cpus", default=None, help="comma-separated CPU counts for the local Ray, each run in turn (default: all)"
    )
    parser.add_argument("--scenes", type=int, default=8, help="synthetic scenes, all in the train split")
    parser.add_argument("--points", type=int, default=20000, help="points per scene")
    parser.add_argument("--views", type=int, default=8, help="RGB-D frames per scene")
    parser.add_argument("--image-size", default="320x240", help="WIDTHxHEIGHT of the frames")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--skip-steps", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--work", type=Path, help="scenes, shards and runs here, kept for the next invocation")
    parser.add_argument("--label", default="", help="added to the run names (runs in one --work must differ)")
    parser.add_argument("--profile-steps", type=int, default=0, help="torch.profiler over rank 0's steps 6..6+N")
    parser.add_argument(
        "--sdpa-without-cudnn",
        action="store_true",
        help="workers run attention without cuDNN's SDPA kernels, whose plans are built for each new shape",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))

    work = args.work or Path(tempfile.mkdtemp(prefix="concerto-ray-step-"))
    if args.out:  # the profile is written beside it, from the worker, before the report is
        args.out.parent.mkdir(parents=True, exist_ok=True)
    model_name = yaml.safe_load(args.config.read_text())["model"]["name"]
    dinov2 = write_inputs(work, model_name, args.scenes, args.points, args.views, width, height)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    profiled = range(PROFILE_FIRST + 1, PROFILE_FIRST + args.profile_steps + 2) if args.profile_steps else range(0)

    counts = [int(n) for n in args.workers.split(",")] if args.workers else [None]
    cpu_counts = [int(n) for n in args.cpus.split(",")] if args.cpus else [None]
    report = {
        "config": str(args.config),
        "overrides": args.set,
        "scenes": args.scenes,
        "points": args.points,
        "views": args.views,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "gpu_name": torch.cuda.get_device_name(0) if args.gpu else None,
        "runs": [],
    }
    results = report["runs"]
    for cpus in cpu_counts:
        # A fresh local Ray per CPU count: Ray Data's transform tasks get the CPUs the training workers leave.
        ray.init(address="local", include_dashboard=False, num_cpus=cpus)
        for workers in counts:
            name = f"step-{workers}w" + (f"-{cpus}cpu" if cpus else "") + (f"-{args.label}" if args.label else "")
            config = load_pretrain_config(
                args.config,
                [
                    *args.set,
                    f"data.shards={work / 'shards'}",
                    f"model.image_encoder_weights={dinov2}",
                    f"run.storage_path={work / 'runs'}",
                    f"run.name={name}",
                    *([f"run.num_workers={workers}"] if workers else []),
                    f"run.use_gpu={args.gpu}",
                    f"run.epochs={args.epochs}",
                    "run.checkpoint_every=1000000",
                    f"mlflow.tracking_uri={tracking_uri}",
                ],
            )
            with contextlib.ExitStack() as stack:
                if args.profile_steps:
                    profile_out = (args.out or work / "step.json").with_suffix(f".{name}.profile.json")
                    stack.enter_context(profiled_workers(args.profile_steps, profile_out))
                if args.sdpa_without_cudnn:  # entered last: it wraps the profiled loop
                    stack.enter_context(workers_without_cudnn_attention())
                run_pretrain(config)
            run_id = json.loads((work / "runs" / name / RUN_ID_FILE).read_text())["run_id"]
            results.append(
                summarise(
                    MlflowClient(tracking_uri),
                    run_id,
                    args.skip_steps,
                    profiled,
                    dict(
                        workers=config.run.num_workers,
                        gpu=args.gpu,
                        ray_cpus=int(ray.cluster_resources()["CPU"]),
                        cpus_per_worker=config.run.cpus_per_worker,
                        batch_per_worker=config.data.batch_size,
                        accumulation=config.optim.grad_accumulation,
                        amp=config.run.amp,
                    ),
                )
            )
            print(json.dumps(results[-1], indent=2))
            if args.out:  # after each run, so that a run cut short by a time limit keeps the finished ones
                args.out.write_text(json.dumps(report, indent=2))
        ray.shutdown()
    for result in results[1:]:
        result["throughput_vs_first"] = result["points_per_s_median"] / results[0]["points_per_s_median"]
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def summarise(client: MlflowClient, run_id: str, skip: int, left_out: range, result: dict) -> dict:
    def history(key: str) -> list[float]:
        metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in metrics if m.step > skip and m.step not in left_out]

    step_times, waits = history("step_time_s"), history("data_wait_s")
    samples_per_step = result["workers"] * result["batch_per_worker"] * result["accumulation"]
    result.update(
        steps_measured=len(step_times),
        step_time_s_min=min(step_times),
        step_time_s_median=statistics.median(step_times),
        step_time_s_max=max(step_times),
        data_wait_fraction_median=statistics.median(history("data_wait_fraction")),
        data_wait_fraction_total=sum(waits) / sum(step_times),
        points_per_s_median=statistics.median(history("points_per_s")),
        # the most points any worker had over the workers' mean: the step waits for the slowest
        points_imbalance_median=statistics.median(history("points_imbalance")),
        points_imbalance_max=max(history("points_imbalance")),
        samples_per_s=samples_per_step / statistics.median(step_times),
        # over every measured step, epoch starts included
        samples_per_s_overall=samples_per_step * len(step_times) / sum(step_times),
    )
    return result


@contextlib.contextmanager
def workers_without_cudnn_attention():
    """While `run_pretrain` runs: the workers' SDPA leaves out cuDNN's kernels. A Ray-fed step meets new patch
    counts every step (a benchmark on repeated batches does not), and cuDNN builds an execution plan per new shape
    on the host; this tells whether that is where the Ray-fed step's time goes."""
    original_loop = trainer.train_loop_per_worker

    def loop_without_cudnn_attention(loop_config: dict) -> None:
        torch.backends.cuda.enable_cudnn_sdp(False)
        original_loop(loop_config)

    trainer.train_loop_per_worker = loop_without_cudnn_attention
    try:
        yield
    finally:
        trainer.train_loop_per_worker = original_loop


@contextlib.contextmanager
def profiled_workers(steps: int, out: Path):
    """While `run_pretrain` runs: rank 0's worker profiles its optimizer steps PROFILE_FIRST.. PROFILE_FIRST + `steps`
    (0-based), from the start of the first to the start of the one after (so the time between steps, where the loop
    waits for data and logs metrics, counts), and writes step_profile.summarize's breakdown to `out`."""

    def profiled_loop(loop_config: dict) -> None:  # a closure: Ray ships it to the workers by value
        gpu = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        synchronize = torch.cuda.synchronize if gpu else lambda: None
        state = {}
        original = loop.Worker.optimizer_step

        def optimizer_step(worker, micro_batches):
            step = worker.progress.global_step
            if worker.rank == 0 and step == PROFILE_FIRST:
                synchronize()
                state["profile"] = profile(activities=activities, with_stack=True)
                state["profile"].start()
                state["start"] = time.perf_counter()
            elif worker.rank == 0 and step == PROFILE_FIRST + steps and "profile" in state:
                synchronize()
                wall = time.perf_counter() - state["start"]
                state["profile"].stop()
                summary = step_profile.summarize(state["profile"], steps, wall)
                if gpu:  # the most the worker's process had allocated so far (steps 0 .. PROFILE_FIRST + steps)
                    summary["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    summary["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                out.write_text(json.dumps(summary, indent=1))
            return original(worker, micro_batches)

        loop.Worker.optimizer_step = optimizer_step  # in this worker process only
        loop.train_loop_per_worker(loop_config)

    original_loop = trainer.train_loop_per_worker
    trainer.train_loop_per_worker = profiled_loop
    try:
        yield
    finally:
        trainer.train_loop_per_worker = original_loop


if __name__ == "__main__":
    main()
