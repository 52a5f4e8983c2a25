#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

void register_rms_norm(py::module_& m) {
  m.def(
      "rms_norm",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t x,
         uintptr_t weight, int64_t rows, int64_t hidden, float eps) {
        throw_if_error(fastinternlm::rms_norm(make_context(device, index, stream), as_dtype(dtype),
                                              as_ptr(out), as_ptr(x), as_ptr(weight), rows, hidden,
                                              eps));
      },
      release_gil());
  m.def(
      "add_rms_norm",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t residual,
         uintptr_t x, uintptr_t weight, int64_t rows, int64_t hidden, float eps) {
        throw_if_error(fastinternlm::add_rms_norm(make_context(device, index, stream),
                                                  as_dtype(dtype), as_ptr(out), as_ptr(residual),
                                                  as_ptr(x), as_ptr(weight), rows, hidden, eps));
      },
      release_gil());
}

}  // namespace bindings
}  // namespace fastinternlm
