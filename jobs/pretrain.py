"""Pre-train Sonata / Concerto on a Ray cluster.

    python jobs/pretrain.py --config configs/pretrain-concerto-v1m1-0-base.yaml --set data.shards=s3://bucket/shards
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain-tiny.yaml

The config is validated before connecting to Ray. `ray.init()` joins the cluster the job runs on (RAY_ADDRESS, or
a local one when run directly). `--resume` continues the stopped run of the same `run.name` from its latest
checkpoint; `--set section.key=value` overrides any config value (the value is read as YAML).
"""

from __future__ import annotations

import argparse
import sys

import ray

from concerto_ray.errors import ConfigError
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.trainer import run_pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pre-training YAML config")
    parser.add_argument("--resume", action="store_true", help="continue the run named in the config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.epochs=10 (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_pretrain_config(args.config, args.overrides)  # before Ray: a typo costs no cluster time
        ray.init()
        result = run_pretrain(config, resume=args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"finished; latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
