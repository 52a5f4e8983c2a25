// Helpers shared by the CUDA kernels: element conversions, the device/stream a launch
// goes to, and turning the runtime's error state into a Status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <utility>

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


// ---- Programmatic dependent launch (Hopper, sm_90+) ----------------------------------------
// A batch-1 decode step is a chain of short kernels, and each one otherwise starts only
// after its predecessor has finished and drained: a launch gap plus a DRAM-latency ramp of
// a few microseconds per kernel, against 3-20 us of work. With PDL the weight-streaming
// GEMV is launched while the small kernel before it (RMSNorm, SiLU-and-mul, the attention
// merge) is still running, issues its first weight loads (weights never depend on the
// previous kernel) and only then waits for the predecessor's results (x).
//   pdl_trigger(): in a predecessor, lets its dependents launch now. Triggering early is
//     safe: a dependent's pdl_wait() still waits for this whole grid to complete and its
//     writes to be visible; the trigger only moves the dependent's launch forward.
//   pdl_wait(): in a dependent, before its first read of anything a predecessor writes
//     (and before any write a predecessor might still read). A no-op when the kernel was
//     launched without the PDL attribute.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Process-wide switch (benchmarking hook and escape hatch): on unless FASTINTERNLM_PDL=0.
inline std::atomic<int>& pdl_setting() {
  static std::atomic<int> on{[] {
    const char* env = std::getenv("FASTINTERNLM_PDL");
    return (env != nullptr && env[0] == '0') ? 0 : 1;
  }()};
  return on;
}

// PDL needs compute capability 9.0; the answer is cached per device (at most 64).
inline bool pdl_supported(int device) {
  static std::atomic<int> major[64] = {};
  if (device < 0 || device >= 64) return false;
  int m = major[device].load(std::memory_order_relaxed);
  if (m == 0) {
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    major[device].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...) as a PDL dependent of the previous launch
// on the stream where enabled and supported, an ordinary launch otherwise.
template <typename... Params, typename... Args>
Status launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        const Context& ctx, const char* op, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream_of(ctx);
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  if (pdl_setting().load(std::memory_order_relaxed) && pdl_supported(ctx.device_index)) {
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return cuda_status(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), op);
}

}  // namespace cuda
}  // namespace fastinternlm
