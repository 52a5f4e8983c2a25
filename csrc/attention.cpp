// Attention over the KV cache: argument checks, dispatch, and the CPU reference.
//
// The CPU path is the oracle the CUDA kernels are tested against and what runs small
// models without a GPU, so its arithmetic is plain and fixed. Per query row:
//   qs[i]  = float(q[i]) * scale
//   s_j    = dot(qs, k_j): eight partial sums, lane e adding qs[i] * k_j[i] for
//            i = e, e + 8, ... in order (each product rounded, then each sum), combined as
//            ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
//   m      = the exact maximum of the s_j (all scores are at hand, so no running maximum)
//   p_j    = exp(s_j - m);  sum = p_0 + p_1 + ... in order
//   acc[i] = p_0 * v_0[i] + p_1 * v_1[i] + ... in order (products rounded, then sums)
//   out[i] = dtype(acc[i] * (1 / sum))
// The cache rows are converted to float32 once per call (read in place when they are
// float32 already; quantized rows are dequantized, fma(q, scale, zero) in float32 from
// parameters of either storage type, the CUDA kernels' arithmetic too) and shared by the group's query heads; rows of queries are spread over
// threads, each row computed whole by one thread, so results do not depend on the thread
// count or on the CPU tier (the vectors hold the lanes above). Decode computes one row at
// a time (attend_row); prefill computes the rows of a block of tokens and one KV head
// together (attend_rows: its vectors hold one partial sum of several keys, or several
// channels of one row), performing for each row the same operations in the same order,
// so a prefill row is bit for bit the decode step at its position.
#include "fastinternlm/attention.h"
#include "fastinternlm/rotary.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu_tiers.h"
#include "half.h"
#include "kernels_cuda.h"
#include "parallel.h"

#define FIL_TIER_KERNELS "attention_cpu.inc"
#define FIL_TIER_WITH_V4 1
#include "cpu_tiers.inc"
#undef FIL_TIER_WITH_V4
#undef FIL_TIER_KERNELS

