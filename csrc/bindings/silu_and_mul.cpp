#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

void register_silu_and_mul(py::module_& m) {
  m.def(
      "silu_and_mul",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t x, int64_t rows,
         int64_t ffn) {
        throw_if_error(fastinternlm::silu_and_mul(make_context(device, index, stream), as_dtype(dtype),
                                                  as_ptr(out), as_ptr(x), rows, ffn));
      },
      release_gil());
}

}  // namespace bindings
}  // namespace fastinternlm
