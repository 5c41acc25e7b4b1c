"""Ray Data stream throughput with `data.preserve_order` on (the default) and off, interleaved on the same shards.

    PYTHONPATH=. python benchmarks/preserve_order_throughput.py SHARDS

`drain` (read -> transform in Ray tasks -> collate) over whole epochs on a local Ray of 2 CPUs, one warm-up epoch of
each setting, then 4 rounds alternating the order; samples/s min / median / max.
"""

import statistics
import sys

import ray

from concerto_ray.data.pipeline import StreamConfig, drain

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
shards = sys.argv[1]
configs = {flag: StreamConfig(shards=shards, mode="pretrain", preserve_order=flag) for flag in (True, False)}
drain(configs[True])
drain(configs[False])  # warm-up
rates = {True: [], False: []}
for r in range(4):
    for flag in (True, False) if r % 2 == 0 else (False, True):
        s = drain(configs[flag])
        rates[flag].append(s.samples / s.seconds)
        print(flag, round(rates[flag][-1], 2), flush=True)
for flag, v in rates.items():
    print(
        "preserve_order",
        flag,
        "samples/s min/median/max",
        round(min(v), 2),
        round(statistics.median(v), 2),
        round(max(v), 2),
    )