namespace fastinternlm {
namespace {

constexpr int64_t kMaxGroup = 8;
// Float32 copies of the cache rows a decode call reads, at most this many bytes at once
// (a larger batch goes in several rounds).
constexpr int64_t kDecodeScratchBytes = int64_t{64} << 20;

// Row (slot, head, pos) of the cache, counted in rows: 64-bit, since a long cache of a few
// slots has more than 2^31 elements (and rows * head_dim is formed in int64 too).
int64_t row_index(const KVCache& c, int64_t slot, int64_t head, int64_t pos) {
  return (slot * c.kv_heads + head) * c.max_seq + pos;
}

template <typename T>
T* cache_row(void* base, const KVCache& c, int64_t slot, int64_t head, int64_t pos) {
  return static_cast<T*>(base) + row_index(c, slot, head, pos) * c.head_dim;
}

bool quantized(const KVCache& c) { return c.format != KVCacheFormat::kActivation; }

// Bytes of codes per row of a quantized cache.
int64_t code_bytes(const KVCache& c) { return c.head_dim * kv_cache_bits(c.format) / 8; }

// (scale, zero) pairs per row of a quantized cache.
int64_t param_pairs(const KVCache& c) { return c.head_dim / kv_cache_group(c.format, c.head_dim); }

// The storage type of a quantized cache's (scale, zero) parameters for activations T
// (attention.h kv_cache_params_dtype): float16 for float16, float32 otherwise.
template <typename T>
using KVParam = typename std::conditional<std::is_same<T, half_t>::value, half_t, float>::type;

// The stored scale of format v3: s itself in float32, the least float16 >= s in float16
// (s >= 0 and below float16's maximum, attention.h). Rounding up keeps (max - zero) / scale
// within qmax, so the group's largest value still gets a code.
inline float stored_scale(float s, float*) { return s; }
inline half_t stored_scale(float s, half_t*) {
  half_t h = from_float<half_t>(s);
  if (to_float(h) < s) ++h.bits;  // s > 0: the next float16 up is the next bit pattern
  return h;
}

// The format of attention.h, version 3: one row x [d] to codes and a (scale, zero) pair per
// group of `group` channels, the pair of type P = KVParam<T>.
template <typename T, typename P>
void quantize_row(const T* x, int64_t d, int bits, int64_t group, uint8_t* codes, P* params) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (bits == 4) std::memset(codes, 0, static_cast<size_t>(d / 2));
  for (int64_t g0 = 0; g0 < d; g0 += group, params += 2) {
    float lo = to_float(x[g0]), hi = lo;
    for (int64_t i = g0 + 1; i < g0 + group; ++i) {
      const float f = to_float(x[i]);
      lo = std::min(lo, f);
      hi = std::max(hi, f);
    }
    params[0] = stored_scale((hi - lo) / qmax, params);
    params[1] = from_float<P>(lo);  // exact: lo is a value of T, and P holds every T value
    // The codes use the stored parameters, which dequantization reads.
    const float scale = to_float(params[0]);
    // Below FLT_MIN 1 / scale could overflow; such a group is constant to within 1e-35.
    const float inv = scale >= std::numeric_limits<float>::min() ? 1.0f / scale : 0.0f;
    for (int64_t i = g0; i < g0 + group; ++i) {
      const float q = std::min(qmax, std::nearbyint((to_float(x[i]) - lo) * inv));
      const auto code = static_cast<uint8_t>(q);
      if (bits == 8)
        codes[i] = code;
      else
        codes[i / 2] = static_cast<uint8_t>(codes[i / 2] | (code << (4 * (i % 2))));
    }
  }
}

// Rows [r, r + n) of a quantized cache array with activations T to float32:
// fma(q, scale, zero), one rounding, exactly what the CUDA kernels compute
// (attention_cpu.inc, every tier).
template <typename T>
void dequantize_rows(const KVCache& c, const void* codes, const void* params, int64_t r, int64_t n,
                     float* dst) {
  const int64_t row_bytes = code_bytes(c), pairs = param_pairs(c);
  FIL_TIER_SELECT(dequantize_codes<KVParam<T>>)(static_cast<const uint8_t*>(codes) + r * row_bytes, row_bytes,
                                                static_cast<const KVParam<T>*>(params) + 2 * pairs * r, n,
                                                c.head_dim, kv_cache_group(c.format, c.head_dim),
                                                kv_cache_bits(c.format), dst);
}

// Stores the new rows of one token and KV head, src_k/src_v [head_dim], at (slot, head, pos).
template <typename T>
void write_row(const KVCache& c, int64_t slot, int64_t head, int64_t pos, const T* src_k, const T* src_v) {
  const int64_t d = c.head_dim;
  if (!quantized(c)) {
    std::copy(src_k, src_k + d, cache_row<T>(c.k, c, slot, head, pos));
    std::copy(src_v, src_v + d, cache_row<T>(c.v, c, slot, head, pos));
    return;
  }
  const int64_t r = row_index(c, slot, head, pos), bits = kv_cache_bits(c.format);
  const int64_t group = kv_cache_group(c.format, d), p = 2 * param_pairs(c) * r;
  quantize_row(src_k, d, bits, group, static_cast<uint8_t*>(c.k) + r * code_bytes(c), static_cast<KVParam<T>*>(c.k_params) + p);
  quantize_row(src_v, d, bits, group, static_cast<uint8_t*>(c.v) + r * code_bytes(c), static_cast<KVParam<T>*>(c.v_params) + p);
}

template <typename T>
using AttendRow = void (*)(T*, const T*, const float*, const float*, int64_t, float, float*);

template <typename T>
AttendRow<T> select_attend_row(int64_t head_dim) {
  return head_dim == 64 ? FIL_TIER_SELECT(attend_row<T, 64>) : FIL_TIER_SELECT(attend_row<T, 128>);
}

// For T other than float32 or a quantized cache: converts rows [0, lens[p]) of cache head (slots[p], heads[p])
// of both caches into kf, vf + p * stride * head_dim, for the pairs p in [0, pairs),
// in pieces of 64 positions spread over threads (a prompt has only a few KV heads).
template <typename T>
void convert_heads(const KVCache& c, const int64_t* slots, const int64_t* heads, const int64_t* lens,
                   int64_t pairs, int64_t stride, float* kf, float* vf) {
  constexpr int64_t kPiece = 64;
  const int64_t d = c.head_dim, pieces = (stride + kPiece - 1) / kPiece;
  const auto convert = FIL_TIER_SELECT(convert_rows<T>);
  parallel_for(pairs * pieces, 2 * kPiece * d, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / pieces, r0 = i % pieces * kPiece, r1 = std::min(lens[p], r0 + kPiece);
      if (r1 <= r0) continue;
      const int64_t off = (p * stride + r0) * d;
      if (quantized(c)) {
        const int64_t r = row_index(c, slots[p], heads[p], r0);
        dequantize_rows<T>(c, c.k, c.k_params, r, r1 - r0, kf + off);
        dequantize_rows<T>(c, c.v, c.v_params, r, r1 - r0, vf + off);
        continue;
      }
      convert(cache_row<T>(c.k, c, slots[p], heads[p], r0), (r1 - r0) * d, kf + off);
      convert(cache_row<T>(c.v, c, slots[p], heads[p], r0), (r1 - r0) * d, vf + off);
    }
  });
}

