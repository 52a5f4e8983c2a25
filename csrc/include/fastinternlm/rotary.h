// Rotary position embedding with half-split pairing (HF rotate_half): dimension i pairs
// with i + D/2, inv_freq[i] = base^(-2i/D), angle = float(position) * inv_freq[i].
// Angles, cos and sin are computed here in float32 (no cos/sin cache), so every token
// can carry its own base: that is what makes a per-sequence dynamic-NTK base free.
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

// In place on q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim], both of
// `dtype`. positions: [tokens] of kInt32 or kInt64. bases: nullptr (use `base` for every
// token) or float32 [tokens]. head_dim even, at most 256.
Status rotary_embedding(const Context& ctx, DType dtype, void* q, void* k, const void* positions,
                        DType positions_dtype, const float* bases, float base, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t head_dim);

// Dynamic-NTK base: theta while length <= max_position_embeddings, else
// theta * (factor * length / max_position_embeddings - (factor - 1)) ^ (D / (D - 2)).
Status ntk_base(double theta, double factor, int64_t max_position_embeddings, int64_t length,
                int64_t head_dim, double* out);

}  // namespace fastinternlm
