#include "bind_util.h"
namespace fastinternlm { namespace bindings {
void register_rotary(py::module_&) {}
}}