template <typename T>
Status prefill_cpu(T* out, const T* q, const T* k, const T* v, const KVCache& c, int64_t tokens,
                   int64_t q_heads, int64_t slot, int64_t start, float scale) {
  const int64_t d = c.head_dim, hkv = c.kv_heads, group = q_heads / hkv;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < hkv; ++h)
      write_row(c, slot, h, start + t, k + (t * hkv + h) * d, v + (t * hkv + h) * d);
  const int64_t len = start + tokens;
  const bool convert = !std::is_same<T, float>::value || quantized(c);
  const int threads = get_num_threads();
  const int64_t lanes = FIL_TIER_SELECT_V4(prefill_lanes)(), key_blocks = (len + lanes - 1) / lanes;
  // Items are (block of tokens, kv head): all group x block query rows of one KV head
  // go through attend_rows together, which reads each key and value once for them all.
  // Blocks of about 24 rows keep a thread's rows, keys and values in L1/L2 and leave
  // several items per thread; a row's result does not depend on the block it is in.
  const int64_t block = std::max<int64_t>(1, std::min(tokens, (24 + group - 1) / group));
  const int64_t per_slot = FIL_TIER_SELECT_V4(attend_rows_scratch)(block * group, len, d);
  Scratch<float> kv, kt, scratch;
  Scratch<int64_t> pairs;  // slot, head, length of each (slot, head) pair converted
  if (!scratch.allocate(threads * per_slot) || !kt.allocate(hkv * key_blocks * lanes * d) ||
      (convert && (!kv.allocate(2 * hkv * len * d) || !pairs.allocate(3 * hkv))))
    return invalid_value("attention_prefill: cannot allocate CPU scratch for ", len, " positions");
  float* kf = kv.data();
  float* vf = convert ? kf + hkv * len * d : nullptr;
  if (convert) {
    int64_t* pair_slots = pairs.data();
    int64_t* pair_heads = pair_slots + hkv;
    int64_t* pair_lens = pair_heads + hkv;
    for (int64_t h = 0; h < hkv; ++h) {
      pair_slots[h] = slot;
      pair_heads[h] = h;
      pair_lens[h] = len;
    }
    convert_heads<T>(c, pair_slots, pair_heads, pair_lens, hkv, len, kf, vf);
  }
  const float* k_heads = convert ? kf : reinterpret_cast<const float*>(cache_row<T>(c.k, c, slot, 0, 0));
  const float* v_heads = convert ? vf : reinterpret_cast<const float*>(cache_row<T>(c.v, c, slot, 0, 0));
  const int64_t head_stride = convert ? len * d : c.max_seq * d;  // floats between KV heads
  if (tokens == 1 || len <= 32) {
    // One token has only `group` rows per KV head to share the keys, and a few keys are
    // few to share: transposing them would cost more than it saves, so each row goes
    // through attend_row (decode's kernel, the same arithmetic).
    const AttendRow<T> attend = select_attend_row<T>(d);
    parallel_for_slots(tokens * q_heads, len * d * 4, threads, [&](int64_t r0, int64_t r1, int slot_index) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / q_heads, h = r % q_heads / group;
        attend(out + r * d, q + r * d, k_heads + h * head_stride, v_heads + h * head_stride, start + t + 1,
               scale, scratch.data() + slot_index * per_slot);
      }
    });
    return Status::Ok();
  }
  const int64_t blocks = (tokens + block - 1) / block;
  const int64_t w = lanes;
  const auto transpose = FIL_TIER_SELECT_V4(transpose_keys);
  parallel_for(hkv * key_blocks, 2 * w * d, [&](int64_t i0, int64_t i1) {
    while (i0 < i1) {
      const int64_t h = i0 / key_blocks, b0 = i0 % key_blocks, b1 = std::min(key_blocks, b0 + (i1 - i0));
      transpose(k_heads + h * head_stride, len, d, b0, b1, kt.data() + h * key_blocks * w * d);
      i0 += b1 - b0;
    }
  });
  const auto attend = d == 64 ? FIL_TIER_SELECT_V4(attend_rows<T, 64>) : FIL_TIER_SELECT_V4(attend_rows<T, 128>);
  // Later blocks attend to more keys: items are taken in folded order (first, last,
  // second, ...) so that every chunk of items mixes short and long ones.
  parallel_for_slots(blocks * hkv, group * block * (start + tokens / 2 + 1) * d * 4, threads,
                     [&](int64_t i0, int64_t i1, int slot_index) {
    float* scr = scratch.data() + slot_index * per_slot;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / hkv, h = i % hkv;
      const int64_t tb = (u % 2 == 0) ? u / 2 : blocks - 1 - u / 2;
      const int64_t t0 = tb * block, nt = std::min(tokens, t0 + block) - t0;
      const int64_t row = t0 * q_heads + h * group;
      attend(out + row * d, q + row * d, q_heads * d, nt, group, kt.data() + h * key_blocks * w * d,
             v_heads + h * head_stride, start + t0 + 1, scale, scr);
    }
  });
  return Status::Ok();
}

