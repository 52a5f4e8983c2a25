// Uses the fastinternlm core from plain C++ (no Python, no torch): what a latency-critical
// service linking libfastinternlm_core does. Runs each CPU op on random inputs and
// compares with double-precision math written here; checks that bad input comes back as
// a Status rather than a crash. Exit code 0 on success; failures are printed.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastinternlm/fastinternlm.h"

namespace fil = fastinternlm;

static int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
      ++failures;                                           \
    }                                                       \
  } while (0)

static std::mt19937 rng(std::random_device{}());

static std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

static double max_rel_error(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0.0, norm = 0.0;
  for (double w : want) norm = std::max(norm, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]) / norm);
  return worst;
}

static void test_rms_norm(const fil::Context& cpu) {
  const int64_t rows = 3, hidden = 37;
  auto x = randn(rows * hidden, 2.0f), w = randn(hidden), res = randn(rows * hidden);
  std::vector<float> out(rows * hidden);
  fil::Status s = fil::rms_norm(cpu, fil::DType::kFloat32, out.data(), x.data(), w.data(), rows, hidden, 1e-5f);
  EXPECT(s.ok(), "rms_norm: %s", s.message().c_str());
  std::vector<double> want(rows * hidden);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < hidden; ++i) ss += double(x[r * hidden + i]) * x[r * hidden + i];
    const double inv = 1.0 / std::sqrt(ss / hidden + 1e-5);
    for (int64_t i = 0; i < hidden; ++i) want[r * hidden + i] = x[r * hidden + i] * inv * w[i];
  }
  EXPECT(max_rel_error(out, want) < 1e-5, "rms_norm error %g", max_rel_error(out, want));

  auto res_before = res;
  s = fil::add_rms_norm(cpu, fil::DType::kFloat32, out.data(), res.data(), x.data(), w.data(), rows, hidden, 1e-5f);
  EXPECT(s.ok(), "add_rms_norm: %s", s.message().c_str());
  for (size_t i = 0; i < res.size(); ++i)
    EXPECT(res[i] == res_before[i] + x[i], "add_rms_norm residual[%zu]", i);

  s = fil::rms_norm(cpu, fil::DType::kFloat32, out.data(), x.data(), w.data(), rows, 0, 1e-5f);
  EXPECT(s.code() == fil::StatusCode::kInvalidValue && s.message().find("hidden") != std::string::npos,
         "rms_norm(hidden=0) must name hidden, got '%s'", s.message().c_str());
  s = fil::rms_norm(cpu, fil::DType::kInt32, out.data(), x.data(), w.data(), rows, hidden, 1e-5f);
  EXPECT(s.code() == fil::StatusCode::kInvalidType, "rms_norm(int32) must be kInvalidType");
}

static void test_rotary(const fil::Context& cpu) {
  const int64_t tokens = 5, hq = 3, hkv = 1, dim = 64;
  auto q = randn(tokens * hq * dim), k = randn(tokens * hkv * dim);
  const auto q0 = q;
  std::vector<int32_t> pos = {0, 7, 100, 4095, 31999};
  fil::Status s = fil::rotary_embedding(cpu, fil::DType::kFloat32, q.data(), k.data(), pos.data(),
                                        fil::DType::kInt32, nullptr, 1e6f, tokens, hq, hkv, dim);
  EXPECT(s.ok(), "rotary_embedding: %s", s.message().c_str());
  std::vector<double> want(q.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < dim / 2; ++i) {
        const float inv_freq = 1.0f / static_cast<float>(std::pow(1e6, 2.0 * i / dim));
        const double a = static_cast<float>(pos[t]) * inv_freq;
        const size_t base = (t * hq + h) * dim;
        const double x1 = q0[base + i], x2 = q0[base + i + dim / 2];
        want[base + i] = x1 * std::cos(a) - x2 * std::sin(a);
        want[base + i + dim / 2] = x2 * std::cos(a) + x1 * std::sin(a);
      }
  EXPECT(max_rel_error(q, want) < 1e-5, "rotary error %g", max_rel_error(q, want));

  double base = 0;
  s = fil::ntk_base(1e6, 2.0, 32768, 65536, 128, &base);
  EXPECT(s.ok() && std::fabs(base - 1e6 * std::pow(3.0, 128.0 / 126.0)) < 1e-3, "ntk_base %f", base);
}

static void test_silu_and_mul(const fil::Context& cpu) {
  const int64_t rows = 2, ffn = 11;
  auto x = randn(rows * 2 * ffn, 2.0f);
  std::vector<float> out(rows * ffn);
  fil::Status s = fil::silu_and_mul(cpu, fil::DType::kFloat32, out.data(), x.data(), rows, ffn);
  EXPECT(s.ok(), "silu_and_mul: %s", s.message().c_str());
  std::vector<double> want(out.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < ffn; ++i) {
      const double g = x[r * 2 * ffn + i], u = x[r * 2 * ffn + ffn + i];
      want[r * ffn + i] = g / (1.0 + std::exp(-g)) * u;
    }
  EXPECT(max_rel_error(out, want) < 1e-5, "silu_and_mul error %g", max_rel_error(out, want));
}

static void test_cuda_without_device() {
  // Asking for CUDA must give a Status, never a crash: either "not compiled" or, on a
  // machine without a GPU, the runtime's error.
  fil::Context gpu;
  gpu.device = fil::Device::kCUDA;
  std::vector<float> x(8, 1.0f), w(8, 1.0f), out(8);
  fil::Status s = fil::rms_norm(gpu, fil::DType::kFloat16, out.data(), x.data(), w.data(), 1, 8, 1e-5f);
  if (!fil::cuda_compiled())
    EXPECT(s.code() == fil::StatusCode::kNotCompiled, "CUDA op in a CPU build: '%s'", s.message().c_str());
  std::printf("cuda op on this machine: %s\n", s.ok() ? "ok" : s.message().c_str());
}

int main() {
  std::printf("fastinternlm %s, cuda compiled: %d\n", fil::version(), fil::cuda_compiled() ? 1 : 0);
  fil::Context cpu;
  test_rms_norm(cpu);
  test_rotary(cpu);
  test_silu_and_mul(cpu);
  test_cuda_without_device();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ core checks passed\n");
  return 0;
}
