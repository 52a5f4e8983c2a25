"""The kernel ops on torch tensors (CPU or one CUDA device; CUDA work on torch's current
stream). One module per kernel family, named like its C++ files."""

from .int4_gemm import INT4_FORMAT_VERSION, Int4Weight, dequantize_int4, int4_gemm, quantize_int4
from .rms_norm import add_rms_norm, rms_norm

__all__ = ["INT4_FORMAT_VERSION", "Int4Weight", "add_rms_norm", "dequantize_int4", "int4_gemm",
           "quantize_int4", "rms_norm"]
