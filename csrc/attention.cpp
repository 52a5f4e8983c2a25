// Placeholder until the attention family lands.
#include "fastinternlm/attention.h"
#include "check.h"
