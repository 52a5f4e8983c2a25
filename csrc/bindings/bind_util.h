// What every binding needs: a Context from the Python side's (device, index, stream),
// raw pointers from integers, and a Status turned into the exception the Python API
// documents. The bindings stay thin: validation of tensors happens in Python (which sees
// torch metadata) and of sizes and pointers in the C++ entry points.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "fastinternlm/fastinternlm.h"

namespace fastinternlm {
namespace bindings {

namespace py = pybind11;

inline Context make_context(int device, int device_index, uintptr_t stream) {
  Context ctx;
  ctx.device = static_cast<Device>(device);
  ctx.device_index = device_index;
  ctx.stream = reinterpret_cast<void*>(stream);
  return ctx;
}

template <typename T = void>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline DType as_dtype(int code) { return static_cast<DType>(code); }

inline void throw_if_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidValue: throw py::value_error(status.message());
    case StatusCode::kInvalidType: throw py::type_error(status.message());
    default: throw std::runtime_error(status.message());
  }
}

// Release the GIL around the call: CPU ops on large inputs take a while, and other
// Python threads (a server's event loop) should keep running.
using release_gil = py::call_guard<py::gil_scoped_release>;

void register_rms_norm(py::module_& m);
void register_rotary(py::module_& m);
void register_silu_and_mul(py::module_& m);
void register_attention(py::module_& m);
void register_int4_gemm(py::module_& m);

}  // namespace bindings
}  // namespace fastinternlm
