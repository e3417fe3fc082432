#!/usr/bin/env bash
# The lent-GPU check, run in the repo root of the device machine, most wanted first so that a run cut short still
# answers the main questions: engine + host tests on CUDA (16 pytest-xdist workers), the sampling benchmark on a
# random full-size SD1.5 at 512² (20 steps), one evaluation per mode eager against replayed as a CUDA graph
# (cuda_graph_probe.py: how close a graphed guided pass would come to the targets), the weight copies of an
# fp8-stored model (cast_copies.py), a profile of one step per mode, the sampling benchmark at 256² and 512²
# (4 steps), the soft top-k benchmark, the host-overhead benchmark and what guided passes keep for the backward, on
# the GPU itself.
# Expects ComfyUI v0.8.0 in .comfyui/ and the wheels that image lacks (av, torchsde, trampoline) in .whl/; writes logs
# under $OUT (the sampling logs end with their JSON rows). BUDGET_S (default 540) is the command's time: a stage that
# would start later than BUDGET_S minus its expected length is skipped, and says so. The stages' estimates add up to
# more than the default budget on purpose: the last ones run only when the earlier ones were quick.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export COMFYUI_PATH=$PWD/.comfyui PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
ckpt=/tmp/random_sd15_full.safetensors
budget=${BUDGET_S:-540}
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
quiet() { grep -v -e "it/s\]" -e "^USDT" -e "s/it\]"; }
stage() {  # stage NAME EXPECTED_S: true when there is time left for it
  if (( SECONDS + $2 > budget )); then echo "## $1 skipped at ${SECONDS}s (needs ~$2 s)"; return 1; fi
  echo "## $1 at ${SECONDS}s"
}
# First the tests that failed on the last lent GPU (ce5cca5), alone with full tracebacks, so that a cut-off run still
# explains them; then the suite, where -v names each failure as it happens (xdist prints tracebacks only at the end).
known=(tests/host/test_conditioning.py::test_deep_shrink_by_a_factor_other_than_two_records_each_stage_at_its_own_grid
  tests/host/test_recording.py::test_a_sampler_that_enlarges_the_latent_between_steps_is_recorded_at_the_first_sizes_grids
  tests/host/test_model_patches.py::test_a_cache_skipping_the_maps_pass_while_another_nodes_extra_pass_runs_is_still_a_cache
  tests/host/test_conditioning.py::test_an_area_of_exactly_the_latents_size_covers_the_image
  tests/host/test_guidance.py::test_guidance_works_under_lora_style_weight_patches_recreated_between_runs
  tests/host/test_guidance.py::test_weight_copies_that_comfyui_casts_as_layers_run_are_cast_again_in_the_backward_with_the_same_result)
stage known-failures 60 && { timeout 120 python3 -m pytest "${known[@]}" -q --tb=long -p no:cacheprovider \
  -p no:benchmark 2>&1 | quiet > "$OUT/tests.log"; tail -n 3 "$OUT/tests.log"; }
stage tests 220 && { timeout 280 python3 -m pytest tests/engine tests/host -v --tb=short -p no:cacheprovider \
  -p no:benchmark $workers --ignore=tests/host/test_server.py 2>&1 | quiet >> "$OUT/tests.log"; \
  grep -E " (FAILED|ERROR)( |$)|^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -n 30; }
stage sampling-512-20 120 && { python3 benchmarks/sampling.py --sizes 512 --steps 20 --repeats 3 --checkpoint $ckpt \
  --out /tmp/rows.json 2>&1 | quiet > "$OUT/sampling20.log"; grep -v '^\[' "$OUT/sampling20.log" | tail -n 8; }
# The probe splits the time it is given between its modes' processes: at most 150 s, and no more than the budget has.
stage cuda-graph-probe 100 && { b=$(( budget - SECONDS - 10 )); (( b > 150 )) && b=150
  timeout $(( b + 20 )) python3 benchmarks/cuda_graph_probe.py --size 512 --repeats 20 --budget-s $b \
  --checkpoint $ckpt > "$OUT/cuda_graph_probe.log" 2>&1 || echo "probe exit $?"
  grep -E "^\||^[a-z_0-9]+: (capture error|error):|torch [0-9]" "$OUT/cuda_graph_probe.log"
  grep -E "Traceback|Error" "$OUT/cuda_graph_probe.log" | tail -n 3; }
stage cast-copies 60 && { python3 benchmarks/cast_copies.py --sizes 512 --weight-dtype float8_e4m3fn \
  --checkpoint $ckpt 2>&1 | quiet > "$OUT/cast_copies.log"; tail -n 5 "$OUT/cast_copies.log"; }
stage profile 60 && python3 benchmarks/profile_step.py --size 512 --steps 2 --checkpoint $ckpt \
  --out "$OUT/profile512.txt" --sources aten::copy_ aten::add aten::mul aten::fill_ 2>&1 | quiet \
  | grep "^## \|^sync\|/step from"
stage sampling-4 90 && { python3 benchmarks/sampling.py --sizes 256 512 --steps 4 --repeats 3 --checkpoint $ckpt \
  --out /tmp/rows4.json 2>&1 | quiet > "$OUT/sampling4.log"; grep -v '^\[' "$OUT/sampling4.log" | tail -n 12; }
stage soft-topk 30 && { python3 benchmarks/soft_topk.py --device cuda --repeats 20 > "$OUT/soft_topk.log" 2>&1; \
  head -n 12 "$OUT/soft_topk.log"; }
stage host-overhead 40 && { python3 benchmarks/host_overhead.py --steps 20 --repeats 9 2>&1 | quiet \
  > "$OUT/host_overhead.log"; tail -n 7 "$OUT/host_overhead.log"; }
stage lean-backward 60 && { python3 benchmarks/lean_backward.py --sizes 512 --pairs 5 --checkpoint $ckpt 2>&1 | quiet \
  > "$OUT/lean_backward.log"; tail -n 8 "$OUT/lean_backward.log"; }
echo "## done at ${SECONDS}s"
