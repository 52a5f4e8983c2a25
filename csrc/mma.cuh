// The PTX the tensor-core kernels share (sm_80+): mma.sync m16n8k16 with float16 or bfloat16
// operands and float32 accumulators, the asynchronous global-to-shared copy that feeds it
// (cp.async) and the shared-memory fragment load (ldmatrix). Fragment layouts
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

// The 32-bit shared-memory address cp.async and ldmatrix take.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous, bypassing L1 (.cg). With valid false the source
// size is 0: nothing is read and the 16 bytes are zero-filled (src must still be a global
// address), so padded rows cost no global access and hold exact zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory into mma fragments (the "memory" clobber keeps
// it after the barrier that published what cp.async wrote).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// The same, each matrix transposed (a row-major [k][n] tile as the B operand).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

}  // namespace cuda
}  // namespace fastinternlm
