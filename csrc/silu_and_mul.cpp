// SiLU-and-mul: argument checks, dispatch, CPU reference.
#include "fastinternlm/silu_and_mul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "check.h"
#include "cpu_tiers.h"
#include "half.h"
#include "kernels_cuda.h"
#include "parallel.h"

#define FIL_TIER_KERNELS "silu_and_mul_cpu.inc"
#include "cpu_tiers.inc"
#undef FIL_TIER_KERNELS

namespace fastinternlm {
namespace {

// Per element: out = dtype(dtype(g / (1 + exp(-g))) * up), g and up in float32, silu
// rounded to T first as HF's act_fn(gate) * up stores silu's result in T. Pieces of rows
// are spread over threads, so one long decode row is split too.
template <typename T>
Status silu_and_mul_cpu(T* out, const T* x, int64_t rows, int64_t ffn) {
  constexpr int64_t kPiece = cpu_generic::kSiluPiece;
  const int slots = get_num_threads();
  Scratch<float> buf;
  if (!buf.allocate(slots * 2 * kPiece)) return invalid_value("silu_and_mul: cannot allocate CPU scratch");
  const auto kernel = FIL_TIER_SELECT(silu_and_mul_pieces<T>);
  const int64_t pieces = (ffn + kPiece - 1) / kPiece;
  // An out that overlaps x (in place over the gates) works when the pieces go in order,
  // each read before it is written, as the sequential reference did; keep that.
  const auto o = reinterpret_cast<uintptr_t>(out), xi = reinterpret_cast<uintptr_t>(x);
  if (o < xi + static_cast<uintptr_t>(rows * 2 * ffn) * sizeof(T) &&
      xi < o + static_cast<uintptr_t>(rows * ffn) * sizeof(T)) {
    kernel(out, x, ffn, 0, rows * pieces, buf.data());
    return Status::Ok();
  }
  parallel_for_slots(rows * pieces, 24 * std::min(ffn, kPiece), slots, [&](int64_t i0, int64_t i1, int slot) {
    kernel(out, x, ffn, i0, i1, buf.data() + slot * 2 * kPiece);
  });
  return Status::Ok();
}

}  // namespace

Status silu_and_mul(const Context& ctx, DType dtype, void* out, const void* x, int64_t rows,
                    int64_t ffn) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "x", dtype));
  // Sizes first: a zero size is the cause of a null pointer, and its message says which.
  FIL_RETURN_IF_ERROR(check_positive("rows", rows));
  FIL_RETURN_IF_ERROR(check_positive("ffn", ffn));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
  if (rows > std::numeric_limits<int64_t>::max() / ffn / 16)
    return invalid_value("rows * 2 * ffn must fit in int64 bytes, got ", rows, " * 2 * ", ffn);
  // The CUDA kernel reads x and writes out from many threads at once (both __restrict__):
  // an overlap there is a race with no defined result. The CPU path keeps its in-order pass.
  if (ctx.device == Device::kCUDA) {
    const int64_t es = dtype_size(dtype);
    FIL_RETURN_IF_ERROR(check_disjoint("out", out, rows * ffn * es, "x", x, rows * 2 * ffn * es));
  }
  FIL_DISPATCH_CUDA(ctx, "silu_and_mul", cuda::silu_and_mul(ctx, dtype, out, x, rows, ffn));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return silu_and_mul_cpu(static_cast<T*>(out), static_cast<const T*>(x), rows, ffn);
  });
}

}  // namespace fastinternlm
