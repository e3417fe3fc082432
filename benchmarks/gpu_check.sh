#!/usr/bin/env bash
# The lent-GPU check, run in the repo root of the device machine: engine + host tests on CUDA, a profile of one step
# per mode, the sampling benchmark on a random full-size SD1.5 at 256² and 512² (4 steps) and 512² (20 steps), the
# soft top-k benchmark, the host-overhead benchmark, what guided passes keep for the backward, on the GPU itself, and
# the weight copies of an fp8-stored model (cast_copies.py).
# Expects ComfyUI v0.8.0 in .comfyui/ and the wheels that image lacks (av, torchsde, trampoline) in .whl/; writes logs
# under $OUT (the sampling logs end with their JSON rows).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export COMFYUI_PATH=$PWD/.comfyui PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
ckpt=/tmp/random_sd15_full.safetensors
quiet() { grep -v -e "it/s\]" -e "^USDT" -e "s/it\]"; }
timeout 300 python3 -m pytest tests/engine tests/host -q -p no:cacheprovider --ignore=tests/host/test_server.py \
  > "$OUT/tests.log" 2>&1; tail -n 25 "$OUT/tests.log"
python3 benchmarks/profile_step.py --size 512 --steps 2 --checkpoint $ckpt --out "$OUT/profile512.txt" \
  --sources aten::copy_ aten::add aten::mul aten::fill_ 2>&1 | quiet | grep "^## \|^sync\|/step from"
for run in "256 512:4" "512:20"; do
  python3 benchmarks/sampling.py --sizes ${run%:*} --steps ${run#*:} --repeats 3 --checkpoint $ckpt \
    --out /tmp/rows.json 2>&1 | quiet > "$OUT/sampling${run#*:}.log"; grep -v '^\[' "$OUT/sampling${run#*:}.log" | tail -n 16
done
python3 benchmarks/soft_topk.py --device cuda --repeats 20 > "$OUT/soft_topk.log" 2>&1; head -n 12 "$OUT/soft_topk.log"
python3 benchmarks/host_overhead.py --steps 20 --repeats 9 2>&1 | quiet > "$OUT/host_overhead.log"; tail -n 7 "$OUT/host_overhead.log"
python3 benchmarks/lean_backward.py --sizes 512 --pairs 5 2>&1 | quiet > "$OUT/lean_backward.log"; tail -n 8 "$OUT/lean_backward.log"
python3 benchmarks/cast_copies.py --sizes 512 --weight-dtype float8_e4m3fn --checkpoint $ckpt 2>&1 | quiet \
  > "$OUT/cast_copies.log"; tail -n 4 "$OUT/cast_copies.log"
