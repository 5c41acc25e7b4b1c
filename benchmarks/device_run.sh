#!/usr/bin/env bash
# One call on the lent accelerator machine: unpack spconv (staged by ../shared/device/stage.sh into .device/a),
# then run the named benchmark steps, each writing its JSON and log under $OUT.
#   bash benchmarks/device_run.sh concerto embed agreement      (carry .device/a and .device/pointcept)
# CONCERTO_ARGS and PAPER_ARGS add arguments to concerto_step.py and paper_batch.py.
set -uo pipefail
if [ ! -d /tmp/site/spconv ]; then  # what .device/a/install.sh does (a warm machine keeps /tmp/site)
  mkdir -p /tmp/site && tar -xJf .device/a/spconv.tar.xz -C /tmp/site && python3 -m pip install -q --no-index \
    --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/a/*.whl 2>&1 | grep -v WARNING
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
for part in "$@"; do
  case $part in
    concerto) python3 benchmarks/concerto_step.py --pointcept .device/pointcept --profile-steps 2 \
                ${CONCERTO_ARGS:-} --out "$OUT/concerto.json" 2>&1 | tee "$OUT/concerto.log" ;;
    embed) python3 benchmarks/embed_throughput.py --out "$OUT/embed.json" 2>&1 | tee "$OUT/embed.log" ;;
    agreement) timeout "${AGREEMENT_TIMEOUT:-400}" python3 benchmarks/paper_batch.py ${PAPER_ARGS:-} \
                --out "$OUT/paper.json" 2>&1 | tee "$OUT/paper.log" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
