"""A pre-quantized checkpoint's `quantization_config` (in config.json, or AutoGPTQ's
quantize_config.json beside it), validated before any tensor is read.

Accepted: our own ("fastinternlm-int4", written by `fastinternlm quantize`), AWQ "gemm"
(lmdeploy auto_awq, AutoAWQ) and GPTQ (AutoGPTQ / GPTQModel, formats "gptq" and
"gptq_v2"), 4 bits. Everything else (other bit widths, AWQ gemv / marlin layouts,
symmetric AWQ without zero points, group sizes that are not a multiple of 32) is refused
here with a ConfigError naming the field. See int4_import.py for the tensor layouts and
what is exact, arch.py for the tensors each format stores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from ..config import ConfigError, ModelConfig
from ..ops.int4_gemm import GROUP_SIZES, INT4_FORMAT_VERSION
from .arch import FASTINTERNLM_INT4, QUANT_METHODS, Linear, linears

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """A pre-quantized checkpoint's quantization_config, validated."""

    method: str  # one of QUANT_METHODS
    group_size: Optional[int]  # input channels per group; None: one group per row (-1)
    quant_head: bool = False  # the output head is quantized too
    zero_offset: int = 0  # added to stored zero points (GPTQ's "gptq" format stores z - 1)
    desc_act: bool = False  # GPTQ act-order: g_idx may permute the input channels
    dense_modules: Tuple[str, ...] = ()  # AWQ modules_to_not_convert: module names containing one stay dense
    quantized_modules: Optional[Tuple[str, ...]] = None  # GPTQ modules_in_block_to_quantize, flattened

    def group(self, k: int) -> int:
        """The group size of a linear with k input channels."""
        return k if self.group_size is None else self.group_size

    def quantizes(self, linear: Linear) -> bool:
        if linear.head:
            return self.quant_head
        if any(m in linear.name for m in self.dense_modules):
            return False
        if self.quantized_modules is not None:
            return any(linear.name.endswith("." + m) for m in self.quantized_modules)
        return True


