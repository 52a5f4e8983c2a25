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
// vectors, and a quantized cache's parameter arrays aligned to one (scale, zero) pair (8
// bytes for float32 parameters, 4 for float16); on the CPU the element alignment suffices.
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

// What a cache row holds. kActivation: the activation dtype itself. kInt8 / kInt4: codes plus
// an affine pair per group of channels, quantized when the row is written and dequantized
// where it is read (inside the attention kernels: no separate pass, no activation-dtype copy
// of the cache).
//
// Quantized format, version 3. A row is one token of one KV head: head_dim values x, cut
// into groups of g consecutive channels, g = kv_cache_group(format, head_dim): the whole row
// (g = head_dim) for int8, 16 channels for int4.
//   k, v:               uint8 [num_slots, kv_heads, max_seq, head_dim * bits / 8]
//   k_params, v_params: P [num_slots, kv_heads, max_seq, head_dim / g, 2], per group
//                       (scale, zero); P = kv_cache_params_dtype(activation dtype): float16
//                       for float16 activations, float32 for bfloat16 and float32
// (bits = 8 or 4; qmax = 2^bits - 1 = 255 or 15). Each group, of K and of V separately:
//   zero  = min_i x_i                      (exact in P: x_i is a value of the activation dtype)
//   s     = (max_i x_i - zero) / qmax      (float32, each operation rounded once)
//   scale = s rounded to P upward (float16: the least float16 >= s; float32: s itself), so
//           that (max - zero) / scale <= qmax up to the float32 roundings
//   q_i   = min(qmax, rint((x_i - zero) * (1 / float(scale))))   (float32, ties to even;
//           all 0 if scale == 0, i.e. a constant group)
//   x_i  ~= fma(float(q_i), float(scale), float(zero))   (float32, rounded once, on every
//           device; |error| <= scale / 2 + float32 roundings, scale being the stored one)
// The codes come from the stored (rounded) scale and zero, so the float16 rounding of the
// scale widens the step by one float16 ulp at most (2^-10 relative; at most 2^-24 absolute
// for a scale in float16's subnormal range, below 2^-14) and never moves a value beyond half
// of the stored step.
// int4 packs two codes per byte: value 2j in the low nibble of byte j, 2j + 1 in the high one.
// Unsigned codes with zero = the group minimum make it asymmetric (a group that is all
// positive still uses every code), like lmdeploy's online KV quantization; the parameters
// follow each token's own range, so one outlier token does not coarsen the others.
// Why groups of 16 for int4 (versions 1 and earlier had one pair per row for both): after
// RoPE a few key channels carry outliers, and a row's 16 levels spread over their range left
// SmolLM2-135M 15 % above the float cache's perplexity; groups of 16 bring it within 5 %
// (int8, with 256 levels, stays within 0.1 % per row). docs/accuracy.md has the candidates
// measured (groups, Hadamard rotation, clipping, float16 parameters) and their cost. A group
// of 16 is two 8-value lanes of the CUDA kernels, so its minimum and maximum take one shuffle.
// Why float16 parameters only for float16 activations (version 2 stored float32 always):
// the parameters are half of an int4 row (at head_dim 128: 64 bytes of codes, 64 of float32
// pairs), and float16 pairs bring a 7B model's int4 cache at 1M tokens onto one 80 GB card.
// A float16 value's minimum is a float16 and the range of two float16 values divided by
// qmax stays below 65504 / 7.5, so both fit float16; bfloat16 values reach 3e38, beyond
// float16's range (65504), and float32 activations run on the CPU only, where memory is not
// the limit. Bytes per row at head_dim 128 (64: half of each):
//   int8: 128 of codes + 8 (float32 pair) or 4 (float16 pair)
//   int4:  64 of codes + 64 (8 float32 pairs) or 32 (8 float16 pairs)
// The rows must be finite. Offsets into the cache are 64-bit on every path (a 1M-token cache
// of a few slots has more than 2^31 elements per layer); positions are int32 in the CUDA
// kernels, so CUDA takes max_seq <= 2^31 - 1 - 256 (a key tile of headroom).
enum class KVCacheFormat : int { kActivation = 0, kInt8 = 1, kInt4 = 2 };

// Bits per cached value (16/32 for kActivation is the dtype's; this returns 8 or 4, else 0).
constexpr int kv_cache_bits(KVCacheFormat f) {
  return f == KVCacheFormat::kInt8 ? 8 : f == KVCacheFormat::kInt4 ? 4 : 0;
}

// Channels per (scale, zero) group of a quantized format: head_dim for int8, 16 for int4
// (0 for kActivation). head_dim / group pairs per row.
constexpr int64_t kv_cache_group(KVCacheFormat f, int64_t head_dim) {
  return f == KVCacheFormat::kInt8 ? head_dim : f == KVCacheFormat::kInt4 ? 16 : 0;
}

// The dtype of a quantized cache's (scale, zero) parameters for activation dtype `dtype`
// (format version 3 above): float16 for float16, float32 otherwise. The caller allocates
// k_params and v_params of this dtype; nothing in the KVCache records it.
constexpr DType kv_cache_params_dtype(DType dtype) {
  return dtype == DType::kFloat16 ? DType::kFloat16 : DType::kFloat32;
}

struct KVCache {
  void* k = nullptr;  // [num_slots, kv_heads, max_seq, head_dim] of the activation dtype,
  void* v = nullptr;  // or of codes (see above)
  int64_t num_slots = 0;
  int64_t kv_heads = 0;
  int64_t max_seq = 0;
  int64_t head_dim = 0;
  KVCacheFormat format = KVCacheFormat::kActivation;
  void* k_params = nullptr;  // quantized formats only: kv_cache_params_dtype(activation dtype)
  void* v_params = nullptr;  // [num_slots, kv_heads, max_seq, head_dim / group, 2]
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
