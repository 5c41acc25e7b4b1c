"""Time training steps: our PT-v3m2 encoder, optionally Pointcept's beside it, and the full Concerto step.

    python benchmarks/gpu_step.py --out step.json [--large] [--points 400000] [--pointcept .device/pointcept]

1. Encoder step: the Concerto base (or --large) backbone, encoder only, on two synthetic rooms of `--points` points
   each, grid-sampled at 0.02 m (about 100k points per room at the default 150k), 9 input features
   (coordinates, colour, normal); bf16 autocast, forward + backward + AdamW step, loss = mean square of the output.
2. With --pointcept (an extracted Pointcept tree, see _reference_gpu_shim.py for the stand-ins it runs with):
   Pointcept's PT-v3m2 with our weights (loaded strictly) on the same batch, timed beside ours in this process,
   after checking that both give the same outputs (eval, order shuffling off, fp32 and bf16 autocast). Pointcept's
   flash path runs through PyTorch's SDPA here, because flash-attn is not installed.
3. Concerto step: the whole base (or --large) model on gpu_smoke.py's batch (random DINOv2 weights), as in
   gpu_smoke.py: forward, backward, gradient clipping, AdamW, teacher EMA.

Each reports the median step time over --steps steps after --warmup, the peak memory of those steps (absolute, and
above what was resident before them: both encoders stay resident while either is timed), and, from
torch.profiler over --profile-steps more steps: kernels launched and GPU kernel time per step, the ten kernels with
most time, and the kernel time per region. A kernel's region comes from the ops, modules and Python frames that
launched it (the profiler records them with `with_stack`), first match in POINT_REGIONS / CONCERTO_REGIONS order;
backward kernels carry only autograd node names, so e.g. a Linear's backward inside pooling counts as "linear/mlp".
With --device cpu (tiny checks) the "kernels" are the aten ops, timed on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import gpu_smoke
import numpy as np
import torch
from _reference_gpu_shim import load_reference_for_training, reference_kwargs, set_reference_shuffling
from torch.profiler import ProfilerActivity, profile, record_function

from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.data.transforms import GridSample
from concerto_ray.model.concerto import Concerto
from concerto_ray.model.configs import ConcertoConfig, get_model_config
from concerto_ray.model.image_encoder import build_untrained_image_encoder
from concerto_ray.model.ptv3 import PointTransformerV3, PTv3Config
from concerto_ray.model.schedules import SslSchedules

GRID_SIZE = 0.02
SCENES = 2
TINY_POINTS = 3000

# (region, substrings of the op / module / Python frame names above a kernel); the first region matching wins.
POINT_REGIONS = [
    ("optimizer", ("Optimizer.",)),
    ("sparse conv", ("spconv", "SubMConv", "ImplicitGemm")),
    ("serialization/sorting", ("serialization", "aten::sort", "aten::argsort", "aten::unique")),
    (
        "attention",
        (
            "scaled_dot_product",
            "ScaledDotProduct",
            "flash_attn",
            "_flash_attention",
            "_efficient_attention",
            "patch_layout",
            "get_padding_and_inverse",
        ),
    ),
    ("pooling", ("segment_reduce", "SegmentReduce")),
    ("layer norm", ("layer_norm", "LayerNorm")),
    ("linear/mlp", ("aten::linear", "aten::addmm", "aten::mm", "AddmmBackward", "MmBackward", "gelu", "Gelu")),
]
CONCERTO_REGIONS = [
    ("optimizer", ("Optimizer.", "clip_grad")),
    ("teacher EMA", ("update_teacher",)),
    ("2d encoder", ("patch_features", "Dinov2")),
    ("heads", ("PrototypeHead",)),
    ("losses", ("_point_losses", "_matched_loss", "_enc2d_loss", "sinkhorn_knopp", "finish_losses")),
] + POINT_REGIONS[1:]

# Relative error (L2 over all output features) allowed between the two models. Pointcept casts q, k and v to bf16
# for its flash path even in fp32, and under autocast both spconvs run in fp16, so neither is exact.
AGREEMENT = {"fp32": 1e-2, "bf16": 5e-2}


# ---------------------------------------------------------------- batches and models
def scene_batch(points: int, seed: int) -> dict:
    """Two synthetic rooms of `points` points, grid-sampled, as one backbone input batch (CPU tensors)."""
    root = Path(tempfile.mkdtemp()) / "scenes"
    write_synthetic_dataset(
        root,
        SynthConfig(
            scenes=SCENES,
            seed=seed,
            points_per_scene=points,
            views_per_scene=1,
            image_width=16,
            image_height=16,
            splits={"train": 1.0},
        ),
        progress=False,
    )
    rng = np.random.default_rng(seed)
    grid_sample = GridSample(grid_size=GRID_SIZE, return_grid_coord=True)
    rooms = []
    for scene in sorted((root / "train").iterdir()):
        rooms.append(grid_sample({name: np.load(scene / f"{name}.npy") for name in ("coord", "color", "normal")}, rng))
    coord = np.concatenate([room["coord"] for room in rooms])
    color = np.concatenate([room["color"] for room in rooms]).astype(np.float32) / 127.5 - 1
    normal = np.concatenate([room["normal"] for room in rooms])
    return {
        "coord": torch.from_numpy(coord).float(),
        "grid_coord": torch.from_numpy(np.concatenate([room["grid_coord"] for room in rooms])).long(),
        "feat": torch.from_numpy(np.concatenate([coord, color, normal], axis=1)).float(),
        "offset": torch.tensor([len(room["coord"]) for room in rooms]).cumsum(0),
        "grid_size": GRID_SIZE,
    }


def concerto_config(large: bool, tiny: bool) -> ConcertoConfig:
    if not tiny:
        return get_model_config("pretrain-concerto-v1m1-1-large-base" if large else "pretrain-concerto-v1m1-0-base")
    config = get_model_config("tiny-concerto")
    # gpu_smoke's batch has the paper's 518x518 crops (37x37 patches); the tiny DINOv2 is sized for them.
    config.image_encoder = dataclasses.replace(config.image_encoder, image_size=518)
    config.patch_h = config.patch_w = 37
    # Pointcept's flash path (fixed patches) is the one the paper configs use.
    config.backbone = dataclasses.replace(config.backbone, enable_flash=True)
    return config


# ---------------------------------------------------------------- steps, timing, profiling
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def encoder_step(model: torch.nn.Module, batch: dict, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.04)

    def step() -> None:
        with autocast(device):
            point = model(dict(batch))  # a copy: the models turn their input into their Point structure
        point.feat.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def concerto_step(model: Concerto, batch: dict, device: torch.device) -> Callable[[], None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.04)

    def step() -> None:
        with autocast(device):
            out = model(dict(batch))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()

    return step


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> dict:
    """Median and minimum step time; peak memory of the timed steps, absolute and above what was resident."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    result = {"step_ms_median": 1000 * statistics.median(times), "step_ms_min": 1000 * min(times)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_memory_gib=peak / 2**30, peak_above_resident_gib=(peak - resident) / 2**30)
    return result


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, regions: list) -> dict:
    """Kernel count and time per step, top kernels and time per region, from torch.profiler over `steps` steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(steps):
            # Kernels are attributed to the innermost profiled range open at launch; without an outer one, a kernel
            # launched outside every op (spconv's own launches) would be missing from the totals.
            with record_function("step"):
                step()
        synchronize(device)
    by_kernel = defaultdict(lambda: [0, 0.0])  # name -> [launches, microseconds]
    by_region = defaultdict(float)
    for event in prof.events():
        if device.type == "cuda":
            work = [(k.name, k.duration) for k in event.kernels if not k.name.startswith(("Memcpy", "Memset"))]
        else:  # every aten op's own CPU time (its child ops excluded), so nothing is counted twice
            work = [(event.name, event.self_cpu_time_total)] if event.name.startswith("aten::") else []
        if not work:
            continue
        region = region_of(event, regions)
        for name, duration in work:
            by_kernel[name][0] += 1
            by_kernel[name][1] += duration
            by_region[region] += duration
    top = sorted(by_kernel.items(), key=lambda item: -item[1][1])[:10]
    return {
        "kernels_per_step": sum(n for n, _ in by_kernel.values()) / steps,
        "kernel_ms_per_step": sum(us for _, us in by_kernel.values()) / 1000 / steps,
        "top_kernels": [
            {"name": name[:120], "launches_per_step": n / steps, "ms_per_step": us / 1000 / steps}
            for name, (n, us) in top
        ],
        "region_ms_per_step": {
            name: by_region[name] / 1000 / steps for name in [r for r, _ in regions] + ["other"] if name in by_region
        },
    }


def region_of(event, regions: list) -> str:
    """The first region whose pattern occurs in the names of `event` or any op, module or frame above it."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    context = "\n".join(names)
    for region, patterns in regions:
        if any(pattern in context for pattern in patterns):
            return region
    return "other"


