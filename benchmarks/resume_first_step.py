"""Time from `--resume` to the resumed run's first optimizer step, early and late in a long epoch.

For each checkpoint step K of --at: a tiny-config run on the local Ray stops right after its step-K checkpoint is
recorded (rank 0 raises before step K+1; run.max_failures=0), then `run_pretrain(resume=True)` continues it, and rank 0
notes the wall-clock time at the start of its first optimizer step (the run is stopped there). The figure is that
time minus the time `run_pretrain` was called: driver set-up, worker start, checkpoint load, and whatever the stream
does before the first batch of the interrupted epoch arrives (a replaying stream reads and transforms the K steps'
samples first). The epoch is long (--scenes samples, 2 workers x batch 1: scenes / 2 steps), so K late in it shows
the replay. Rounds alternate the positions; min / median / max in seconds.

    PYTHONPATH=. python benchmarks/resume_first_step.py --work /tmp/resume --at 2,30 --repeats 3 --out after.json
    # before a change: the same command from a copy of the old tree (the same --work reuses the scenes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray_pretrain_step import write_inputs

from concerto_ray.train import trainer
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.trainer import run_pretrain

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"


class Stop(RuntimeError):
    """Raised in rank 0 to end a run where the measurement needs it."""


def stopping_loop(stop_after: int | None, first_step_file: Path | None):
    """The product's worker loop, stopped on rank 0 after the recorded step-`stop_after` checkpoint, or at the first
    optimizer step, whose start time goes to `first_step_file`. A closure: Ray ships it to the workers by value."""

    def train(loop_config: dict) -> None:
        from concerto_ray.train import loop, runtime

        original = loop.Worker.optimizer_step

        def step(self, micro_batches):
            if self.rank == 0:
                if first_step_file is not None:
                    first_step_file.write_text(json.dumps({"time": time.time(), "step": self.progress.global_step}))
                    raise Stop("first step of the resumed run")
                if self.progress.global_step == stop_after:
                    runtime.wait_for_uploads()
                    time.sleep(2)  # the controller records the checkpoint after its upload
                    raise Stop(f"stopped after step {stop_after}")
            return original(self, micro_batches)

        loop.Worker.optimizer_step = step
        loop.train_loop_per_worker(loop_config)

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=64, help="samples of the epoch (2 workers x batch 1 a step)")
    parser.add_argument("--points", type=int, default=20000, help="points per scene")
    parser.add_argument("--views", type=int, default=4, help="RGB-D frames per scene")
    parser.add_argument("--image-size", default="160x120", help="WIDTHxHEIGHT of the frames")
    parser.add_argument("--at", default="2,30", help="comma-separated checkpoint steps to resume from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="scenes and shards here, kept for the next invocation")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="concerto-ray-resume-"))
    dinov2 = write_inputs(work, "tiny-concerto", args.scenes, args.points, args.views, width, height)

    positions = [int(k) for k in args.at.split(",")]
    seconds: dict[int, list[float]] = {k: [] for k in positions}
    runs = work / f"runs-{args.label or 'run'}-{int(time.time())}"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    for round_index in range(args.repeats):
        for k in positions if round_index % 2 == 0 else positions[::-1]:
            config = load_pretrain_config(
                CONFIG,
                [
                    f"data.shards={work / 'shards'}",
                    f"model.image_encoder_weights={dinov2}",
                    f"run.storage_path={runs}",
                    f"run.name=at{k}-{round_index}",
                    f"mlflow.tracking_uri=sqlite:///{runs / 'mlflow.db'}",
                    "run.epochs=1",
                    f"run.checkpoint_every={k}",
                    "run.max_failures=0",
                    "data.pretrain.crop_h=28",
                    "data.pretrain.crop_w=28",
                ],
            )
            trainer.train_loop_per_worker = stopping_loop(k, None)
            try:
                run_pretrain(config)
            except Exception as exc:  # the planned stop, inside Ray Train's error
                if "stopped after step" not in str(exc):
                    raise
            first_step = runs / f"first-step-{k}-{round_index}.json"
            trainer.train_loop_per_worker = stopping_loop(None, first_step)
            called = time.time()
            try:
                run_pretrain(config, resume=True)
            except Exception as exc:
                if "first step of the resumed run" not in str(exc):
                    raise
            record = json.loads(first_step.read_text())
            assert record["step"] == k, record
            seconds[k].append(record["time"] - called)
            print(f"resume at step {k} (round {round_index}): first step after {seconds[k][-1]:.1f} s", flush=True)
    ray.shutdown()
    report = {
        "label": args.label,
        "scenes": args.scenes,
        "steps_per_epoch": args.scenes // 2,
        "points": args.points,
        "views": args.views,
        "image_size": args.image_size,
        "seconds_to_first_step": {
            str(k): {"min": min(v), "median": statistics.median(v), "max": max(v), "all": v} for k, v in seconds.items()
        },
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
