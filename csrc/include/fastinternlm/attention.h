// Causal grouped-query attention over a per-layer KV cache.
//
// The cache of one layer is two arrays k and v of shape [num_slots, kv_heads, max_seq,
// head_dim]; a sequence owns one slot. Query head h reads KV head h / (q_heads / kv_heads).
// Scores, softmax and the weighted sum are float32 and max-subtracted (the CUDA kernels
// keep a running maximum, online softmax), so long contexts neither overflow nor lose the
// small terms; the output is rounded once to the activation dtype. One exception: CUDA
// prefill runs P V on tensor cores, so it rounds each probability (relative to the running
// maximum) once to the activation dtype first, as flash-attention and SDPA do; the
// normaliser sums the unrounded float32 values. That adds a relative error of at most one
// unit roundoff per weight, random across keys (tests/test_attention.py bounds its sum).
//
// Supported: head_dim 64 or 128; q_heads a multiple of kv_heads with a group size
// q_heads / kv_heads from 1 to 8; float16/bfloat16 (float32 too on the CPU); a scale that
// is finite and > 0 (models use 1/sqrt(head_dim)). On CUDA every pointer (q, k, v, out,
// both caches, the workspace) must be 16-byte aligned, since the kernels move 16-byte
// vectors; on the CPU the element alignment suffices.
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
// [0, start + t]. q, out: [tokens, q_heads, head_dim]. start > 0 continues a long prompt,
// whose positions [0, start) an earlier call wrote. slot, start and start + tokens <=
// max_seq are checked on every device (they are host values).
Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale);

// Bytes of scratch attention_decode needs for these sizes: 0 on the CPU. It depends on the
// sizes only (never on slot or position values), so a caller can allocate it once and
// capture the decode step in a CUDA graph. The decode kernel splits each sequence's context
// across thread blocks and merges the partial softmaxes, so one long sequence still fills
// the GPU.
int64_t attention_decode_workspace_bytes(const Context& ctx, int64_t batch, int64_t q_heads,
                                         const KVCache& cache);

// One new token per sequence: q [batch, q_heads, head_dim]; k, v [batch, kv_heads, head_dim];
// slots, positions: int32 [batch] in the memory of ctx's device. Writes each token's k, v at
// its position in its slot, then attends over [0, position]. Slots in one call must be
// distinct. workspace: at least attention_decode_workspace_bytes(...) bytes on the device
// (may be null when that is 0).
// On the CPU, slots (in range, distinct) and positions (in [0, max_seq)) are checked; on
// the GPU, where checking would need a host round trip, a sequence with an out-of-range
// slot or position is skipped: nothing of it is written to the cache and its output rows
// are NaN. Duplicate slots on the GPU race on the cache (never out of bounds).
Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes);

// attention_decode with its inputs taken straight from InternLM2's fused wqkv projection and
// RoPE applied on the way: qkv [batch, kv_heads, G + 2, head_dim] (G = q_heads / kv_heads;
// per KV head its G query rows, then k, then v: the grouped layout of the wqkv GEMM's
// output), bases float32 [batch] in the memory of ctx's device (each sequence's rotary
// base). q and the new k are rotated at each sequence's position exactly as
// rotary_embedding does (same arithmetic and roundings), the rotated k is what lands in
// the cache, and the rest is attention_decode. qkv is not modified. At batch 1 this saves
// the three copies that split q, k and v, and the rotary launch: four kernels per layer.
// Same workspace, index rules and out-of-range behaviour as attention_decode.
Status attention_decode_qkv(const Context& ctx, DType dtype, void* out, const void* qkv,
                            const KVCache& cache, int64_t batch, int64_t q_heads,
                            const int32_t* slots, const int32_t* positions, const float* bases,
                            float scale, void* workspace, int64_t workspace_bytes);

// Benchmarking hook, process-wide: how the CUDA decode kernels cut a context into splits.
// A sequence's context is cut into chunks of at least `min_chunk` tokens (a multiple of
// 16), and a call aims at about `target_blocks` thread blocks in all; the defaults are
// below (attention.cu says why). It changes attention_decode_workspace_bytes, so set it
// before allocating a workspace or capturing a graph. kUnsupported without CUDA.
constexpr int64_t kDecodeMinChunk = 64;
constexpr int64_t kDecodeTargetBlocks = 264;
Status set_decode_split_tuning(int64_t min_chunk, int64_t target_blocks);

}  // namespace fastinternlm
