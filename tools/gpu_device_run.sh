#!/bin/bash
# On a lent GPU machine (no network), from a copy of the checkout with .devgpu/ prepared here by
# `bash ../shared/device/prepare.sh smollm2-135m-instruct gemma3-270m qwen2.5-coder-1.5b-instruct`:
# installs wgpu from the carried wheels, checks every GPU kernel against NumPy on the real driver,
# rebuilds each model with random weights of its real shapes and types, times the matrix kernels
# (tools/gpu_kernel_bench.py), benchmarks each model with the decode-step profile (tools/gpu_bench.py)
# and checks GPU vs NumPy parity. Everything goes to $OUT.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
for f in .devgpu/gl/*.deb; do dpkg -x $f /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devgpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
ls /usr/share/vulkan/icd.d/*nvidia* /etc/vulkan/icd.d/*nvidia* >/dev/null 2>&1 || export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
log() { grep -v XDG_RUNTIME | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | log
python3 -m wasmchord info --gpu 2>&1 | log
grep -q "DiscreteGPU\|IntegratedGPU" $OUT/log.txt || { echo "no hardware adapter (see the lines above)"; exit 3; }
CI=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tail -4 | log
models=""
for m in .devgpu/*.meta.gguf; do n=$(basename $m .meta.gguf); python3 .devgpu/mkmodel.py .devgpu/$n /tmp/syn-$n.gguf >/dev/null && models="$models /tmp/syn-$n.gguf"; done
echo "setup done at $(( $(date +%s) - T0 ))s" | log
for c in ${CHECKS:-all}; do timeout 100 python3 tools/gpu_kernel_bench.py --reps 20 --shader-checks $c --json $OUT/kernels-$c.json 2>&1 | log; done
# every model with shader checks $BENCH_CHECKS (default: the backend's default); SmolLM2 with each of $AB
timeout 240 python3 tools/gpu_bench.py --out $OUT/bench ${BENCH_CHECKS:+--shader-checks $BENCH_CHECKS} --models $models 2>&1 | log
for c in ${AB:-}; do timeout 60 python3 tools/gpu_bench.py --out $OUT/bench-$c --shader-checks $c --models /tmp/syn-smollm2-135m-instruct.gguf 2>&1 | grep -v "^model\|^backend" | log; done
for m in $models; do timeout 90 python3 .devgpu/parity.py $m 16 2>&1 | tail -1 | log; done
echo "DONE at $(( $(date +%s) - T0 ))s" | log
