"""The `finetune` and `sweep` subcommands of the CLI (which `jobs/finetune.py` and `jobs/sweep.py` run).

Both validate everything (configs, shards, storage) before `ray.init()`, so that a typo costs no cluster time.
Heavy imports stay inside the commands, so that `--help` is instant.
"""

from __future__ import annotations

import argparse


def finetune_command(args: argparse.Namespace) -> None:
    import ray

    from concerto_ray.data import storage
    from concerto_ray.finetune.run_config import load_finetune_run, plan_finetune
    from concerto_ray.finetune.trainer import run_finetune
    from concerto_ray.train.config import parse_overrides

    run = load_finetune_run(args.config, parse_overrides(args.overrides))
    plan_finetune(run)
    ray.init(ignore_reinit_error=True)
    result = run_finetune(run, resume=args.resume)
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val_miou"])
    storage_root = storage.resolve(run.run.storage_path, run.run.endpoint_url)
    print(f"finished; best val mIoU {metrics['val_miou']:.4f} at {storage_root.uri_of_path(checkpoint.path)}")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep-semseg-tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep config value, read as YAML (repeatable), e.g. data.shards=s3://bucket/x")


def sweep_command(args: argparse.Namespace) -> None:
    import ray

    from concerto_ray.finetune.sweep import load_sweep_config, run_sweep

    sweep = load_sweep_config(args.config, args.overrides)
    ray.init(ignore_reinit_error=True)
    print(run_sweep(sweep).summary())
