"""The `finetune` and `sweep` subcommands of the CLI (which `jobs/finetune.py` and `jobs/sweep.py` run).

Both validate everything (configs, shards, storage) before `ray.init()`, so that a typo costs no cluster time.
Heavy imports stay inside the commands, so that `--help` is instant.
"""

from __future__ import annotations

import argparse

from concerto_ray.cli_args import add_set_option


def finetune_command(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.data import storage
    from concerto_ray.finetune.run_config import load_finetune_run, plan_finetune
    from concerto_ray.finetune.trainer import run_finetune
    from concerto_ray.train.config import parse_overrides

    run = load_finetune_run(args.config, parse_overrides(args.overrides))
    plan_finetune(run)
    start_ray(default_log_file("finetune"))
    result = run_finetune(run, resume=args.resume, show_progress=True)
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val_miou"])
    storage_root = storage.resolve(run.run.storage_path, run.run.endpoint_url)
    print(f"finished; best val mIoU {metrics['val_miou']:.4f} at {storage_root.uri_of_path(checkpoint.path)}")
    final = result.metrics
    if "test_miou" in final:  # the full test protocol on that model, after the last round
        print(
            f"test protocol on the best model: mIoU {final['test_miou']:.4f}, mAcc {final['test_macc']:.4f}, "
            f"allAcc {final['test_all_acc']:.4f}"
        )


def evaluate_command(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.finetune.metrics import per_class_table
    from concerto_ray.finetune.run_config import load_finetune_run
    from concerto_ray.finetune.trainer import evaluate_checkpoint
    from concerto_ray.train.config import parse_overrides

    run = load_finetune_run(args.config, parse_overrides(args.overrides))
    start_ray(default_log_file("evaluate"))
    metrics = evaluate_checkpoint(run, args.checkpoint)
    print(per_class_table(metrics, run.finetune.class_names))
    print(
        f"test protocol on {args.checkpoint} ({', '.join(run.finetune.test_splits)}): mIoU {metrics.miou:.4f}, "
        f"mAcc {metrics.macc:.4f}, allAcc {metrics.all_acc:.4f}"
    )


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="sweep config: a shipped name (e.g. sweep-semseg-tiny) or a YAML path"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped sweep of the config's run.name (its driver was killed, interrupted or lost "
        "with the head node), from Ray Tune's record in <run.storage_path>/<run.name>/tune: trials that ended are "
        "kept, not run again; unfinished and failed trials continue their own fine-tuning from its latest "
        "checkpoint; the same MLflow parent run gets the best trial. Give the same --config and --set values as "
        "the first time (the search space is the recorded one)",
    )
    add_set_option(p, "override a sweep config value, read as YAML (repeatable), e.g. data.shards=s3://bucket/x")


def sweep_command(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.finetune.sweep import check_resumable, load_sweep_config, run_sweep

    sweep = load_sweep_config(args.config, args.overrides)
    if args.resume:
        check_resumable(sweep)  # before Ray starts, as every other check
    start_ray(default_log_file("sweep"))
    print(run_sweep(sweep, resume=args.resume, show_progress=True).summary())
