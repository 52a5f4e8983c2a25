// Placeholder until the int4_gemm family lands.
#include "fastinternlm/int4_gemm.h"
#include "check.h"