def measure(step: Callable[[], None], args, device: torch.device, regions: list) -> dict:
    result = time_steps(step, args.steps, args.warmup, device)
    if args.profile:
        start = time.perf_counter()
        result.update(profile_steps(step, args.profile_steps, device, regions))
        result["profile_wall_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- parts of the benchmark
def build_encoder(config: PTv3Config, device: torch.device) -> PointTransformerV3:
    torch.manual_seed(0)
    return PointTransformerV3(config).to(device).train()


def compare_outputs(ours: torch.nn.Module, reference: torch.nn.Module, ref, batch: dict, device: torch.device) -> dict:
    """Both models' eval outputs with shuffling off, in fp32 and under bf16 autocast: coarsest-level features."""
    ours.eval().set_order_shuffling(False)
    reference.eval()
    set_reference_shuffling(reference, ref, False)
    result = {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        with torch.no_grad(), autocast(device, enabled=bf16):
            our_point = ours(dict(batch))
            ref_point = reference(dict(batch))
        same_points = torch.equal(our_point.grid_coord.long(), ref_point.grid_coord.long())
        ours_feat, ref_feat = our_point.feat.float(), ref_point.feat.float()
        diff = (ours_feat - ref_feat).abs().max().item() if same_points else float("nan")
        relative = ((ours_feat - ref_feat).norm() / ref_feat.norm()).item() if same_points else float("nan")
        result[precision] = {
            "same_points": same_points,
            "max_abs_diff": diff,
            "relative_error": relative,
            "agree": same_points and relative <= AGREEMENT[precision],
        }
    ours.train().set_order_shuffling(True)
    reference.train()
    set_reference_shuffling(reference, ref, True)
    return result


def run_encoder(args, device: torch.device) -> dict:
    config = concerto_config(args.large, args.tiny).backbone
    points = TINY_POINTS if args.tiny else args.points
    batch = gpu_smoke.batch_to_device(scene_batch(points, seed=0), device)
    ours = build_encoder(config, device)
    result = {
        "points_per_scene_raw": points,
        "points_per_batch": int(batch["offset"][-1]),
        "parameters": sum(p.numel() for p in ours.parameters()),
    }
    if args.pointcept is None:
        result["ours"] = measure(encoder_step(ours, batch, device), args, device, POINT_REGIONS)
        return result
    ref = load_reference_for_training(args.pointcept, device)
    reference = ref.PointTransformerV3(**reference_kwargs(ref, config)).to(device).train()
    reference.load_state_dict(ours.state_dict(), strict=True)
    result["agreement"] = compare_outputs(ours, reference, ref, batch, device)
    result["ours"] = measure(encoder_step(ours, batch, device), args, device, POINT_REGIONS)
    result["reference"] = measure(encoder_step(reference, batch, device), args, device, POINT_REGIONS)
    result["ours_over_reference_step_time"] = result["ours"]["step_ms_median"] / result["reference"]["step_ms_median"]
    return result


def run_concerto(args, device: torch.device) -> dict:
    config = concerto_config(args.large, args.tiny)
    batch = gpu_smoke.make_batch(SCENES, TINY_POINTS if args.tiny else 150_000, 4 if args.tiny else 12, seed=0)
    torch.manual_seed(0)
    model = Concerto(config, build_untrained_image_encoder(config.image_encoder)).to(device).train()
    model.set_schedule(SslSchedules.from_config(config, total_steps=1000).at(100))
    batch = gpu_smoke.batch_to_device(batch, device)
    result = {
        "global_points": int(batch["global_coord"].shape[0]),
        "local_points": int(batch["local_coord"].shape[0]),
        "images": int(batch["images"].shape[0]),
        "step": measure(concerto_step(model, batch, device), args, device, CONCERTO_REGIONS),
    }
    return result


# ---------------------------------------------------------------- report
def print_table(result: dict) -> None:
    rows = [("encoder, ours", result["encoder"]["ours"])]
    if "reference" in result["encoder"]:
        rows.append(("encoder, Pointcept", result["encoder"]["reference"]))
    if "concerto" in result:
        rows.append(("Concerto step, ours", result["concerto"]["step"]))
    unit = "ms" if result["device"] != "cpu" else "ms (CPU)"
    print(f"\n{'':22s} {'step ' + unit:>14s} {'peak GiB':>9s} {'kernels':>8s} {'kernel ms':>10s}")
    for label, r in rows:
        print(
            f"{label:22s} {r['step_ms_median']:14.1f} {r.get('peak_memory_gib', float('nan')):9.2f} "
            f"{r.get('kernels_per_step', float('nan')):8.0f} {r.get('kernel_ms_per_step', float('nan')):10.1f}"
        )
    if "ours_over_reference_step_time" in result["encoder"]:
        print(f"ours / Pointcept step time: {result['encoder']['ours_over_reference_step_time']:.3f}")
        for precision, a in result["encoder"]["agreement"].items():
            print(
                f"outputs {precision}: max abs diff {a['max_abs_diff']:.3e}, relative error "
                f"{a['relative_error']:.3e} -> {'agree' if a['agree'] else 'DISAGREE'}"
            )
    for label, r in rows:
        if "region_ms_per_step" in r:
            regions = ", ".join(f"{name} {ms:.1f}" for name, ms in r["region_ms_per_step"].items())
            print(f"{label} kernel ms by region: {regions}")
            for kernel in r["top_kernels"]:
                print(f"    {kernel['ms_per_step']:8.2f} ms {kernel['launches_per_step']:6.0f}x  {kernel['name'][:90]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and scenes, for CPU checks")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument(
        "--points",
        type=int,
        default=150_000,
        help="points per synthetic room before grid sampling, for the encoder step (the Concerto "
        "step keeps gpu_smoke's 150k)",
    )
    parser.add_argument("--large", action="store_true", help="the large-base config instead of base")
    parser.add_argument("--pointcept", type=Path, help="extracted Pointcept tree: also time its PT-v3m2")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--concerto", action=argparse.BooleanOptionalAction, default=True, help="also time the full Concerto step"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": "large-base" if args.large else "base",
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    start = time.perf_counter()
    result["encoder"] = run_encoder(args, device)
    if args.concerto:
        result["concerto"] = run_concerto(args, device)
    result["wall_s"] = time.perf_counter() - start
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    disagree = [p for p, a in result["encoder"].get("agreement", {}).items() if not a["agree"]]
    if disagree:
        print(f"outputs disagree ({', '.join(disagree)}): the timings compare different computations")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
