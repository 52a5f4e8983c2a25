// Which CPU tier the kernels run (cpu_tiers.h): decided once per process.
#include "cpu_tiers.h"

#include <cstdlib>
#include <cstring>

namespace fastinternlm {
namespace {

bool detect_x86_v3() {
#if FIL_CPU_HAVE_X86_V3
  const char* env = std::getenv("FASTINTERNLM_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return false;
  // libgcc / compiler-rt also check that the OS saves the AVX registers (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool detect_x86_v4() {
#if FIL_CPU_HAVE_X86_V3
  const char* env = std::getenv("FASTINTERNLM_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "x86-64-v3") == 0) return false;
  // libgcc / compiler-rt also check that the OS saves the mask and zmm registers.
  return cpu_use_x86_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

}  // namespace

bool cpu_use_x86_v3() {
  static const bool use = detect_x86_v3();
  return use;
}

bool cpu_use_x86_v4() {
  static const bool use = detect_x86_v4();
  return use;
}

const char* cpu_isa() { return cpu_use_x86_v4() ? "x86-64-v4" : cpu_use_x86_v3() ? "x86-64-v3" : "generic"; }

}  // namespace fastinternlm