template <typename T>
Status decode_cpu(T* out, const T* q, const T* k, const T* v, const KVCache& c, int64_t batch,
                  int64_t q_heads, const int32_t* slots, const int32_t* positions, float scale) {
  const int64_t d = c.head_dim, hkv = c.kv_heads, group = q_heads / hkv;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < hkv; ++h)
      write_row(c, slots[b], h, positions[b], k + (b * hkv + h) * d, v + (b * hkv + h) * d);
  const bool convert = !std::is_same<T, float>::value || quantized(c);
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, positions[b] + 1);
  // Sequences per round: their float32 K/V copies fit the scratch budget.
  const int64_t round =
      convert ? std::max<int64_t>(1, std::min(batch, kDecodeScratchBytes / (2 * hkv * max_len * d * 4)))
               : batch;
  const int threads = get_num_threads();
  Scratch<float> kv, scratch;
  Scratch<int64_t> pairs;  // slot, head, length of each (slot, head) pair converted
  if (!scratch.allocate(threads * (d + max_len)) ||
      (convert && (!kv.allocate(2 * round * hkv * max_len * d) || !pairs.allocate(3 * round * hkv))))
    return invalid_value("attention_decode: cannot allocate CPU scratch for ", max_len, " positions");
  const AttendRow<T> attend = select_attend_row<T>(d);
  for (int64_t b0 = 0; b0 < batch; b0 += round) {
    const int64_t nb = std::min(batch, b0 + round) - b0;
    float* kf = kv.data();
    float* vf = convert ? kf + nb * hkv * max_len * d : nullptr;
    if (convert) {
      int64_t* pair_slots = pairs.data();
      int64_t* pair_heads = pair_slots + round * hkv;
      int64_t* pair_lens = pair_heads + round * hkv;
      for (int64_t p = 0; p < nb * hkv; ++p) {
        pair_slots[p] = slots[b0 + p / hkv];
        pair_heads[p] = p % hkv;
        pair_lens[p] = positions[b0 + p / hkv] + 1;
      }
      convert_heads<T>(c, pair_slots, pair_heads, pair_lens, nb * hkv, max_len, kf, vf);
    }
    // Items are query rows (sequence, query head): one sequence still has q_heads of them
    // to share out.
    parallel_for_slots(nb * q_heads, max_len * d * 4, threads, [&](int64_t r0, int64_t r1, int slot_index) {
      float* scr = scratch.data() + slot_index * (d + max_len);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = b0 + r / q_heads, hq = r % q_heads, h = hq / group;
        const int64_t pair = (b - b0) * hkv + h, len = positions[b] + 1;
        const float* kh = convert ? kf + pair * max_len * d
                                   : reinterpret_cast<const float*>(cache_row<T>(c.k, c, slots[b], h, 0));
        const float* vh = convert ? vf + pair * max_len * d
                                   : reinterpret_cast<const float*>(cache_row<T>(c.v, c, slots[b], h, 0));
        const int64_t row = b * q_heads + hq;
        attend(out + row * d, q + row * d, kh, vh, len, scale, scr);
      }
    });
  }
  return Status::Ok();
}

