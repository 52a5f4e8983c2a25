// The CUDA implementations behind the public API. Each is called by its op's .cpp after
// that file has validated every argument; they only launch (on ctx's device and stream)
// and report launch errors.
#pragma once

#include "fastinternlm/fastinternlm.h"

namespace fastinternlm {
namespace cuda {

Status rms_norm(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
                const void* weight, int64_t rows, int64_t hidden, float eps);

Status rotary_embedding(const Context& ctx, DType dtype, void* q, void* k, const void* positions,
                        DType positions_dtype, const float* bases, float base, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t head_dim);

Status silu_and_mul(const Context& ctx, DType dtype, void* out, const void* x, int64_t rows,
                    int64_t ffn);

Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale);

int64_t attention_decode_workspace_bytes(int64_t batch, int64_t q_heads, const KVCache& cache);

Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes);

Status attention_decode_qkv(const Context& ctx, DType dtype, void* out, const void* qkv,
                            const KVCache& cache, int64_t batch, int64_t q_heads,
                            const int32_t* slots, const int32_t* positions, const float* bases,
                            float scale, void* workspace, int64_t workspace_bytes);

// common.h's PDL switch, whose state lives with the launch helper (cuda_common.cuh).
void set_programmatic_launch(bool enabled);
bool programmatic_launch();

// Benchmarking hook (attention.h): the decode split sizing.
Status set_decode_split_tuning(int64_t min_chunk, int64_t target_blocks);

Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets);

Status dequantize_int4(const Context& ctx, DType dtype, void* out, const Int4Weight& w);

Status int4_gemm(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                 const Int4Weight& w);

// The M > 16 (prefill) path of int4_gemm, on tensor cores (int4_gemm_large_m.cu); m > 16.
Status int4_gemm_large_m(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                         const Int4Weight& w);

// The M <= 16 (decode) path of int4_gemm (int4_gemm_small_m.cu); m in [1, 16].
Status int4_gemm_small_m(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                         const Int4Weight& w);

}  // namespace cuda
}  // namespace fastinternlm
