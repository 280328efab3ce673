source .device-b/install.sh && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; set -o pipefail; mkdir -p /tmp/prof
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONHASHSEED=0 PYTHONPATH=$PWD/.legacy/head:$PYTHONPATH; H=.legacy/head
timeout 230 python3 $H/bench/before_after_identical.py --tree .legacy/before22 --tree .legacy/head --out /tmp/ba --devices 0 2>&1 | tail -8; cp /tmp/ba/comparison.json $OUT/ba_comparison.json
A="--arch 512,256,128,64 --arch 64,32,16,8 --epochs 8 --out /tmp/prof"
timeout 80 python3 $H/bench/nn_profile.py --precision fp32 $A --tiles fp32=128,64,16,8,2,ieee --tiles fp32=64,32,16,4,2,ieee --tiles fp32=32,64,16,4,2,ieee --tiles fp32=128,32,16,4,3,ieee 2>&1 | grep -E "^pack:"
timeout 80 python3 $H/bench/nn_profile.py --precision tf32 $A --tiles tf32=128,64,32,4,3,tf32 --tiles tf32=128,64,32,8,3,tf32 --tiles tf32=64,32,32,4,3,tf32 --tiles tf32=128,128,32,8,3,tf32 2>&1 | grep -E "^pack:"
timeout 80 python3 $H/bench/nn_profile.py --precision bf16 $A --tiles bf16=128,64,32,4,3,ieee --tiles bf16=128,64,64,8,3,ieee --tiles bf16=64,32,32,4,3,ieee --tiles bf16=128,128,64,8,3,ieee 2>&1 | grep -E "^pack:"
tar czf $OUT/profiles.tgz -C /tmp/prof .
timeout 90 python3 -m pytest -q -rf -p no:cacheprovider $H/tests/gpu/test_nn_gpu.py -k "triton_packs_compute_what_torch" 2>&1 | tee $OUT/agreement.log | tail -30
