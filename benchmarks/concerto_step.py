"""The whole Concerto pre-training step, ours beside Pointcept's `Concerto-v1m1`, on the same weights and batches.

    python benchmarks/concerto_step.py --pointcept .device/pointcept --shapes 2x150000,4x150000,12x150000 \
        --out concerto.json

1. Builds our Concerto (base, or --large) and Pointcept's from the extracted checkout (read-only, with the stand-ins
   of _reference_concerto_shim.py), loads our state dict into Pointcept's strictly, and lets both share one
   random-weight DINOv2-with-registers (ViT-g/14 for the paper configs).
2. Checks that both compute the same losses and student gradients on the first batch, eval-like: the same fixed
   patch mask, the same mask jitter (same seed), order shuffling and drop path off; in fp32 and under bf16 autocast.
3. Times the training step (bf16 autocast forward, backward, gradient clipping 3.0, AdamW, teacher EMA) of both,
   interleaved step by step (the order alternates every round), on every batch shape `SxP` (S samples of
   gpu_smoke.make_batch: synthetic rooms of P raw points, 12 frames each, one 4-frame sample per room, the base
   config's transforms: 2 global + 4 local views and four 518x518 crops per sample). Reports min / median / max
   step time, the ratio of medians, and peak memory (absolute with both models resident; and for each model alone:
   its own weights, gradients and optimizer state plus what its step allocates above what was resident).
4. With --profile-steps N (N > 0): kernels launched and kernel time per step of both, by region, on the first shape.
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
import torch
from _reference_concerto_shim import (
    build_reference_concerto,
    cuda_as,
    load_reference_concerto,
    set_reference_schedule,
)
from _reference_gpu_shim import set_reference_shuffling

from concerto_ray.model import sonata as sonata_module
from concerto_ray.model.concerto import Concerto
from concerto_ray.model.image_encoder import build_untrained_image_encoder
from concerto_ray.model.schedules import SslSchedules

LOSS_TERMS = ("loss", "mask_loss", "roll_mask_loss", "unmask_loss", "enc2d_loss")
REFERENCE_REGIONS = [
    ("stand-in: kNN", ("stand-in:pointops",)),
    ("stand-in: torch_scatter", ("stand-in:torch_scatter",)),
    ("optimizer", ("Optimizer.", "clip_grad")),
    ("teacher EMA", ("after_step", "update_teacher")),
    ("2d encoder", ("ENC2D_forward", "patch_features", "Dinov2")),
    ("heads", ("OnlineCluster", "PrototypeHead")),
    ("losses", ("sinkhorn_knopp", "match_neighbour", "_matched_loss", "_enc2d_loss", "pool_corr", "roll_point")),
] + gpu_step.POINT_REGIONS[1:]


# ---------------------------------------------------------------- models
def build_models(args, device: torch.device):
    config = gpu_step.concerto_config(args.large, args.tiny)
    torch.manual_seed(0)
    with torch.device(device):  # DINOv2-g's 1.1 B random weights are drawn much faster on the GPU
        image_encoder = build_untrained_image_encoder(config.image_encoder)
    ours = Concerto(config, image_encoder).to(device)
    ours.student["backbone"].set_activation_checkpointing(args.activation_checkpointing)
    schedule = SslSchedules.from_config(config, total_steps=1000).at(100)
    ours.set_schedule(schedule)
    ptv3, concerto = load_reference_concerto(args.pointcept, device)
    reference = build_reference_concerto(concerto, ptv3, config, image_encoder).to(device)
    reference.load_state_dict(ours.state_dict(), strict=True)
    set_reference_schedule(reference, schedule)
    for model in (reference, ours):
        model.train()
    image_encoder.eval()  # frozen in both (Pointcept's trainer would leave it in train mode: dropout p = 0)
    return config, ours, reference, ptv3


def set_shuffling(ours, reference, ptv3, enabled: bool) -> None:
    for name in ("student", "teacher"):
        getattr(ours, name)["backbone"].set_order_shuffling(enabled)
        set_reference_shuffling(getattr(reference, name)["backbone"], ptv3, enabled)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def training_step(model, batch: dict, device: torch.device, reference: bool):
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)

    def step() -> None:
        with cuda_as(device), gpu_step.autocast(device):
            out = model(dict(batch))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reference:
            model.after_step()  # Pointcept's EMA hook
        else:
            model.update_teacher()

    step.optimizer = optimizer
    return step


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters, buffers, gradients and optimizer state (each storage counted once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------- equality check
def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_same_losses(ours, reference, ptv3, config, batch: dict, device: torch.device) -> dict:
    """Loss terms and student gradients of both on `batch`, eval-like, in fp32 and under bf16 autocast."""
    ours.eval()
    reference.eval()
    set_shuffling(ours, reference, ptv3, False)
    torch.manual_seed(1)
    schedule = ours.schedule
    mask = sonata_module.grid_patch_mask(
        batch["global_coord"], batch["global_offset"], schedule.mask_size, schedule.mask_ratio
    )
    original_mask = sonata_module.grid_patch_mask
    sonata_module.grid_patch_mask = lambda *args, **kwargs: mask
    reference.generate_mask = lambda coord, offset: (mask, None)
    result = {"masked_points": int(mask.sum()), "points": int(mask.numel())}
    try:
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            outputs, grads = {}, {}
            for name, model in (("ours", ours), ("reference", reference)):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(2)  # the mask jitter is the first random draw in both
                with cuda_as(device), gpu_step.autocast(device, enabled=bf16):
                    out = model(dict(batch))
                out["loss"].backward()
                outputs[name] = {term: float(out[term].detach()) for term in LOSS_TERMS}
                grads[name] = {
                    n: p.grad.detach().float().flatten() for n, p in model.named_parameters() if p.grad is not None
                }
                model.zero_grad(set_to_none=True)
            names = sorted(set(grads["ours"]) & set(grads["reference"]))
            per_tensor = sorted(
                (
                    (relative(grads["ours"][n], grads["reference"][n]), grads["reference"][n].norm().item(), n)
                    for n in names
                ),
                reverse=True,
            )
            grad_ours = torch.cat([grads["ours"][n] for n in names])
            grad_ref = torch.cat([grads["reference"][n] for n in names])
            result[precision] = {
                "ours": outputs["ours"],
                "reference": outputs["reference"],
                "loss_relative_diff": {
                    t: abs(outputs["ours"][t] - outputs["reference"][t]) / max(abs(outputs["reference"][t]), 1e-30)
                    for t in LOSS_TERMS
                },
                "grad_relative_error": relative(grad_ours, grad_ref),
                "grad_tensors": len(names),
                "grad_only_in_ours": sorted(set(grads["ours"]) - set(grads["reference"])),
                "grad_only_in_reference": sorted(set(grads["reference"]) - set(grads["ours"])),
                "grad_worst_tensors": [
                    {"name": n, "relative_error": e, "reference_norm": norm} for e, norm, n in per_tensor[:12]
                ],
                "grad_median_tensor_relative_error": statistics.median(e for e, _, _ in per_tensor),
            }
    finally:
        sonata_module.grid_patch_mask = original_mask
        del reference.generate_mask
        set_shuffling(ours, reference, ptv3, True)
        ours.train()
        reference.train()
        ours.enc2d_model.eval()
    return result


# ---------------------------------------------------------------- timing
def timed(step, device: torch.device) -> dict:
    gpu_step.synchronize(device)
    record = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["resident"] = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    step()
    gpu_step.synchronize(device)
    record["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        record["peak"] = torch.cuda.max_memory_allocated(device)
        record["reserved"] = torch.cuda.max_memory_reserved(device)
    return record


def summarize(records: list[dict], static: int) -> dict:
    ms = sorted(1000 * r["seconds"] for r in records)
    result = {"step_ms_min": ms[0], "step_ms_median": statistics.median(ms), "step_ms_max": ms[-1], "step_ms_all": ms}
    if "peak" in records[0]:
        above = max(r["peak"] - r["resident"] for r in records)
        result.update(
            peak_memory_gib=max(r["peak"] for r in records) / 2**30,
            peak_reserved_gib=max(r["reserved"] for r in records) / 2**30,
            step_above_resident_gib=above / 2**30,
            static_gib=static / 2**30,
            alone_peak_estimate_gib=(static + above) / 2**30,
        )
    return result


def run_shape(shape: str, ours, reference, ptv3, config, args, device: torch.device, first: bool) -> dict:
    samples, points = (int(v) for v in shape.split("x"))
    start = time.perf_counter()
    batch = gpu_smoke.make_batch(samples, points, 4 if args.tiny else 12, seed=samples)
    result = {
        "shape": shape,
        "samples": samples,
        "raw_points_per_room": points,
        "batch_build_s": time.perf_counter() - start,
        "global_points": int(batch["global_coord"].shape[0]),
        "local_points": int(batch["local_coord"].shape[0]),
        "images": int(batch["images"].shape[0]),
    }
    batch = gpu_smoke.batch_to_device(batch, device)
    if first and args.check:
        result["check"] = check_same_losses(ours, reference, ptv3, config, batch, device)
        for precision in ("fp32", "bf16"):
            c = result["check"][precision]
            worst = [(w["name"], f"{w['relative_error']:.2e}") for w in c["grad_worst_tensors"][:5]]
            print(
                precision,
                "loss rel diff",
                {t: f"{v:.1e}" for t, v in c["loss_relative_diff"].items()},
                f"grad rel {c['grad_relative_error']:.3e}",
                f"median tensor {c['grad_median_tensor_relative_error']:.1e}",
                "only ours",
                len(c["grad_only_in_ours"]),
                "only ref",
                len(c["grad_only_in_reference"]),
                "worst",
                worst,
                flush=True,
            )
    steps = {
        "ours": training_step(ours, batch, device, reference=False),
        "reference": training_step(reference, batch, device, reference=True),
    }
    records = {name: [] for name in steps}
    failed = {}

    def run_step(name: str, record: bool) -> None:
        """One step of `name`; running out of memory is recorded and leaves that model out from then on."""
        try:
            if record:
                records[name].append(timed(steps[name], device))
            else:
                steps[name]()
        except torch.OutOfMemoryError as exc:
            failed[name] = f"out of memory: {str(exc)[:300]}"
            steps[name].optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    for name in steps:
        for _ in range(args.warmup):
            if name not in failed:
                run_step(name, record=False)
    for round_index in range(args.steps):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            if name not in failed:
                run_step(name, record=True)
    for name, step in steps.items():
        if name in failed:
            result[name] = {"failed": failed[name]}
        else:
            result[name] = summarize(records[name], static_bytes(ours if name == "ours" else reference, step.optimizer))
    if not failed:
        result["reference_over_ours_median"] = result["reference"]["step_ms_median"] / result["ours"]["step_ms_median"]
        result["reference_over_ours_min"] = result["reference"]["step_ms_min"] / result["ours"]["step_ms_min"]
        ratios = [r["seconds"] / o["seconds"] for o, r in zip(records["ours"], records["reference"])]
        result["round_ratio_min_median_max"] = [min(ratios), statistics.median(ratios), max(ratios)]
    if first and args.profile_steps > 0 and not failed:
        for name, regions in (("ours", gpu_step.CONCERTO_REGIONS), ("reference", REFERENCE_REGIONS)):
            profiled = gpu_step.profile_steps(steps[name], args.profile_steps, device, regions)
            result[name].update({k: v for k, v in profiled.items()})
    for step in steps.values():  # free the optimizer state before the next shape
        step.optimizer.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_row(r: dict) -> None:
    for name in ("ours", "reference"):
        s = r[name]
        if "failed" in s:
            print(f"{r['shape']:>12s} {name:9s} FAILED {s['failed'][:80]}")
            continue
        print(
            f"{r['shape']:>12s} {name:9s} {r['global_points']:8d}+{r['local_points']:<8d} "
            f"{s['step_ms_min']:8.1f} {s['step_ms_median']:8.1f} {s['step_ms_max']:8.1f} "
            f"{s.get('peak_memory_gib', float('nan')):7.2f} {s.get('alone_peak_estimate_gib', float('nan')):7.2f} "
            f"{s.get('kernels_per_step', float('nan')):8.0f} {s.get('kernel_ms_per_step', float('nan')):8.1f}"
        )
    if "reference_over_ours_median" in r:
        print(
            f"{'':12s} reference / ours: median {r['reference_over_ours_median']:.3f}, min "
            f"{r['reference_over_ours_min']:.3f}, per round {r['round_ratio_min_median_max']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pointcept", type=Path, required=True, help="extracted Pointcept tree")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and scenes, for CPU checks")
    parser.add_argument("--large", action="store_true", help="the large-base config instead of base")
    parser.add_argument(
        "--shapes",
        default="2x150000,4x150000,12x150000",
        help="comma-separated SAMPLESxRAW_POINTS batch shapes; the check runs on the first",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (one step of each model a round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=0)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="our student backbone recomputes its blocks' attention and MLP in backward",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    start = time.perf_counter()
    config, ours, reference, ptv3 = build_models(args, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": "large-base" if args.large else "base",
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
        "activation_checkpointing": args.activation_checkpointing,
        "build_s": time.perf_counter() - start,
        "shapes": [],
    }
    print(
        f"{'shape':>12s} {'model':9s} {'global+local points':>17s} {'min':>8s} {'median':>8s} {'max':>8s} "
        f"{'peakGiB':>7s} {'aloneGiB':>7s} {'kernels':>8s} {'kern ms':>8s}",
        flush=True,
    )
    for index, shape in enumerate(args.shapes.split(",")):
        shape_result = run_shape(shape, ours, reference, ptv3, config, args, device, first=index == 0)
        result["shapes"].append(shape_result)
        print_row(shape_result)
        sys.stdout.flush()
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    check = result["shapes"][0].get("check", {})
    worst = max(
        (v for p in ("fp32", "bf16") for v in check.get(p, {}).get("loss_relative_diff", {}).values()), default=0.0
    )
    print(f"worst loss relative difference (check): {worst:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
