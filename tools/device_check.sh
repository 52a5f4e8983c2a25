#!/usr/bin/env bash
# The prepared GPU check: build for the local card, run the CUDA variants of the test suite
# (correctness before speed), optionally a memcheck pass, the kernel benchmark and the
# end-to-end benchmark, and print a short summary last. Logs and JSON land in $OUT
# (default device-out/). Budget: about 5 minutes on an H100 with the default stages.
#
#   bash tools/device_check.sh                                  # build tests kernels e2e
#   STAGES="build tests memcheck kernels e2e" bash tools/device_check.sh
#   E2E_ARGS="--skip-hf" bash tools/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
STAGES=${STAGES:-"build tests kernels e2e"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
cap=$(python3 -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")
export FASTINTERNLM_CUDA=1 FASTINTERNLM_CUDA_ARCHS="$cap" MAX_JOBS=$(nproc)
export FASTINTERNLM_BUILD_DIR="$PWD/build/device-$cap" FASTINTERNLM_NVCC_FLAGS="-Xptxas=-v"
stamp "building for sm_$cap (the module, and the C++-only CUDA test beside it)"
(cmake -S . -B build/device-cpp -G Ninja -DFASTINTERNLM_PYTHON=OFF -DFASTINTERNLM_BUILD_TESTS=ON \
   -DFASTINTERNLM_CUDA=ON -DFASTINTERNLM_CUDA_ARCHS="$cap" > "$OUT/build-cpp.log" 2>&1 &&
 cmake --build build/device-cpp --target fastinternlm_cuda_test fastinternlm_core_test >> "$OUT/build-cpp.log" 2>&1) &
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
wait
cpp_line="C++ (no Python): $(./build/device-cpp/fastinternlm_core_test 2>&1 | tail -1); $(./build/device-cpp/fastinternlm_cuda_test 2>&1 | tail -1)"
echo "$cpp_line"
grep -E "ptxas info|spill" "$OUT/build.log" | grep -E "spill stores|Used" | sort | uniq -c | sort -rn | head -60 > "$OUT/ptxas.txt"
export PYTHONPATH="$PWD/python"
python3 -c "import fastinternlm, json; print(json.dumps(fastinternlm.build_info()))" | tee "$OUT/build_info.json"

test_line="tests: skipped"
if want tests; then
  stamp "tests (CUDA variants and the CUDA-graph tests)"
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests -q -rf -p no:cacheprovider -k "cuda or graph" \
    > "$OUT/pytest.log" 2>&1
  test_line="tests: rc=$? $(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi

san_line="memcheck: skipped"
if want memcheck && command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer memcheck on the CUDA tests of each kernel family"
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest tests/test_rms_norm.py tests/test_rotary.py tests/test_silu_and_mul.py \
      tests/test_attention.py tests/test_int4_gemm.py -q -x -p no:cacheprovider \
      -k "cuda and not long_context and not large_scores" > "$OUT/memcheck.log" 2>&1
  san_rc=$?
  san_line="memcheck: rc=$san_rc ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses reported; 124 = timed out)"
  tail -3 "$OUT/memcheck.log"
fi

kern_line="kernels: skipped"
if want kernels; then
  stamp "kernel benchmark"
  timeout ${KERNELS_TIMEOUT:-150} python3 -m fastinternlm.bench kernels --min-time 0.1 --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1
  kern_line="kernels: rc=$?"
fi

e2e_line="e2e: skipped"
if want e2e; then
  stamp "end-to-end benchmark"
  timeout ${E2E_TIMEOUT:-240} python3 -m fastinternlm.bench e2e --json "$OUT/e2e.json" ${E2E_ARGS:-} \
    > "$OUT/e2e.txt" 2>&1
  e2e_line="e2e: rc=$?"
fi

stamp "done"
echo "==================== SUMMARY ===================="
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)"
head -2 "$OUT/gpu.txt" | tail -1
echo "build: sm_$cap, $(grep -c 'spill stores' "$OUT/ptxas.txt" 2>/dev/null) ptxas lines; nonzero spills: $(grep 'spill stores' "$OUT/ptxas.txt" | grep -vc ' 0 bytes spill stores')"
echo "$cpp_line"
echo "$test_line"
echo "$san_line"
echo "$kern_line"
[ -f "$OUT/bench.txt" ] && grep -E "^(measured|timing)|^attention|^int4|^rms_norm|^add_rms|^rotary|^silu" "$OUT/bench.txt" | cut -c1-150
echo "$e2e_line"
[ -f "$OUT/e2e.txt" ] && tail -40 "$OUT/e2e.txt"
