#!/usr/bin/env bash
# nn_batch's checks on the GPU machine in one device call: the GPU tests, the benchmark of this package
# against an earlier one measured in the same run, where a pack's epoch goes, and step 5 end to end
# under several NN settings. From the project root there, after `source .device-b/install.sh`:
#
#   bash bench/nn_device_checks.sh [LEGACY_DIR]
#
# LEGACY_DIR (optional): an earlier package's tree (say `git archive <commit> watcher_plugins schemas
# agent_manifests` unpacked), benchmarked with the same arms. Wheels in .whl/ (carried) are installed
# first: the image lacks plotly (and narwhals), which step 5's report needs; fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl plotly narwhals   (.whl/ is git-ignored) Writes under $OUT:
# gpu_tests.log, new/nn_bench.json, old/nn_bench.json, profile/*.txt, e2e/comparison.json. Each step has
# its own time limit (TESTS_S, BENCH_S, PROFILE_S, E2E_S; 0 skips a step), so that one that hangs
# leaves the others' results.
set -u
export PYTHONUNBUFFERED=1
legacy=${1:-}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step() {  # step SECONDS COMMAND...: run unless SECONDS is 0
    local seconds=$1; shift
    [[ "$seconds" == 0 ]] || timeout "$seconds" "$@"
}
arms="--subset-every 5 --arm-order interleaved --full-arms fused:fp32,fused:bf16 --e2e-precisions bf16
      --subset-arms serial:fp32,fused:fp32,serial:tf32,fused:tf32,serial:bf16,fused:bf16"
step "${TESTS_S:-200}" python3 -m pytest -q -rf --maxfail=10 -p no:cacheprovider tests/gpu/test_nn_gpu_invariance.py \
    tests/gpu/test_nn_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
step "${BENCH_S:-150}" python3 bench/bench_nn.py --out "$OUT/new" $arms 2>&1 | tail -12
if [[ -n "$legacy" ]]; then
    step "${BENCH_S:-150}" env PYTHONPATH="$legacy:/tmp/site" python3 bench/bench_nn.py --out "$OUT/old" $arms 2>&1 | tail -12
fi
for precision in fp32 bf16; do
    step "${PROFILE_S:-40}" python3 bench/nn_profile.py --precision "$precision" --out "$OUT/profile" 2>&1 | head -30
done
step "${E2E_S:-90}" python3 bench/nn_e2e_identical.py --out "$OUT/e2e" --devices 0 --trials 8 --rows 8000 \
    --settings 1/auto,auto/auto,8/serial,8/fused 2>&1 | tail -6