// What prefill and decode share: the context, dtype, cache geometry, head counts, scale
// and pointers.
Status check_common(const Context& ctx, DType dtype, const void* out, const void* q, const void* k,
                    const void* v, const KVCache& cache, int64_t rows, const char* rows_name,
                    int64_t q_heads, float scale) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "q", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("q", q));
  FIL_RETURN_IF_ERROR(check_not_null("k", k));
  FIL_RETURN_IF_ERROR(check_not_null("v", v));
  FIL_RETURN_IF_ERROR(check_not_null("k_cache", cache.k));
  FIL_RETURN_IF_ERROR(check_not_null("v_cache", cache.v));
  FIL_RETURN_IF_ERROR(check_one_of("kv_cache format", static_cast<int64_t>(cache.format), {0, 1, 2}));
  if (quantized(cache)) {
    FIL_RETURN_IF_ERROR(check_not_null("k_params", cache.k_params));
    FIL_RETURN_IF_ERROR(check_not_null("v_params", cache.v_params));
  }
  FIL_RETURN_IF_ERROR(check_positive(rows_name, rows));
  FIL_RETURN_IF_ERROR(check_positive("num_slots", cache.num_slots));
  FIL_RETURN_IF_ERROR(check_positive("kv_heads", cache.kv_heads));
  FIL_RETURN_IF_ERROR(check_positive("max_seq", cache.max_seq));
  FIL_RETURN_IF_ERROR(check_one_of("head_dim", cache.head_dim, {64, 128}));
  FIL_RETURN_IF_ERROR(check_positive("q_heads", q_heads));
  FIL_RETURN_IF_ERROR(check_multiple("q_heads", q_heads, cache.kv_heads, "kv_heads"));
  const int64_t group = q_heads / cache.kv_heads;
  if (group > kMaxGroup)
    return invalid_value("q_heads / kv_heads (the group size) must be in [1, ", kMaxGroup,
                         "], got ", q_heads, " / ", cache.kv_heads, " = ", group);
  if (!(scale > 0.0f) || !std::isfinite(scale))
    return invalid_value("scale must be a finite number > 0, got ", scale);
  if (ctx.device == Device::kCUDA) {
    // Positions are int32 on the device, and the kernels step a tile of keys past the last
    // position (decode up to 64, prefill 64) before the loop test: 256 of headroom keeps
    // every such index in int32. The grid spans kv_heads and rows.
    constexpr int64_t kMaxSeqCuda = std::numeric_limits<int32_t>::max() - 256;
    if (cache.max_seq > kMaxSeqCuda)
      return invalid_value("max_seq must be <= ", kMaxSeqCuda, " on CUDA, got ", cache.max_seq);
    if (cache.kv_heads > 65535) return invalid_value("kv_heads must be <= 65535 on CUDA, got ", cache.kv_heads);
    const int64_t max_rows = std::string(rows_name) == "batch" ? 65535 : std::numeric_limits<int32_t>::max();
    if (rows > max_rows) return invalid_value(rows_name, " must be <= ", max_rows, " on CUDA, got ", rows);
    FIL_RETURN_IF_ERROR(check_aligned("out", out, 16));
    FIL_RETURN_IF_ERROR(check_aligned("q", q, 16));
    FIL_RETURN_IF_ERROR(check_aligned("k", k, 16));
    FIL_RETURN_IF_ERROR(check_aligned("v", v, 16));
    FIL_RETURN_IF_ERROR(check_aligned("k_cache", cache.k, 16));
    FIL_RETURN_IF_ERROR(check_aligned("v_cache", cache.v, 16));
    if (quantized(cache)) {  // one (scale, zero) pair per load: float2 or half2
      const int64_t pair = 2 * dtype_size(kv_cache_params_dtype(dtype));
      FIL_RETURN_IF_ERROR(check_aligned("k_params", cache.k_params, pair));
      FIL_RETURN_IF_ERROR(check_aligned("v_params", cache.v_params, pair));
    }
  }
  return Status::Ok();
}

}  // namespace

Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale) {
  FIL_RETURN_IF_ERROR(check_common(ctx, dtype, out, q, k, v, cache, tokens, "tokens", q_heads, scale));
  FIL_RETURN_IF_ERROR(check_range("slot", slot, 0, cache.num_slots));
  if (start < 0) return invalid_value("start must be >= 0, got ", start);
  if (start > cache.max_seq - tokens)
    return invalid_value("start + tokens must be <= max_seq (", cache.max_seq, "), got ", start,
                         " + ", tokens, " = ", start + tokens);
  FIL_DISPATCH_CUDA(ctx, "attention_prefill",
                    cuda::attention_prefill(ctx, dtype, out, q, k, v, cache, tokens, q_heads, slot,
                                            start, scale));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return prefill_cpu(static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k),
                       static_cast<const T*>(v), cache, tokens, q_heads, slot, start, scale);
  });
}

