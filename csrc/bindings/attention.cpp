#include "bind_util.h"

namespace fastinternlm {
namespace bindings {

namespace {

// format: KVCacheFormat's value (0 activation dtype, 1 int8, 2 int4); k_params, v_params:
// the quantized formats' (scale, zero) arrays, 0 otherwise. The C++ entry point checks them.
KVCache make_cache(uintptr_t k_cache, uintptr_t v_cache, int64_t num_slots, int64_t kv_heads,
                   int64_t max_seq, int64_t head_dim, int format = 0, uintptr_t k_params = 0,
                   uintptr_t v_params = 0) {
  KVCache cache;
  cache.format = static_cast<KVCacheFormat>(format);
  cache.k_params = as_ptr(k_params);
  cache.v_params = as_ptr(v_params);
  cache.k = as_ptr(k_cache);
  cache.v = as_ptr(v_cache);
  cache.num_slots = num_slots;
  cache.kv_heads = kv_heads;
  cache.max_seq = max_seq;
  cache.head_dim = head_dim;
  return cache;
}

}  // namespace

void register_attention(py::module_& m) {
  m.def(
      "attention_prefill",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t q, uintptr_t k,
         uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, int64_t num_slots, int64_t kv_heads,
         int64_t max_seq, int64_t head_dim, int64_t tokens, int64_t q_heads, int64_t slot,
         int64_t start, float scale, int format, uintptr_t k_params, uintptr_t v_params) {
        throw_if_error(fastinternlm::attention_prefill(
            make_context(device, index, stream), as_dtype(dtype), as_ptr(out), as_ptr(q), as_ptr(k),
            as_ptr(v), make_cache(k_cache, v_cache, num_slots, kv_heads, max_seq, head_dim, format, k_params, v_params), tokens,
            q_heads, slot, start, scale));
      },
      release_gil());
  m.def(
      "attention_decode_workspace_bytes",
      [](int device, int index, int64_t batch, int64_t q_heads, int64_t num_slots,
         int64_t kv_heads, int64_t max_seq, int64_t head_dim) {
        return fastinternlm::attention_decode_workspace_bytes(
            make_context(device, index, 0), batch, q_heads,
            make_cache(0, 0, num_slots, kv_heads, max_seq, head_dim));
      });
  m.def(
      "attention_decode",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t q, uintptr_t k,
         uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, int64_t num_slots, int64_t kv_heads,
         int64_t max_seq, int64_t head_dim, int64_t batch, int64_t q_heads, uintptr_t slots,
         uintptr_t positions, float scale, uintptr_t workspace, int64_t workspace_bytes, int format,
         uintptr_t k_params, uintptr_t v_params) {
        throw_if_error(fastinternlm::attention_decode(
            make_context(device, index, stream), as_dtype(dtype), as_ptr(out), as_ptr(q), as_ptr(k),
            as_ptr(v), make_cache(k_cache, v_cache, num_slots, kv_heads, max_seq, head_dim, format, k_params, v_params), batch,
            q_heads, as_ptr<const int32_t>(slots), as_ptr<const int32_t>(positions), scale,
            as_ptr(workspace), workspace_bytes));
      },
      release_gil());
  m.attr("decode_split_defaults") = py::make_tuple(kDecodeMinChunk, kDecodeTargetBlocks);
  m.def("_set_decode_split_tuning", [](int64_t min_chunk, int64_t target_blocks) {
    throw_if_error(fastinternlm::set_decode_split_tuning(min_chunk, target_blocks));
  });
  m.def(
      "attention_decode_qkv",
      [](int device, int index, uintptr_t stream, int dtype, uintptr_t out, uintptr_t qkv,
         uintptr_t k_cache, uintptr_t v_cache, int64_t num_slots, int64_t kv_heads, int64_t max_seq,
         int64_t head_dim, int64_t batch, int64_t q_heads, uintptr_t slots, uintptr_t positions,
         uintptr_t bases, float scale, uintptr_t workspace, int64_t workspace_bytes, int format,
         uintptr_t k_params, uintptr_t v_params) {
        throw_if_error(fastinternlm::attention_decode_qkv(
            make_context(device, index, stream), as_dtype(dtype), as_ptr(out), as_ptr(qkv),
            make_cache(k_cache, v_cache, num_slots, kv_heads, max_seq, head_dim, format, k_params, v_params), batch, q_heads,
            as_ptr<const int32_t>(slots), as_ptr<const int32_t>(positions), as_ptr<const float>(bases),
            scale, as_ptr(workspace), workspace_bytes));
      },
      release_gil());
}

}  // namespace bindings
}  // namespace fastinternlm
