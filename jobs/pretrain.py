"""Pre-train Sonata / Concerto on a Ray cluster: `concerto-ray pretrain` as a job script.

    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain-tiny-s3.yaml \
        --set data.shards=s3://bucket/synth --set run.storage_path=s3://bucket/runs --set mlflow.tracking_uri=URI
    python jobs/pretrain.py --config configs/pretrain-concerto-v1m1-0-base.yaml --set data.shards=s3://bucket/shards

The config is validated before connecting to Ray. `ray.init()` joins the cluster the job runs on (RAY_ADDRESS, or
a local one when run directly). `--resume` continues the stopped run of the same `run.name` from its latest
checkpoint; `--set section.key=value` overrides any config value (the value is read as YAML). On a cluster of more
than one node every path a worker reads or writes (shards, storage, weights) must be an s3:// URI (or a hub name):
a path on the submitting machine is refused before training starts.
"""

import sys

from concerto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