Status set_decode_split_tuning(int64_t min_chunk, int64_t target_blocks) {
#if FASTINTERNLM_WITH_CUDA
  return cuda::set_decode_split_tuning(min_chunk, target_blocks);
#else
  (void)min_chunk, (void)target_blocks;
  return not_compiled("set_decode_split_tuning");
#endif
}

int64_t attention_decode_workspace_bytes(const Context& ctx, int64_t batch, int64_t q_heads,
                                         const KVCache& cache) {
#if FASTINTERNLM_WITH_CUDA
  if (ctx.device == Device::kCUDA && batch > 0 && q_heads > 0 && cache.kv_heads > 0 &&
      cache.max_seq > 0 && cache.head_dim > 0)
    return cuda::attention_decode_workspace_bytes(batch, q_heads, cache);
#else
  (void)ctx, (void)batch, (void)q_heads, (void)cache;
#endif
  return 0;
}

namespace {

// What both decode entry points check beyond check_common: the index arrays, the workspace
// on CUDA, and on the CPU (host memory) the slot and position values themselves.
Status check_decode(const Context& ctx, const KVCache& cache, int64_t batch, int64_t q_heads,
                    const int32_t* slots, const int32_t* positions, const void* workspace,
                    int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(check_not_null("slots", slots));
  FIL_RETURN_IF_ERROR(check_not_null("positions", positions));
  if (ctx.device == Device::kCUDA) {
    const int64_t need = attention_decode_workspace_bytes(ctx, batch, q_heads, cache);
    if (workspace_bytes < need)
      return invalid_value("workspace must have at least ", need, " bytes, got ", workspace_bytes);
    if (need > 0) {
      FIL_RETURN_IF_ERROR(check_not_null("workspace", workspace));
      FIL_RETURN_IF_ERROR(check_aligned("workspace", workspace, 16));
    }
    return Status::Ok();
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (slots[b] < 0 || slots[b] >= cache.num_slots)
      return invalid_value("slots must be in [0, ", cache.num_slots, "), got ", slots[b], " at index ", b);
    if (positions[b] < 0 || positions[b] >= cache.max_seq)
      return invalid_value("positions must be in [0, ", cache.max_seq, "), got ", positions[b],
                           " at index ", b);
  }
  std::vector<int32_t> sorted(slots, slots + batch);
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end()) return invalid_value("slots must be distinct, got slot ", *dup, " twice");
  return Status::Ok();
}

}  // namespace

Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(check_common(ctx, dtype, out, q, k, v, cache, batch, "batch", q_heads, scale));
  FIL_RETURN_IF_ERROR(check_decode(ctx, cache, batch, q_heads, slots, positions, workspace, workspace_bytes));
  FIL_DISPATCH_CUDA(ctx, "attention_decode",
                    cuda::attention_decode(ctx, dtype, out, q, k, v, cache, batch, q_heads, slots,
                                           positions, scale, workspace, workspace_bytes));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return decode_cpu(static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k),
                      static_cast<const T*>(v), cache, batch, q_heads, slots, positions, scale);
  });
}

