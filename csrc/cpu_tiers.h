// CPU instruction-set tiers for the hot CPU kernels.
//
// The default build targets baseline x86-64 (SSE2) or aarch64, so it runs anywhere. The
// CPU kernels are additionally compiled for x86-64-v3 (AVX2, FMA, F16C: every x86 CPU
// since 2013-2015) and picked at run time. Both tiers come from one source, written with
// 8-lane vectors whose lanes perform the documented scalar operations, and the build never
// contracts a * b + c on its own (-ffp-contract=off), so the tiers round identically. The
// one exception is int4_gemm's accumulation, a fused multiply-add where the instruction
// set has one (x86-64-v3, aarch64) and a product and a sum on baseline x86-64, which has
// none (emulating it in software cost a factor of ten). Within a tier results never
// depend on the thread count. (libm's expf/sinf/cosf, which attention, silu_and_mul and
// rotary call, may themselves differ between CPUs.)
//
// A kernel source FILE ("x_cpu.inc", plain functions and templates, no #include) is
// compiled once per tier with
//     #define FIL_TIER_KERNELS "x_cpu.inc"
//     #include "cpu_tiers.inc"
// into namespaces fastinternlm::cpu_generic and (on x86 with GCC or Clang)
// fastinternlm::cpu_x86_v3, and called through FIL_TIER_SELECT(function), a pointer to the
// tier this CPU runs. A kernel that gains from 16-lane vectors (attention's prefill) also
// has an x86-64-v4 (AVX-512) tier, FIL_TIER_SELECT_V4 (cpu_tiers.inc), and so does
// int4_gemm's buffered path (two outputs' 8-lane accumulators per register); their lanes
// perform the same scalar operations too.
#pragma once

#include "fastinternlm/common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FIL_CPU_HAVE_X86_V3 1
#include <immintrin.h>
#else
#define FIL_CPU_HAVE_X86_V3 0
#endif

namespace fastinternlm {

// The AVX2/FMA/F16C tier runs: the CPU and OS support it and FASTINTERNLM_CPU_ISA is not
// "generic" (read once; for testing that both tiers agree). cpu_isa() (common.h) names it.
bool cpu_use_x86_v3();

// The AVX-512 tier (x86-64-v4) of the kernels that have one (FIL_TIER_WITH_V4 in
// cpu_tiers.inc) runs: v3 runs, the CPU and OS support AVX-512 F/BW/DQ/VL, and
// FASTINTERNLM_CPU_ISA is not "x86-64-v3" (which caps the tiers at v3).
bool cpu_use_x86_v4();

}  // namespace fastinternlm

#if FIL_CPU_HAVE_X86_V3
#define FIL_TIER_SELECT(...) \
  (::fastinternlm::cpu_use_x86_v3() ? &cpu_x86_v3::__VA_ARGS__ : &cpu_generic::__VA_ARGS__)
#define FIL_TIER_SELECT_V4(...) \
  (::fastinternlm::cpu_use_x86_v4() ? &cpu_x86_v4::__VA_ARGS__ : FIL_TIER_SELECT(__VA_ARGS__))
#else
#define FIL_TIER_SELECT(...) (&cpu_generic::__VA_ARGS__)
#define FIL_TIER_SELECT_V4(...) (&cpu_generic::__VA_ARGS__)
#endif
