"""The kernel ops on torch tensors (CPU or one CUDA device; CUDA work on torch's current
stream). One module per kernel family, named like its C++ files."""

from .rms_norm import add_rms_norm, rms_norm

INT4_FORMAT_VERSION = 1

__all__ = ["INT4_FORMAT_VERSION", "add_rms_norm", "rms_norm"]
