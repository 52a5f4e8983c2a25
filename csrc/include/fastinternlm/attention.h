// Causal grouped-query attention over a per-layer KV cache.
//
// The cache of one layer is two arrays k and v of shape [num_slots, kv_heads, max_seq,
// head_dim]; a sequence owns one slot. Query head h reads KV head h / (q_heads / kv_heads).
// Scores and softmax are float32 with a running maximum (online softmax), so long
// contexts neither overflow nor lose the small terms.
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

struct KVCache {
  void* k = nullptr;  // [num_slots, kv_heads, max_seq, head_dim] of the activation dtype
  void* v = nullptr;
  int64_t num_slots = 0;
  int64_t kv_heads = 0;
  int64_t max_seq = 0;
  int64_t head_dim = 0;
};

// Prefill a chunk of one sequence: writes k, v [tokens, kv_heads, head_dim] into `slot` at
// positions [start, start + tokens), then out[t] = attention of q[t] over positions
// [0, start + t]. q, out: [tokens, q_heads, head_dim]. start > 0 continues a long prompt.
Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale);

// Bytes of scratch attention_decode needs on the GPU for these sizes (0 on the CPU). The
// decode kernel splits each sequence's context across thread blocks and merges the
// partial softmaxes, so one long sequence still fills the GPU.
int64_t attention_decode_workspace_bytes(const Context& ctx, int64_t batch, int64_t q_heads,
                                         const KVCache& cache);

// One new token per sequence: q [batch, q_heads, head_dim]; k, v [batch, kv_heads, head_dim];
// slots, positions: int32 [batch]. Writes each token's k, v at its position in its slot,
// then attends over [0, position]. Slots in one call must be distinct.
// On the CPU, slots and positions are checked; on the GPU an out-of-range entry is skipped
// (nothing written to the cache, its output rows set to NaN) since checking would need a
// host round trip.
Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes);

}  // namespace fastinternlm
