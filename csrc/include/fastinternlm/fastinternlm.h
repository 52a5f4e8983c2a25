// Umbrella header: everything a C++ service needs to call the fastinternlm kernels.
#pragma once

#include "fastinternlm/common.h"
#include "fastinternlm/attention.h"
#include "fastinternlm/int4_gemm.h"
#include "fastinternlm/rms_norm.h"
#include "fastinternlm/rotary.h"
#include "fastinternlm/silu_and_mul.h"
