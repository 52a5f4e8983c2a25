// The tensor-core instruction the CUDA kernels share: mma.sync m16n8k16 (sm_80+), float16 or
// bfloat16 operands, float32 accumulators, as one inline-PTX wrapper. Fragment layouts
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * gid + tig:
//   A  a[0]: row gid,   k 2tig, 2tig+1     a[1]: row gid+8, k 2tig, 2tig+1
//      a[2]: row gid,   k 2tig+8, 2tig+9   a[3]: row gid+8, k 2tig+8, 2tig+9
//   B  b0: k 2tig, 2tig+1, column gid      b1: k 2tig+8, 2tig+9, column gid
//   C  d[0], d[1]: row gid, columns 2tig, 2tig+1    d[2], d[3]: row gid+8, same columns
// (in each 32-bit register the lower k or column sits in the low 16 bits).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"

namespace fastinternlm {
namespace cuda {

// d += a (16 x 16, row-major) * b (16 x 8, column-major), T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "mma_16816 takes __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace cuda
}  // namespace fastinternlm
