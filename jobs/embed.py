"""Per-point features of a shard set on a Ray cluster: `concerto-ray embed` as a Ray job.

    ray job submit --working-dir . -- python jobs/embed.py --checkpoint s3://bucket/ckpt/model_last.pth \
        --model pretrain-concerto-v1m1-0-base --shards s3://bucket/shards/scannet --out s3://bucket/features/scannet

The driver runs on the head; Ray Data reads the shards in CPU tasks and runs one model actor per GPU of the cluster
(`--concurrency` to change that). Submitting the same command again resumes: scenes already written are skipped.
"""

import sys

from concerto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
