#include "bind_util.h"
namespace fastinternlm { namespace bindings {
void register_attention(py::module_&) {}
}}