def _q_value(q: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = q.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: quantization_config.{key} is missing")
        return default
    return value


def _q_bool(q: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _q_value(q, key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: quantization_config.{key} must be true or false, got {value!r}")
    return value


def _q_bits(q: Mapping[str, Any], method: str) -> None:
    bits = _q_value(q, "bits", 4)
    if bits != 4 or isinstance(bits, bool):
        raise ConfigError(
            f"config.json: quantization_config.bits must be 4 (the int4 GEMM's width) for {method}, got {bits!r}"
        )


def _q_group(q: Mapping[str, Any], default: int) -> Optional[int]:
    """-1 (one group per output row) -> None; otherwise a multiple of 32, the finest group
    our format holds, so each source group is a whole number of our groups."""
    g = _q_value(q, "group_size", default)
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
        raise ConfigError(f"config.json: quantization_config.group_size must be a positive integer or -1, got {g!r}")
    if g == -1:
        return None
    if g % min(GROUP_SIZES):
        raise ConfigError(
            f"config.json: quantization_config.group_size {g} is not supported: it must be a "
            f"multiple of {min(GROUP_SIZES)} (or -1) so that it splits into the int4 format's "
            f"groups of {', '.join(map(str, GROUP_SIZES))}"
        )
    return g


def _q_names(q: Mapping[str, Any], key: str, nested: bool) -> Optional[Tuple[str, ...]]:
    value = q.get(key)
    if value is None:
        return None
    items = value
    if nested and isinstance(value, list) and all(isinstance(v, list) for v in value):
        items = [name for block in value for name in block]
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"config.json: quantization_config.{key} must be a list of module names, got {value!r}")
    return tuple(items)


def parse_quantization(value: Any) -> Optional[QuantizationConfig]:
    """QuantizationConfig of a quantization_config value (None: a dense checkpoint)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.json: quantization_config must be an object or null, got {value!r}")
    method = value.get("quant_method")
    if method == FASTINTERNLM_INT4:
        version = _q_value(value, "format_version")
        if version != INT4_FORMAT_VERSION or isinstance(version, bool):
            raise ConfigError(
                f"config.json: quantization_config.format_version must be {INT4_FORMAT_VERSION} "
                f"(the packed layout this build reads), got {version!r}"
            )
        g = _q_value(value, "group_size")
        if g not in GROUP_SIZES or isinstance(g, bool):
            raise ConfigError(f"config.json: quantization_config.group_size must be one of {GROUP_SIZES}, got {g!r}")
        return QuantizationConfig(method, g, quant_head=_q_bool(value, "quant_head", False))
    if method == "awq":
        _q_bits(value, method)
        version = str(_q_value(value, "version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(
                f"config.json: quantization_config.version {version!r} is not supported; AWQ "
                f"checkpoints load in the 'gemm' layout only"
            )
        if not _q_bool(value, "zero_point", True):
            raise ConfigError(
                "config.json: quantization_config.zero_point=false (symmetric AWQ without qzeros) "
                "is not supported; AWQ checkpoints load with zero points only"
            )
        backend = value.get("backend")
        if backend not in (None, "autoawq"):
            raise ConfigError(
                f"config.json: quantization_config.backend {backend!r} is not supported (its packing "
                f"differs); AutoAWQ's ('autoawq') is"
            )
        return QuantizationConfig(
            method, _q_group(value, 128), dense_modules=_q_names(value, "modules_to_not_convert", False) or ()
        )
    if method == "gptq":
        _q_bits(value, method)
        fmt = value.get("checkpoint_format", value.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(
                f"config.json: quantization_config.checkpoint_format {fmt!r} is not supported; GPTQ "
                f"checkpoints load in the 'gptq' and 'gptq_v2' formats"
            )
        pack = value.get("pack_dtype", "int32")
        if pack not in ("int32", "torch.int32"):
            raise ConfigError(f"config.json: quantization_config.pack_dtype must be int32, got {pack!r}")
        return QuantizationConfig(
            method,
            _q_group(value, 128),
            quant_head=_q_bool(value, "lm_head", False),
            zero_offset=1 if fmt == "gptq" else 0,
            desc_act=_q_bool(value, "desc_act", False),
            quantized_modules=_q_names(value, "modules_in_block_to_quantize", True),
        )
    raise ConfigError(
        f"config.json: quantization_config.quant_method {method!r} is not supported; supported: "
        f"{', '.join(QUANT_METHODS)} (4-bit)"
    )


def _check_quantized_sizes(config: ModelConfig) -> None:
    q = config.quantization
    for lin in linears(config):
        if not q.quantizes(lin):
            continue
        g = q.group(lin.k)
        if lin.k % g:
            raise ConfigError(
                f"config.json: quantization_config.group_size {g} does not divide {lin.k_source} "
                f"({lin.k}), the input size of {lin.name}"
            )
        if lin.k % min(GROUP_SIZES):
            raise ConfigError(
                f"config.json: {lin.k_source} ({lin.k}), the input size of {lin.name}, must be a "
                f"multiple of {min(GROUP_SIZES)} for the int4 format"
            )
        if q.method != FASTINTERNLM_INT4 and lin.n % 8:
            raise ConfigError(
                f"config.json: {lin.name} has {lin.n} outputs, which {q.method} cannot pack (a multiple of 8 is needed)"
            )


def with_quantization(config: ModelConfig, value: Any) -> ModelConfig:
    """`config` with its quantization_config parsed in, and every quantized linear's input
    size checked against the group size (ConfigError naming the config field)."""
    q = parse_quantization(value)
    if q is None:
        return config
    config = dataclasses.replace(config, quantization=q)
    _check_quantized_sizes(config)
    return config


__all__ = ["QuantizationConfig", "parse_quantization", "with_quantization"]
