"""Own data to a dataset root on a Ray cluster: `concerto-ray ingest` as a Ray job.

    ray job submit --working-dir . -- python jobs/ingest.py /fsx/my-scans s3://bucket/roots/my-scans --labels
    ray job submit --working-dir . -- python jobs/ingest.py /fsx/scannet s3://bucket/roots/scannet --adapter scannet

The driver runs on the head; Ray Data reads and converts one scene per task on the cluster's CPUs. SRC must be
readable at the same path on every node (a shared file system such as FSx or EFS). Submitting the same command
again resumes: complete scene folders are skipped.
"""

import sys

from concerto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
