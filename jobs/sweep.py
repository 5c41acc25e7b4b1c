"""Run a Ray Tune sweep of fine-tuning runs on a Ray cluster.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep-semseg-tiny.yaml
    python jobs/sweep.py --config configs/sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml \
        --set data.shards=s3://bucket/scannet --set run.storage_path=s3://bucket/runs \
        --set overrides.pretrained.path=s3://bucket/checkpoints/concerto_large.pth

Every trial config the sweep can produce is validated before connecting to Ray. `--resume` continues a stopped sweep
of the same run.name (its driver was killed or interrupted) without running its ended trials again:

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep-semseg-tiny.yaml --resume
"""

import sys

from concerto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
