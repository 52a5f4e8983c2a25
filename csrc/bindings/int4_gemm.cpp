#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

namespace {

Int4Weight make_weight(uintptr_t qweight, uintptr_t scales, uintptr_t offsets, int64_t n, int64_t k,
                       int64_t group_size) {
  Int4Weight w;
  w.qweight = as_ptr<const int32_t>(qweight);
  w.scales = as_ptr<const void>(scales);
  w.offsets = as_ptr<const void>(offsets);
  w.n = n;
  w.k = k;
  w.group_size = group_size;
  return w;
}

}  // namespace

void register_int4_gemm(py::module_& m) {
  m.attr("int4_format_version") = kInt4FormatVersion;
  m.def(
      "quantize_int4",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t w, int64_t n, int64_t k,
         int64_t group_size, uintptr_t qweight, uintptr_t scales, uintptr_t offsets) {
        throw_if_error(fastinternlm::quantize_int4(make_context(device, index, stream),
                                                   as_dtype(dtype), as_ptr<const void>(w), n, k,
                                                   group_size, as_ptr<int32_t>(qweight),
                                                   as_ptr(scales), as_ptr(offsets)));
      },
      release_gil());
  m.def(
      "dequantize_int4",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t qweight,
         uintptr_t scales, uintptr_t offsets, int64_t n, int64_t k, int64_t group_size) {
        throw_if_error(fastinternlm::dequantize_int4(
            make_context(device, index, stream), as_dtype(dtype), as_ptr(out),
            make_weight(qweight, scales, offsets, n, k, group_size)));
      },
      release_gil());
  m.def(
      "int4_gemm",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t x, int64_t rows,
         uintptr_t qweight, uintptr_t scales, uintptr_t offsets, int64_t n, int64_t k,
         int64_t group_size) {
        throw_if_error(fastinternlm::int4_gemm(make_context(device, index, stream), as_dtype(dtype),
                                               as_ptr(out), as_ptr<const void>(x), rows,
                                               make_weight(qweight, scales, offsets, n, k,
                                                           group_size)));
      },
      release_gil());
  // Benchmarking hook (python -m fastinternlm.bench.int4_gemm_sweep): selects the build of
  // the CUDA m <= 16 kernel; 0 is the default. Not part of the supported API.
  m.attr("int4_small_m_variants") = kInt4SmallMVariants;
  m.def("_set_small_m_variant",
        [](int variant) { throw_if_error(fastinternlm::set_int4_gemm_small_m_variant(variant)); });
  m.def("_small_m_variant", []() { return fastinternlm::int4_gemm_small_m_variant(); });
}

}  // namespace bindings
}  // namespace fastinternlm
