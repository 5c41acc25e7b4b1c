"""Fine-tune a segmentation model on a Ray cluster.

    ray job submit --working-dir . -- python jobs/finetune.py --config semseg-tiny-lin \
        --set data.shards=s3://bucket/semseg --set run.name=probe --set run.storage_path=s3://bucket/runs \
        --set pretrained.path=CHECKPOINT --set mlflow.tracking_uri=URI   # CHECKPOINT: the s3:// one pretrain printed
    python jobs/finetune.py --config semseg-ptv3-large-v1m1-0f-scannet-ft-lora --set data.shards=s3://bucket/scannet \
        --set run.name=lora --set run.storage_path=s3://bucket/runs --set run.num_workers=4 --set run.use_gpu=true

Everything is validated before connecting to Ray; `--resume` continues the stopped run of the same run.name.
"""

import sys

from concerto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
