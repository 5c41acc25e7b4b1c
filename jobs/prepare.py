"""`concerto-ray prepare` as a Ray job: the conversion runs as one Ray task on a cluster node with free CPUs.

    ray job submit --working-dir . -- python jobs/prepare.py SRC DEST [--format webdataset] [--workers 32] ...

It takes exactly the options of `concerto-ray prepare`. SRC must be readable at the same path on the node that
runs the task (a shared file system such as FSx or EFS); DEST is usually s3://bucket/prefix. The task reserves
one CPU per reader thread (``--workers``, default 8). Because `prepare` resumes from its finished shards, Ray may
simply rerun the task when its node is lost (a preempted spot instance).
"""

from __future__ import annotations

import argparse
import sys

import ray

from concerto_ray.cli import add_prepare_arguments, main

DEFAULT_WORKERS = 8
# Reruns after a lost node only: an error in the data is reported, not retried.
NODE_LOSS_RETRIES = 3


@ray.remote(max_retries=NODE_LOSS_RETRIES)
def _run_prepare(argv: list[str]) -> int:
    return main(["prepare", *argv])


def run(argv: list[str]) -> int:
    """Run `concerto-ray prepare ARGV` on the Ray cluster (RAY_ADDRESS, or a local Ray); returns its exit code."""
    parser = argparse.ArgumentParser(
        prog="jobs/prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prepare_arguments(parser)
    args = parser.parse_args(argv)  # bad options fail here, before any cluster work
    if args.workers is None:
        argv = [*argv, "--workers", str(DEFAULT_WORKERS)]
    ray.init(ignore_reinit_error=True)
    return ray.get(_run_prepare.options(num_cpus=args.workers or DEFAULT_WORKERS).remote(argv))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
