#include "bind_util.h"
namespace fastinternlm { namespace bindings {
void register_silu_and_mul(py::module_&) {}
}}
