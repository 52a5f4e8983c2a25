// Placeholder until the rotary family lands.
#include "fastinternlm/rotary.h"
#include "check.h"
