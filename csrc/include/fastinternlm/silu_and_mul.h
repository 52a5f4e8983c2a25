// SwiGLU's gate: out = silu(gate) * up with x = [gate | up] along the last dimension.
// As in HF: silu is evaluated in float32 and rounded to dtype, then multiplied by up
// and rounded again.
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

// x: [rows, 2 * ffn], out: [rows, ffn], both of `dtype`.
Status silu_and_mul(const Context& ctx, DType dtype, void* out, const void* x, int64_t rows,
                    int64_t ffn);

}  // namespace fastinternlm