Status attention_decode_qkv(const Context& ctx, DType dtype, void* out, const void* qkv,
                            const KVCache& cache, int64_t batch, int64_t q_heads,
                            const int32_t* slots, const int32_t* positions, const float* bases,
                            float scale, void* workspace, int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(check_not_null("qkv", qkv));
  FIL_RETURN_IF_ERROR(check_not_null("bases", bases));
  // q, k and v are rows of qkv: check_common's pointer checks apply to qkv itself (its
  // k and v rows sit whole multiples of head_dim elements further, so stay aligned).
  FIL_RETURN_IF_ERROR(check_common(ctx, dtype, out, qkv, qkv, qkv, cache, batch, "batch", q_heads, scale));
  FIL_RETURN_IF_ERROR(check_decode(ctx, cache, batch, q_heads, slots, positions, workspace, workspace_bytes));
  FIL_DISPATCH_CUDA(ctx, "attention_decode_qkv",
                    cuda::attention_decode_qkv(ctx, dtype, out, qkv, cache, batch, q_heads, slots,
                                               positions, bases, scale, workspace, workspace_bytes));
  // CPU: literally the unfused sequence (split, rotary_embedding, attention_decode), so the
  // fused CUDA kernel has the unfused ops as its oracle.
  return dispatch_activation(dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    const int64_t D = cache.head_dim, kv = cache.kv_heads, group = q_heads / kv;
    Scratch<T> q, k, v;
    if (!q.allocate(batch * q_heads * D) || !k.allocate(batch * kv * D) || !v.allocate(batch * kv * D))
      return invalid_value("attention_decode_qkv: cannot allocate CPU scratch");
    const T* src = static_cast<const T*>(qkv);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < kv; ++h) {
        const T* rows = src + (b * kv + h) * (group + 2) * D;
        std::memcpy(q.data() + (b * q_heads + h * group) * D, rows, group * D * sizeof(T));
        std::memcpy(k.data() + (b * kv + h) * D, rows + group * D, D * sizeof(T));
        std::memcpy(v.data() + (b * kv + h) * D, rows + (group + 1) * D, D * sizeof(T));
      }
    }
    FIL_RETURN_IF_ERROR(rotary_embedding(ctx, dtype, q.data(), k.data(), positions, DType::kInt32, bases,
                                         0.0f, batch, q_heads, kv, D));
    return decode_cpu(static_cast<T*>(out), q.data(), k.data(), v.data(), cache, batch, q_heads, slots,
                      positions, scale);
  });
}

}  // namespace fastinternlm
