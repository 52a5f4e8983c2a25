#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

void register_rotary(py::module_& m) {
  m.def(
      "rotary_embedding",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t q, uintptr_t k,
         uintptr_t positions, int positions_dtype, uintptr_t bases, float base, int64_t tokens,
         int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
        throw_if_error(fastinternlm::rotary_embedding(
            make_context(device, index, stream), as_dtype(dtype), as_ptr(q), as_ptr(k), as_ptr(positions),
            as_dtype(positions_dtype), as_ptr<const float>(bases), base, tokens, q_heads, kv_heads, head_dim));
      },
      release_gil());
  m.def("ntk_base", [](double theta, double factor, int64_t max_position_embeddings, int64_t length,
                       int64_t head_dim) {
    double out = 0.0;
    throw_if_error(fastinternlm::ntk_base(theta, factor, max_position_embeddings, length, head_dim, &out));
    return out;
  });
}

}  // namespace bindings
}  // namespace fastinternlm
