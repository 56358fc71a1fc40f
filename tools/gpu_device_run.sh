#!/bin/bash
# On a lent GPU machine (no network), from a copy of the checkout with .devgpu/ prepared here by
# `bash ../shared/device/prepare.sh smollm2-135m-instruct gemma3-270m qwen2.5-coder-1.5b-instruct`
# (plus the llguidance wheel in .devgpu/whl for the constrained-decoding figures):
# installs wgpu from the carried wheels, rebuilds each model with random weights of its real shapes
# and types while the GPU kernel tests run on the real driver, then benchmarks each model with the
# decode-step profile and the batch sweep (tools/gpu_bench.py), times the matrix kernels of every
# weight type (tools/gpu_kernel_bench.py), the constrained-decoding mask (tools/bench_constrain.py),
# where a SmolLM2 batch of 8 and 16 and a short prompt spend their GPU time (tools/gpu_forward_profile.py),
# and checks GPU vs NumPy parity and batch = one by one (tools/gpu_parity.py). Everything goes to
# $OUT (at most 8 files); the whole run stops itself by $BUDGET seconds (default 500).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-500}
for f in .devgpu/gl/*.deb; do dpkg -x $f /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devgpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
ls /usr/share/vulkan/icd.d/*nvidia* /etc/vulkan/icd.d/*nvidia* >/dev/null 2>&1 || export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
log() { grep --line-buffered -v XDG_RUNTIME | tee -a $OUT/log.txt; }
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | log; }
# seconds for the next step: its own limit, or what is left of the budget
lim() { local left=$(( BUDGET - ($(date +%s) - T0) )); [ $left -lt $1 ] && echo $(( left > 5 ? left : 5 )) || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | log
python3 -m wasmchord info --gpu 2>&1 | log
grep -q "DiscreteGPU\|IntegratedGPU" $OUT/log.txt || { echo "no hardware adapter (see the lines above)"; exit 3; }
( for m in .devgpu/*.meta.gguf; do n=$(basename $m .meta.gguf); python3 .devgpu/mkmodel.py .devgpu/$n /tmp/syn-$n.gguf >/dev/null & done; wait ) &
MK=$!
stamp "kernel tests (models being built meanwhile)"
CI=1 timeout $(lim 170) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu_sampling.py \
  "tests/test_model_gpu.py::test_every_weight_type_runs_on_both_backends" -k "not same_seed_same_tokens_on_the_gpu" 2>&1 | tail -6 | log
wait $MK
ls -la /tmp/syn-*.gguf 2>&1 | log
stamp "benchmarks"
for n in smollm2-135m-instruct gemma3-270m qwen2.5-coder-1.5b-instruct; do
  [ -f /tmp/syn-$n.gguf ] || continue
  temps=0; [ $n = smollm2-135m-instruct ] && temps=0,0.8  # the sampled batch path once
  timeout $(lim 150) python3 tools/gpu_bench.py --out /tmp/bench-$n --models /tmp/syn-$n.gguf --temperature $temps 2>&1 | log
  cp /tmp/bench-$n/results.json $OUT/bench-$n.json 2>/dev/null
  stamp "$n done"
done
timeout $(lim 120) python3 tools/gpu_kernel_bench.py --reps 10 --shapes all --json $OUT/kernels.json 2>&1 | log
stamp "kernels done"
timeout $(lim 60) python3 tools/bench_constrain.py /tmp/syn-smollm2-135m-instruct.gguf --backend gpu --batches 1,8 --tokens 64 --repeats 3 --json $OUT/constrain.json 2>&1 | log
stamp "constrain done"
timeout $(lim 60) python3 tools/gpu_forward_profile.py /tmp/syn-smollm2-135m-instruct.gguf --prefill 64 --batch 8,16 2>&1 | log
stamp "forward profile done"
for n in smollm2-135m-instruct gemma3-270m qwen2.5-coder-1.5b-instruct; do
  timeout $(lim 90) python3 tools/gpu_parity.py /tmp/syn-$n.gguf --gen 16 --batch 4 2>&1 | log
done
stamp "DONE"
