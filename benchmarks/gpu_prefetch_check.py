"""Run `DevicePrefetch`'s CUDA branch (pinning, side stream, event, record_stream) and check what it hands over.

Usage, on a GPU machine: PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_prefetch_check.py

Steps of two micro-batches of random CPU tensors (and a non-tensor entry) go through `DevicePrefetch` while the
consumer runs a GPU matmul chain between steps, as training would; every tensor must arrive on the GPU equal to its
source, the non-tensor entries unchanged, and an error raised by the step iterator must reach the consumer. Also
times the hand-over against a plain `.to(device)` copy of the same batches on the training thread.
"""

from __future__ import annotations

import time

import torch

from concerto_ray.train.runtime import DevicePrefetch


def steps(count: int, size: int, fail_at: int | None = None):
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        if i == fail_at:
            raise RuntimeError("step iterator failed")
        batches = [
            {"coord": torch.randn(size, 3, generator=generator), "name": [f"s{i}"], "offset": torch.tensor([size])}
            for _ in range(2)
        ]
        yield batches, 0.0


def busy(device: torch.device) -> None:
    x = torch.randn(2048, 2048, device=device)
    for _ in range(20):
        x = x @ x
        x = x / x.norm()


def main() -> int:
    device = torch.device("cuda", 0)
    size = 2_000_000
    expected = list(steps(6, size))
    failures = []
    started = time.perf_counter()
    with DevicePrefetch(steps(6, size), device) as on_device:
        for (batches, _), (source, _) in zip(on_device, expected):
            busy(device)
            for got, want in zip(batches, source):
                if got["name"] != want["name"]:
                    failures.append("non-tensor entry changed")
                for key in ("coord", "offset"):
                    if got[key].device.type != "cuda" or not torch.equal(got[key].cpu(), want[key]):
                        failures.append(f"{key} differs or is not on the GPU")
    torch.cuda.synchronize()
    prefetched = time.perf_counter() - started
    started = time.perf_counter()
    for batches, _ in steps(6, size):
        moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        busy(device)
        del moved
    torch.cuda.synchronize()
    plain = time.perf_counter() - started
    try:
        with DevicePrefetch(steps(6, size, fail_at=3), device) as on_device:
            for _ in on_device:
                busy(device)
        failures.append("the iterator's error did not reach the consumer")
    except RuntimeError as exc:
        if "step iterator failed" not in str(exc):
            failures.append(f"wrong error: {exc}")
    print(f"6 steps of 2 x {size} points: prefetched {prefetched:.3f} s, copied on the thread {plain:.3f} s")
    verdict = "FAILED: " + "; ".join(sorted(set(failures))) if failures else "all checks passed"
    print(f"DevicePrefetch CUDA branch: {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
