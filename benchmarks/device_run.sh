#!/usr/bin/env bash
# One call on the lent accelerator machine: unpack spconv (staged by ../shared/device/stage.sh into .device/a),
# then run the named benchmark steps, each writing its JSON and log under $OUT.
#   bash benchmarks/device_run.sh concerto embed agreement      (carry .device/a and .device/pointcept)
# CONCERTO_ARGS and PAPER_ARGS add arguments to concerto_step.py and paper_batch.py.
# product (product_step.py, PRODUCT_ARGS) and ray (ray_pretrain_step.py on the base config, one GPU worker, RAY_ARGS)
# need Ray and MLflow too (.device/b and .device/c); LABEL names their outputs (e.g. before / after a change, each
# run from a copy of the tree: cd into it, /tmp/site and /tmp/step are shared).
# .device/a (51 MiB) and .device/b + .device/c (69 MiB) do not fit one call's 64 MiB: .device/bc, b and c without
# boto3 / botocore / s3transfer / jmespath (local shards need no S3 client), is 51 MiB and fits with the tree:
#   mkdir -p .device/bc && for f in .device/b/* .device/c/*; do case ${f##*/} in boto3-*|botocore-*|s3transfer-*|\
#     jmespath-*|install.sh) ;; *) ln -f "$f" .device/bc/ ;; esac; done && cp .device/b/install.sh .device/bc/
# A cold machine then takes two calls, back to back (it is given back after 30 s idle, /tmp/site with it):
#   1. carry .device/a .device/pointcept:  bash benchmarks/device_run.sh concerto
#   2. carry .device/bc:                   LABEL=now bash benchmarks/device_run.sh product   (then ray, no carry)
set -uo pipefail
if [ ! -d /tmp/site/spconv ]; then  # what .device/a/install.sh does (a warm machine keeps /tmp/site)
  mkdir -p /tmp/site && tar -xJf .device/a/spconv.tar.xz -C /tmp/site && python3 -m pip install -q --no-index \
    --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/a/*.whl 2>&1 | grep -v WARNING
fi
if [ ! -d /tmp/site/ray ]; then  # Ray and MLflow (product, ray) from whichever of these folders was carried
  for d in .device/bc .device/b .device/c; do [ -f "$d/install.sh" ] && bash "$d/install.sh" | tail -n 2; done
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader; } | tee -a "$OUT/gpu.txt"
for part in "$@"; do
  case $part in
    concerto) python3 benchmarks/concerto_step.py --pointcept .device/pointcept --profile-steps 2 \
                ${CONCERTO_ARGS:-} --out "$OUT/concerto.json" 2>&1 | tee "$OUT/concerto.log" ;;
    embed) python3 benchmarks/embed_throughput.py --out "$OUT/embed.json" 2>&1 | tee "$OUT/embed.log" ;;
    agreement) timeout "${AGREEMENT_TIMEOUT:-400}" python3 benchmarks/paper_batch.py ${PAPER_ARGS:-} \
                --out "$OUT/paper.json" 2>&1 | tee "$OUT/paper.log" ;;
    product) python3 benchmarks/product_step.py --label "${LABEL:-}" --batch-cache /tmp/batches ${PRODUCT_ARGS:-} \
                --out "$OUT/product${LABEL:+-$LABEL}.json" 2>&1 | tee "$OUT/product${LABEL:+-$LABEL}.log" ;;
    ray) python3 benchmarks/ray_pretrain_step.py --config configs/pretrain-concerto-v1m1-0-base.yaml --gpu \
                --workers 1 --set 'data.sources=[]' --set data.sources_root=null --set 'data.splits=[train]' \
                --set run.cpus_per_worker=1 --work /tmp/step --label "${LABEL:-run}" ${RAY_ARGS:-} \
                --out "$OUT/ray${LABEL:+-$LABEL}.json" 2>&1 | grep -v -e WARNING -e Warning | tail -n 60 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
