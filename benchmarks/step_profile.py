"""Where a training step's wall time goes, from a torch.profiler trace with the host thread: GPU busy time, the
host-to-device copies (pageable or pinned) and every place the host waited for the device.

A host wait is a CUDA runtime call that blocks until the device has caught up (`cudaStreamSynchronize`,
`cudaDeviceSynchronize`, `cudaEventSynchronize`, and a `cudaMemcpy*` whose copy reads device memory back or stages
pageable memory); it is attributed to the innermost frame of this project's code (`concerto_ray/...` or
`benchmarks/...`) on the Python stack of the op that issued it, e.g. `concerto_ray/model/sonata.py(312):
match_nearest`. Used by product_step.py and ray_pretrain_step.py --profile-steps.
"""

from __future__ import annotations

from collections import defaultdict

from torch.autograd import DeviceType

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
OWN_CODE = ("concerto_ray/", "benchmarks/")


def own_frame(event) -> str:
    """The innermost frame of this project's code above `event`, or the name of its outermost op."""
    outermost = event.name
    while event is not None:
        for frame in getattr(event, "stack", None) or ():
            for part in OWN_CODE:
                if part in frame:
                    return frame[frame.find(part) :]
        outermost = event.name
        event = event.cpu_parent
    return f"(no own frame: {outermost})"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total / 1000


def summarize(prof, steps: int, wall_s: float, top: int = 15) -> dict:
    """Per step: wall time, GPU busy time (the union of kernel and copy intervals), kernels, copies by kind (count and
    device time), device-to-host copies, and the host's waits for the device, by own frame."""
    kernels, busy = [], []
    copies = defaultdict(lambda: [0, 0.0])  # kind -> [count, device us]
    waits = defaultdict(lambda: [0, 0.0])  # frame -> [count, host us]
    cpu_self = defaultdict(float)  # op -> host us spent in the op itself (not in the ops it called)
    thread_busy = defaultdict(list)  # host thread -> intervals of its outermost ops
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:  # a kernel, copy or memset, as the device ran it
            duration = event.time_range.elapsed_us()
            busy.append((event.time_range.start, event.time_range.end))
            if event.name.startswith("Memcpy"):
                # e.g. "Memcpy HtoD (Pageable -> Device)"
                entry = copies[event.name]
                entry[0] += 1
                entry[1] += duration
            elif not event.name.startswith("Memset"):
                kernels.append(duration)
            continue
        cpu_self[event.name] += event.self_cpu_time_total
        if event.cpu_parent is None:
            thread_busy[event.thread].append((event.time_range.start, event.time_range.end))
        if event.name.startswith(WAITS):
            entry = waits[f"{event.name}  <-  {own_frame(event)}"]
            entry[0] += 1
            entry[1] += event.cpu_time_total
    ranked = sorted(waits.items(), key=lambda item: -item[1][1])
    wait_ms = sum(us for _, us in waits.values()) / 1000 / steps
    return {
        "profiled_steps": steps,
        "wall_ms_per_step": 1000 * wall_s / steps,
        "gpu_busy_ms_per_step": union_ms(busy) / steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms_per_step": sum(kernels) / 1000 / steps,
        "copies_per_step": {
            name: {"count": n / steps, "device_ms": us / 1000 / steps} for name, (n, us) in copies.items()
        },
        "host_wait_ms_per_step": wait_ms,
        "host_waits_per_step": sum(n for n, _ in waits.values()) / steps,
        "top_host_waits": [
            {"where": where, "per_step": n / steps, "ms_per_step": us / 1000 / steps} for where, (n, us) in ranked[:top]
        ],
        # where the host's time goes when it is not waiting: per thread, the time inside profiled ops (a gap is
        # the thread outside torch, e.g. waiting for the GIL), and the ops with the most time of their own
        "host_thread_op_ms_per_step": {
            str(thread): union_ms(spans) / steps for thread, spans in sorted(thread_busy.items(), key=lambda t: t[0])
        },
        "top_host_ops": [
            {"op": name, "self_ms_per_step": us / 1000 / steps}
            for name, us in sorted(cpu_self.items(), key=lambda item: -item[1])[:top]
        ],
    }


def print_summary(label: str, summary: dict) -> None:
    print(
        f"{label}: wall {summary['wall_ms_per_step']:.1f} ms/step, GPU busy {summary['gpu_busy_ms_per_step']:.1f}, "
        f"kernels {summary['kernels_per_step']:.0f} ({summary['kernel_ms_per_step']:.1f} ms), host waits "
        f"{summary['host_waits_per_step']:.0f} ({summary['host_wait_ms_per_step']:.1f} ms)",
        flush=True,
    )
    for name, copy in summary["copies_per_step"].items():
        print(f"    {name}: {copy['count']:.0f} per step, {copy['device_ms']:.1f} ms", flush=True)
    for wait in summary["top_host_waits"]:
        print(f"    {wait['ms_per_step']:7.1f} ms {wait['per_step']:5.1f}x  {wait['where']}", flush=True)
    print(f"    host threads, ms per step inside ops: {summary['host_thread_op_ms_per_step']}", flush=True)
    for op in summary["top_host_ops"]:
        print(f"    {op['self_ms_per_step']:7.1f} ms  {op['op']}", flush=True)
