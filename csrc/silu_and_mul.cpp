// Placeholder until the silu_and_mul family lands.
#include "fastinternlm/silu_and_mul.h"
#include "check.h"
