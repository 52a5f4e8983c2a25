"""The kernel ops on torch tensors (CPU or one CUDA device; CUDA work on torch's current
stream). One module per kernel family, named like its C++ files."""

from .attention import (
    KV_QUANT_FORMATS,
    kv_params_dtype,
    kv_quant_group,
    QuantizedKV,
    attention_decode,
    attention_decode_qkv,
    attention_decode_workspace_bytes,
    attention_prefill,
    empty_kv_cache,
)
from .int4_gemm import INT4_FORMAT_VERSION, Int4Weight, dequantize_int4, int4_gemm, quantize_int4
from .rms_norm import add_rms_norm, rms_norm
from .rotary import ntk_base, ntk_bases, rotary_embedding
from .silu_and_mul import silu_and_mul

__all__ = [
    "INT4_FORMAT_VERSION",
    "Int4Weight",
    "KV_QUANT_FORMATS",
    "kv_params_dtype",
    "kv_quant_group",
    "QuantizedKV",
    "add_rms_norm",
    "attention_decode",
    "attention_decode_qkv",
    "attention_decode_workspace_bytes",
    "attention_prefill",
    "dequantize_int4",
    "empty_kv_cache",
    "int4_gemm",
    "ntk_base",
    "ntk_bases",
    "quantize_int4",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]
