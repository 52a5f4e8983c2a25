#include "fastinternlm/common.h"

#include "check.h"
#include "kernels_cuda.h"

#ifndef FASTINTERNLM_VERSION
#define FASTINTERNLM_VERSION "0.0.0"
#endif
#ifndef FASTINTERNLM_CUDA_ARCHS
#define FASTINTERNLM_CUDA_ARCHS ""
#endif

namespace fastinternlm {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

#if FASTINTERNLM_WITH_CUDA
void set_programmatic_launch(bool enabled) { cuda::set_programmatic_launch(enabled); }
bool programmatic_launch() { return cuda::programmatic_launch(); }
#else
namespace {
bool g_programmatic_launch = true;
}
void set_programmatic_launch(bool enabled) { g_programmatic_launch = enabled; }
bool programmatic_launch() { return g_programmatic_launch; }
#endif

bool cuda_compiled() { return FASTINTERNLM_WITH_CUDA != 0; }
const char* cuda_architectures() { return FASTINTERNLM_CUDA_ARCHS; }
const char* version() { return FASTINTERNLM_VERSION; }

Status not_compiled(const char* op) {
  return Status(StatusCode::kNotCompiled,
                concat(op, ": this build of fastinternlm has no CUDA kernels (built without nvcc or "
                           "with FASTINTERNLM_CUDA=0)"));
}

Status check_context(const Context& ctx) {
  if (ctx.device == Device::kCPU) return Status::Ok();
  if (ctx.device != Device::kCUDA)
    return invalid_value("device must be CPU (0) or CUDA (1), got ", static_cast<int>(ctx.device));
  if (!cuda_compiled()) return not_compiled("fastinternlm");
  if (ctx.device_index < 0) return invalid_value("device_index must be >= 0, got ", ctx.device_index);
  return Status::Ok();
}

Status check_activation_dtype(const Context& ctx, const char* name, DType dtype) {
  const bool half = dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  if (half || (dtype == DType::kFloat32 && ctx.device == Device::kCPU)) return Status::Ok();
  return invalid_type(name, " must be float16 or bfloat16",
                      ctx.device == Device::kCPU ? " or float32" : " on CUDA", ", got ",
                      dtype_name(dtype));
}

}  // namespace fastinternlm
