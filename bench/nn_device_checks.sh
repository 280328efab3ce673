#!/usr/bin/env bash
# nn_batch's checks on the GPU machine in one device call (bench/README's recipe): the GPU tests, the
# benchmark of this package against an earlier one measured in the same run, and step 5 end to end
# under several NN settings. From the project root there, after `source .device-b/install.sh`:
#
#   bash bench/nn_device_checks.sh [LEGACY_DIR]
#
# LEGACY_DIR (optional): an earlier package's tree (say `git archive <commit> watcher_plugins schemas
# agent_manifests` unpacked), benchmarked with the same arms. Writes under $OUT: gpu_tests.log,
# new/nn_bench.json, old/nn_bench.json, e2e/comparison.json. Each step has its own time limit, so that
# one that hangs leaves the others' results.
set -u
export PYTHONUNBUFFERED=1
legacy=${1:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
arms="--subset-every 5 --arm-order interleaved --full-arms fused:fp32,fused:bf16 --e2e-precisions bf16
      --subset-arms serial:fp32,fused:fp32,serial:tf32,fused:tf32,serial:bf16,fused:bf16"
timeout "${TESTS_S:-200}" python3 -m pytest -q -rf --maxfail=3 -p no:cacheprovider tests/gpu/test_nn_gpu_invariance.py \
    tests/gpu/test_nn_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_S:-150}" python3 bench/bench_nn.py --out "$OUT/new" $arms 2>&1 | tail -12
if [[ -n "$legacy" ]]; then
    PYTHONPATH="$legacy:/tmp/site" timeout "${BENCH_S:-150}" python3 bench/bench_nn.py --out "$OUT/old" $arms 2>&1 | tail -12
fi
timeout "${E2E_S:-90}" python3 bench/nn_e2e_identical.py --out "$OUT/e2e" --devices 0 --trials 8 --rows 8000 \
    --settings 1/auto,auto/auto,8/serial,8/fused 2>&1 | tail -6
