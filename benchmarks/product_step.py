"""The product's pre-training step beside the bare step, on the same model and batches, in one process, without Ray.

    PYTHONPATH=/tmp/site:. python benchmarks/product_step.py --shapes 2x150000,12x150000 --profile-steps 2 \
        --batch-cache /tmp/batches --out product.json

"product": `concerto_ray.train.loop.Worker.optimizer_step`, what each Ray Train worker of `concerto-ray pretrain`
runs per optimizer step, on the batch as Ray Data hands it to the worker (collated CPU tensors, not pinned): seeding,
the schedules, the copy to the GPU, forward and backward under bf16 autocast, clipping, the finiteness check and
the metrics, AdamW with layer-wise lr groups, the teacher EMA and the lr schedule. What Ray adds around it (the
stream, its threads and processes, MLflow) is measured by ray_pretrain_step.py.
"bare": concerto_step.py's step on the same model: the batch already on the GPU, forward and backward under bf16
autocast, clipping at 3.0, one AdamW group, the teacher EMA.

Both are timed interleaved (the order alternating every round, the device synchronised around each step); min /
median / max in ms. The model is the config's (`build_training_model`) with a random-weight image encoder of the
config's architecture. With --profile-steps N, torch.profiler (host thread included) over N steps of each:
step_profile.py's breakdown (GPU busy time, copies, host waits for the device by source line). Also the
host-to-device copy of one batch alone: from pageable memory as it comes, and pinned first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gpu_smoke
import gpu_step
import step_profile
import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

from concerto_ray.config import from_dict
from concerto_ray.data.pipeline import batch_points, batch_to_device
from concerto_ray.model.concerto import Concerto
from concerto_ray.model.image_encoder import build_untrained_image_encoder
from concerto_ray.model.schedules import SslSchedules
from concerto_ray.train import loop
from concerto_ray.train.config import PretrainConfig, apply_overrides
from concerto_ray.train.optim import build_optimizer, weight_decay_schedule
from concerto_ray.train.runtime import NonFiniteGuard
from concerto_ray.train.state import Progress

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-concerto-v1m1-0-base.yaml"
STEPS_PER_EPOCH = 1000


def build_worker(config, device: torch.device) -> loop.Worker:
    """A `Worker` with what `optimizer_step` uses, as `Worker.__init__` sets it up on one GPU (no DDP wrapper, as
    Ray Train's `prepare_model` leaves a single worker's model), without Ray, MLflow or a checkpoint."""

    def untrained(model_config):  # no weights to download on the device machine
        with torch.device(device):  # DINOv2-g's 1.1 B random weights are drawn much faster on the GPU
            return Concerto(model_config, build_untrained_image_encoder(model_config.image_encoder))

    loop.build_ssl_model = untrained
    model_config = config.model_config()
    worker = loop.Worker.__new__(loop.Worker)
    worker.config = config
    worker.steps_per_epoch = STEPS_PER_EPOCH
    worker.total_steps = STEPS_PER_EPOCH * config.run.epochs
    worker.rank = 0
    worker.device = device
    worker.ssl_model = loop.build_training_model(config).to(device).train()
    worker.model = worker.ssl_model
    worker.optimizer, worker.scheduler = build_optimizer(
        worker.ssl_model, config.optim, model_config.backbone.enc_depths, worker.total_steps
    )
    worker.weight_decay = weight_decay_schedule(config.optim, worker.total_steps)
    worker.schedules = SslSchedules.from_config(model_config, worker.total_steps)
    worker.progress = Progress()
    worker.nonfinite_guard = NonFiniteGuard(config.run.max_nonfinite_steps)
    return worker


def product_step(worker: loop.Worker, cpu_batch: dict):
    def step() -> dict:
        values = worker.optimizer_step([cpu_batch])
        worker.progress.advance(worker.steps_per_epoch)
        return values

    return step


def bare_step(model: Concerto, gpu_batch: dict, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(dict(gpu_batch))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()

    step.optimizer = optimizer
    return step


def timed(step, device: torch.device) -> float:
    gpu_step.synchronize(device)
    start = time.perf_counter()
    step()
    gpu_step.synchronize(device)
    return 1000 * (time.perf_counter() - start)


def profiled(step, steps: int, device: torch.device) -> dict:
    gpu_step.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with record_function("step"):
                step()
        gpu_step.synchronize(device)
        wall = time.perf_counter() - start
    return step_profile.summarize(prof, steps, wall)


def copy_times(cpu_batch: dict, device: torch.device, repeats: int = 5) -> dict:
    """The batch's host-to-device copy alone: from pageable memory (as batch_to_device gets it), and pinned."""
    tensors = {k: v for k, v in cpu_batch.items() if isinstance(v, torch.Tensor)}
    pageable, pin, pinned_copy = [], [], []
    for _ in range(repeats):
        pageable.append(timed(lambda: batch_to_device(tensors, device), device))
        start = time.perf_counter()
        pinned = {k: v.pin_memory() if device.type == "cuda" else v for k, v in tensors.items()}
        pin.append(1000 * (time.perf_counter() - start))
        pinned_copy.append(timed(lambda pinned=pinned: batch_to_device(pinned, device), device))
    return {
        "megabytes": sum(v.numel() * v.element_size() for v in tensors.values()) / 1e6,
        "pageable_copy_ms_median": statistics.median(pageable),
        "pin_ms_median": statistics.median(pin),
        "pinned_copy_ms_median": statistics.median(pinned_copy),
    }


