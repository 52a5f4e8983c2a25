// Shared vocabulary of the fastinternlm C++ API: devices, element types, and the
// Status every entry point returns. The core never aborts and never throws: a caller
// (a Python binding or a C++ service) decides what an error means for it.
#pragma once

#include <cstdint>
#include <string>

namespace fastinternlm {

enum class Device : int { kCPU = 0, kCUDA = 1 };

// Element types crossing the API. Activations are float16/bfloat16 (and float32 on
// the CPU); positions and slots are int32/int64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4 };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);

enum class StatusCode : int {
  kOk = 0,
  kInvalidValue = 1,   // a size, index or pointer the op cannot accept (Python: ValueError)
  kInvalidType = 2,    // an element type the op does not support (Python: TypeError)
  kNotCompiled = 3,    // the CUDA path was requested but not built in (Python: RuntimeError)
  kCudaError = 4,      // the CUDA runtime reported an error (Python: RuntimeError)
};

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Where an op runs. For kCUDA, `stream` is a cudaStream_t (nullptr: the legacy default
// stream) and `device_index` the CUDA device the pointers live on; the op makes that
// device current before launching. Kept as void* so this header needs no CUDA headers.
struct Context {
  Device device = Device::kCPU;
  int device_index = 0;
  void* stream = nullptr;
};

// Threads the CPU paths use, the calling thread included. n = 0 restores the default:
// FASTINTERNLM_NUM_THREADS if set (1..1024), else the CPUs this process may run on.
// Results do not depend on it: every output element is computed by one thread with the
// same arithmetic in the same order. Takes effect for ops started afterwards.
Status set_num_threads(int64_t n);
int get_num_threads();

// The instruction-set tier the CPU kernels run: "x86-64-v4" (AVX-512 for the kernels that
// have such a tier, x86-64-v3 for the others), "x86-64-v3" (AVX2, FMA, F16C; chosen at
// run time where the CPU has them) or "generic". All give bit-identical results;
// FASTINTERNLM_CPU_ISA=generic forces the last, FASTINTERNLM_CPU_ISA=x86-64-v3 caps at v3.
const char* cpu_isa();

// Programmatic dependent launch on Hopper (sm_90+): the decode step's int4 GEMVs launch
// while the kernel before them is still running and start streaming their weights. On by
// default (FASTINTERNLM_PDL=0 turns it off at start-up); a process-wide switch for
// benchmarks and as an escape hatch. Graphs captured earlier keep the setting they were
// captured with. Without CUDA the setting is stored and has no effect.
void set_programmatic_launch(bool enabled);
bool programmatic_launch();

// What this build contains.
bool cuda_compiled();
// Architectures the CUDA kernels were compiled for, e.g. "80;90a" ("" without CUDA).
const char* cuda_architectures();
const char* version();

}  // namespace fastinternlm
