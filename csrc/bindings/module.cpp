// fastinternlm._C: the Python face of the C++ core. One register_* per kernel family.
#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinternlm kernels (C++ core; pointers in, Status out)";
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_architectures", &cuda_architectures);
  m.def("version", &version);
  m.def("set_num_threads", [](int64_t n) { throw_if_error(set_num_threads(n)); }, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("cpu_isa", &cpu_isa);
  m.def("set_programmatic_launch", &set_programmatic_launch, py::arg("enabled"));
  m.def("programmatic_launch", &programmatic_launch);
  register_rms_norm(m);
  register_rotary(m);
  register_silu_and_mul(m);
  register_attention(m);
  register_int4_gemm(m);
}

}  // namespace bindings
}  // namespace fastinternlm
