// The CUDA ops from plain C++ (no Python, no torch in the process): each op runs on the
// GPU and through the CPU reference on the same float16 inputs, and the two must agree to
// a float16 rounding. Built with FASTINTERNLM_BUILD_TESTS when CUDA is compiled; exits 0
// with a note when no GPU is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fastinternlm/fastinternlm.h"

namespace fil = fastinternlm;

static float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float f;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * mant * 5.9604644775390625e-08f;
  uint32_t bits = sign | ((exp == 31 ? 255u : exp + 112u) << 23) | (mant << 13);
  std::memcpy(&f, &bits, 4);
  return f;
}

static uint16_t float_to_half(float f) {  // inputs here are small normals: truncation is fine
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = int32_t((x >> 23) & 0xff) - 112;
  if (exp <= 0) return uint16_t(sign);
  return uint16_t(sign | (uint32_t(exp) << 10) | ((x >> 13) & 0x3ff));
}

#define CHECK_CUDA(call)                                                           \
  do {                                                                             \
    cudaError_t e = (call);                                                        \
    if (e != cudaSuccess) {                                                        \
      std::printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      return 1;                                                                    \
    }                                                                              \
  } while (0)

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: nothing to check\n");
    return 0;
  }
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const int64_t rows = 5, hidden = 4096;
  std::vector<uint16_t> x(rows * hidden), w(hidden), out_cpu(rows * hidden), out_gpu(rows * hidden);
  for (auto& v : x) v = float_to_half(dist(rng));
  for (auto& v : w) v = float_to_half(dist(rng));

  fil::Context cpu;
  fil::Status s = fil::rms_norm(cpu, fil::DType::kFloat16, out_cpu.data(), x.data(), w.data(), rows, hidden, 1e-5f);
  if (!s.ok()) return std::printf("FAIL cpu rms_norm: %s\n", s.message().c_str()), 1;

  void *dx, *dw, *dout;
  CHECK_CUDA(cudaMalloc(&dx, x.size() * 2));
  CHECK_CUDA(cudaMalloc(&dw, w.size() * 2));
  CHECK_CUDA(cudaMalloc(&dout, x.size() * 2));
  CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
  fil::Context gpu;
  gpu.device = fil::Device::kCUDA;
  s = fil::rms_norm(gpu, fil::DType::kFloat16, dout, dx, dw, rows, hidden, 1e-5f);
  if (!s.ok()) return std::printf("FAIL cuda rms_norm: %s\n", s.message().c_str()), 1;
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(out_gpu.data(), dout, x.size() * 2, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float a = half_to_float(out_gpu[i]), b = half_to_float(out_cpu[i]);
    if (std::fabs(a - b) > 2.0f * 4.9e-4f * (std::fabs(b) + 1e-3f)) ++bad;
  }
  std::printf("cuda rms_norm vs cpu: %d of %zu elements differ by more than a rounding\n", bad, x.size());
  cudaFree(dx);
  cudaFree(dw);
  cudaFree(dout);
  return bad ? 1 : 0;
}
