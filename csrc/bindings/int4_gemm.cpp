#include "bind_util.h"
namespace fastinternlm { namespace bindings {
void register_int4_gemm(py::module_&) {}
}}
