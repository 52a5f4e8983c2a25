// Helpers shared by the CUDA kernels: element conversions, the device/stream a launch
// goes to, and turning the runtime's error state into a Status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "check.h"
#include "fastinternlm/common.h"

namespace fastinternlm {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round to T's precision and back, as torch does when it stores an intermediate in T.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

inline cudaStream_t stream_of(const Context& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status(StatusCode::kCudaError, concat(what, ": ", cudaGetErrorString(err)));
}

// Make ctx.device_index current for this host thread. The CUDA runtime linked into
// fastinternlm is its own (static) instance, so torch's current device is not ours.
inline Status set_device(const Context& ctx) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current == ctx.device_index) return Status::Ok();
  return cuda_status(cudaSetDevice(ctx.device_index), "cudaSetDevice");
}

// After a launch: configuration errors surface here, not as a crash later.
inline Status launch_status(const char* op) { return cuda_status(cudaGetLastError(), op); }

// Call f(T{}) with T the CUDA type of a half-precision activation dtype.
template <typename F>
Status dispatch_half(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return Status(StatusCode::kInvalidType, "CUDA kernels take float16 or bfloat16");
  }
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace fastinternlm
