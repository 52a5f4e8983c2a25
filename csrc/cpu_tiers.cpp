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

}  // namespace

bool cpu_use_x86_v3() {
  static const bool use = detect_x86_v3();
  return use;
}

const char* cpu_isa() { return cpu_use_x86_v3() ? "x86-64-v3" : "generic"; }

}  // namespace fastinternlm