def load_batch(shape: str, cache: Path | None) -> dict:
    samples, points = (int(v) for v in shape.split("x"))
    path = cache / f"{shape}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    batch = gpu_smoke.make_batch(samples, points, 12, seed=samples)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(batch, path)
    return batch


def summarize(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"min": ms[0], "median": statistics.median(ms), "max": ms[-1], "all": ms}


def run_shape(shape: str, worker: loop.Worker, args, device: torch.device) -> dict:
    samples = int(shape.split("x")[0])
    cpu_batch = load_batch(shape, args.batch_cache)
    gpu_batch = gpu_smoke.batch_to_device(cpu_batch, device)
    model = worker.ssl_model
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    # The paper's batch needs 97 GiB without it (BENCHMARKS.md): an 80 GiB card recomputes activations.
    checkpointing = worker.config.model.activation_checkpointing or (samples >= 8 and total_gib < 100)
    model.student["backbone"].set_activation_checkpointing(checkpointing)
    result = {
        "shape": shape,
        "points": batch_points(cpu_batch),
        "images": int(cpu_batch["images"].shape[0]),
        "activation_checkpointing": checkpointing,
        "copy": copy_times(cpu_batch, device),
    }
    steps = {"product": product_step(worker, cpu_batch), "bare": bare_step(model, gpu_batch, device)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    records = {name: [] for name in steps}
    for round_index in range(args.steps):
        for name in list(steps) if round_index % 2 == 0 else reversed(list(steps)):
            records[name].append(timed(steps[name], device))
    for name in steps:
        result[name] = summarize(records[name])
    ratios = [p / b for p, b in zip(records["product"], records["bare"])]
    result["product_over_bare_median"] = result["product"]["median"] / result["bare"]["median"]
    result["product_over_bare_per_round"] = summarize(ratios)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(
        f"{shape}: {result['points']} points; product {result['product']['min']:.1f} / "
        f"{result['product']['median']:.1f} / {result['product']['max']:.1f} ms, bare {result['bare']['min']:.1f} / "
        f"{result['bare']['median']:.1f} / {result['bare']['max']:.1f} ms, product / bare "
        f"{result['product_over_bare_median']:.3f}; copy {result['copy']}",
        flush=True,
    )
    if args.profile_steps > 0:
        for name, step in steps.items():
            result[f"{name}_profile"] = profiled(step, args.profile_steps, device)
            step_profile.print_summary(f"{shape} {name}", result[f"{name}_profile"])
    steps["bare"].optimizer.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--shapes", default="2x150000,12x150000", help="comma-separated SAMPLESxRAW_POINTS")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (one step of each a round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=0)
    parser.add_argument("--batch-cache", type=Path, help="keep the built batches here, for the next process")
    parser.add_argument("--label", default="", help="recorded in the output (e.g. before / after)")
    parser.add_argument("--device", default="cuda", help="cpu: a check of the script with a tiny config")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    # Not validated: that would look for the config's shards and image encoder weights, which this step never reads.
    config = from_dict(PretrainConfig, apply_overrides(yaml.safe_load(args.config.read_text()), args.set))
    start = time.perf_counter()
    worker = build_worker(config, device)
    result = {
        "label": args.label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": str(args.config),
        "overrides": args.set,
        "build_s": time.perf_counter() - start,
        "shapes": [],
    }
    # The first step of a freshly built model from the run's seed: its losses compare across code versions.
    first_batch = load_batch(args.shapes.split(",")[0], args.batch_cache)
    result["first_step"] = product_step(worker, first_batch)()
    print("first step:", json.dumps(result["first_step"]), flush=True)
    for shape in args.shapes.split(","):
        result["shapes"].append(run_shape(shape, worker, args, device))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
