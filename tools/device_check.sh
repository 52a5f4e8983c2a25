#!/usr/bin/env bash
# The prepared GPU check (see DEVELOPERS.md): build for the local card, run the whole test
# suite (the CUDA variants run here), a memcheck pass over the CUDA kernels, the kernel
# benchmark, and print a short summary last. Logs and JSON land in $OUT (default
# device-out/). Budget: under 6 minutes on an H100.
#
#   bash tools/device_check.sh            # everything
#   SKIP_SANITIZER=1 bash tools/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

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
cpp_line="C++ (no Python): $(./build/device-cpp/fastinternlm_core_test | tail -1); $(./build/device-cpp/fastinternlm_cuda_test | tail -1)"
echo "$cpp_line"
grep -E "ptxas info|spill" "$OUT/build.log" | grep -E "spill stores|Used" | sort | uniq -c | sort -rn | head -40 > "$OUT/ptxas.txt"
export PYTHONPATH="$PWD/python"
python3 -c "import fastinternlm, json; print(json.dumps(fastinternlm.build_info()))" | tee "$OUT/build_info.json"

stamp "tests"
timeout 300 python3 -m pytest tests -q -rfs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
test_rc=$?
tail -25 "$OUT/pytest.log"

san_line="memcheck: skipped"
if [ -z "${SKIP_SANITIZER:-}" ] && command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer memcheck on the CUDA tests of each kernel family"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest tests/test_rms_norm.py tests/test_rotary.py tests/test_silu_and_mul.py \
      tests/test_attention.py tests/test_int4_gemm.py -q -x -p no:cacheprovider -k "cuda and not long_context and not large_scores" \
      > "$OUT/memcheck.log" 2>&1
  san_rc=$?
  san_line="memcheck: rc=$san_rc ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses reported; 124 = timed out)"
  tail -5 "$OUT/memcheck.log"
fi

stamp "kernel benchmark"
timeout 240 python3 -m fastinternlm.bench kernels --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
bench_rc=$?

stamp "done"
echo "==================== SUMMARY ===================="
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)"
head -2 "$OUT/gpu.txt" | tail -1
echo "build: sm_$cap, $(grep -c 'spill stores' "$OUT/ptxas.txt" 2>/dev/null) ptxas spill lines (see ptxas.txt)"
echo "$cpp_line"
echo "tests: rc=$test_rc  $(tail -1 "$OUT/pytest.log")"
echo "$san_line"
echo "bench: rc=$bench_rc"
cat "$OUT/bench.txt"
