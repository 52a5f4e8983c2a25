"""Model configuration: one dataclass parsed from a Hugging Face `config.json` (plus
`generation_config.json` when present) for the two supported architectures.

- `InternLM2ForCausalLM` (model_type internlm2): fused `wqkv` in the grouped layout;
  head_dim is always hidden_size / num_attention_heads (the remote code has no head_dim).
- `LlamaForCausalLM` (model_type llama): separate q/k/v projections, optional tied
  embeddings, an optional explicit `head_dim`.

Everything is validated here, once, before any weight is touched; each error names the
config field, what was expected and what was found. Optional fields take the defaults
Hugging Face applies when they are absent (so a checkpoint means the same thing here as
in transformers); required fields have no default.

Decisions:
- rope_scaling: null/absent or `default` means plain RoPE; `dynamic` (dynamic NTK, the
  InternLM2 family) is supported with factor >= 1. `linear` and everything else (yarn,
  llama3, longrope, ...) are refused: the rotary kernel takes integer positions and a
  per-token base, which dynamic NTK needs and linear position interpolation does not fit.
- head_dim must be 64 or 128: the attention kernels are compiled for those two only.
- quantization_config (or AutoGPTQ's quantize_config.json next to config.json) names a
  4-bit checkpoint the loader imports into the int4 GEMM's format: our own
  ("fastinternlm-int4", written by `fastinternlm quantize`), AWQ "gemm" (lmdeploy
  auto_awq, AutoAWQ) or GPTQ (AutoGPTQ / GPTQModel, formats "gptq" and "gptq_v2"), 4 bits.
  Everything else (other bit widths, AWQ gemv / marlin layouts, symmetric AWQ without
  zero points, group sizes that are not a multiple of 32) is refused here, before any
  tensor is read. See int4_import.py for the tensor layouts and what is exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .ops.int4_gemm import GROUP_SIZES, INT4_FORMAT_VERSION

INTERNLM2 = "InternLM2ForCausalLM"
LLAMA = "LlamaForCausalLM"
SUPPORTED_ARCHITECTURES = (INTERNLM2, LLAMA)
_MODEL_TYPES = {"internlm2": INTERNLM2, "llama": LLAMA}

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_ROPE_SCALING = ("dynamic",)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConfigError(ValueError):
    """config.json (or generation_config.json) describes something this runtime cannot run
    or that cannot be a valid model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    type: str  # "dynamic"
    factor: float


QUANT_METHODS = ("fastinternlm-int4", "awq", "gptq")
# Our own int4 checkpoints, as `fastinternlm quantize` writes them.
FASTINTERNLM_INT4 = "fastinternlm-int4"


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of the checkpoint: its tensors are `name + ".weight"` (dense) or
    `name + "." + part` (quantized)."""
    name: str       # module name in the checkpoint's naming, e.g. "model.layers.0.attention.wqkv"
    n: int          # output features (rows of W)
    k: int          # input features (columns of W)
    k_source: str   # the config field k comes from, for messages
    head: bool = False


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """A pre-quantized checkpoint's quantization_config, validated."""
    method: str                        # one of QUANT_METHODS
    group_size: Optional[int]          # input channels per group; None: one group per row (-1)
    quant_head: bool = False           # the output head is quantized too
    zero_offset: int = 0               # added to stored zero points (GPTQ's "gptq" format stores z - 1)
    desc_act: bool = False             # GPTQ act-order: g_idx may permute the input channels
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


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor must look like."""
    shape: Tuple[int, ...]
    dtypes: Tuple[str, ...] = ()  # exact dtypes allowed ("int32", ...); () means any floating dtype
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # INTERNLM2 or LLAMA
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[RopeScaling]
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: Optional[int]
    eos_token_ids: Tuple[int, ...]  # generation_config.json's when present, else config.json's
    torch_dtype: Optional[torch.dtype]  # the checkpoint's declared dtype, None if not declared
    quantization: Optional[QuantizationConfig] = None  # a pre-quantized 4-bit checkpoint's format

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G in the wqkv layout)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused wqkv: (H + 2 * KV) * D."""
        return self.q_size + 2 * self.kv_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any],
                  generation_config: Optional[Mapping[str, Any]] = None) -> "ModelConfig":
        return _parse(config, generation_config)

    @classmethod
    def from_pretrained(cls, path: "os.PathLike[str] | str") -> "ModelConfig":
        return load_config(path)


def load_config(path: "os.PathLike[str] | str") -> ModelConfig:
    """Reads `path/config.json` and, when present, `path/generation_config.json`."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path}")
    config = _read_json(config_file)
    generation_file = os.path.join(path, "generation_config.json")
    generation = _read_json(generation_file) if os.path.isfile(generation_file) else None
    # AutoGPTQ (and GPTQModel) write their settings to quantize_config.json rather than
    # into config.json; config.json's quantization_config wins when both exist.
    gptq_file = os.path.join(path, "quantize_config.json")
    if config.get("quantization_config") is None and os.path.isfile(gptq_file):
        quantize_config = _read_json(gptq_file)
        config = {**config, "quantization_config": {"quant_method": "gptq", **quantize_config}}
    return _parse(config, generation)


def _read_json(file: str) -> Dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


_MISSING = object()


def _int(config: Mapping[str, Any], key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
    value = config.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: {key} is missing (an integer >= {minimum} is required)")
        return default
    # JSON true/false arrive as bool, which Python counts as int.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"config.json: {key} must be >= {minimum}, got {value}")
    return value


def _positive_float(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {key} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.json: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _architecture(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures")
    if architectures is None:
        model_type = config.get("model_type")
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        raise ConfigError(
            f"config.json: architectures is missing and model_type {model_type!r} is not one of "
            f"{sorted(_MODEL_TYPES)}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"config.json: architectures must be a list of names, got {architectures!r}")
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"config.json: architectures {architectures} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (exactly one)")
    return architectures[0]


def _rope_scaling(config: Mapping[str, Any]) -> Optional[RopeScaling]:
    value = config.get("rope_scaling")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object or null, got {value!r}")
    # Older configs spell the kind "type", newer Llama configs "rope_type"; when both are
    # there they must agree.
    kinds = {value[k] for k in ("type", "rope_type") if k in value}
    if len(kinds) != 1:
        raise ConfigError(
            f"config.json: rope_scaling needs one kind in 'type' or 'rope_type', got {value!r}")
    kind = kinds.pop()
    if kind == "default":
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(
            f"config.json: rope_scaling type {kind!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_SCALING)} or null); linear position interpolation does not fit "
            f"the integer-position rotary kernel")
    factor = value.get("factor", _MISSING)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        shown = "missing" if factor is _MISSING else repr(factor)
        raise ConfigError(f"config.json: rope_scaling.factor must be a number >= 1, got {shown}")
    return RopeScaling(type=kind, factor=float(factor))


def _token_ids(value: Any, key: str, source: str, vocab_size: int) -> Tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ConfigError(f"{source}: {key} must be token ids in [0, {vocab_size}), got {value!r}")
    return tuple(ids)


def _dtype(config: Mapping[str, Any]) -> Optional[torch.dtype]:
    # transformers >= 4.56 writes "dtype", older versions "torch_dtype".
    key = "torch_dtype" if "torch_dtype" in config else "dtype"
    value = config.get(key)
    if value is None:
        return None
    if value not in _DTYPES:
        raise ConfigError(f"config.json: {key} must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _parse(config: Mapping[str, Any], generation: Optional[Mapping[str, Any]]) -> ModelConfig:
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    architecture = _architecture(config)

    vocab_size = _int(config, "vocab_size")
    hidden_size = _int(config, "hidden_size")
    num_layers = _int(config, "num_hidden_layers")
    num_heads = _int(config, "num_attention_heads")
    num_kv_heads = _int(config, "num_key_value_heads", num_heads)
    intermediate_size = _int(config, "intermediate_size")
    max_position_embeddings = _int(config, "max_position_embeddings", 2048)

    if num_heads % num_kv_heads != 0:
        raise ConfigError(
            f"config.json: num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})")
    if architecture == LLAMA and config.get("head_dim") is not None:
        head_dim = _int(config, "head_dim")
        derived = f"head_dim {head_dim}"
    else:
        if hidden_size % num_heads != 0:
            raise ConfigError(
                f"config.json: hidden_size ({hidden_size}) must be a multiple of "
                f"num_attention_heads ({num_heads})")
        head_dim = hidden_size // num_heads
        derived = f"head_dim {head_dim} (hidden_size {hidden_size} / num_attention_heads {num_heads})"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(
            f"config.json: {derived} is not supported; the attention kernels support head_dim "
            f"{' and '.join(map(str, SUPPORTED_HEAD_DIMS))}")

    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"config.json: hidden_act must be 'silu', got {hidden_act!r}")
    bias_keys = ("bias",) if architecture == INTERNLM2 else ("attention_bias", "mlp_bias")
    for key in bias_keys:
        if _bool(config, key, False):
            raise ConfigError(f"config.json: {key}=true is not supported (linear layers without bias only)")

    rms_norm_eps = _positive_float(config, "rms_norm_eps", 1e-6)
    rope_theta = _positive_float(config, "rope_theta", 10000.0)
    rope_scaling = _rope_scaling(config)
    tie_word_embeddings = _bool(config, "tie_word_embeddings", False)

    bos = config.get("bos_token_id", 1)
    bos_token_id = None if bos is None else _token_ids(bos, "bos_token_id", "config.json", vocab_size)[0]
    if generation is not None and generation.get("eos_token_id") is not None:
        eos_token_ids = _token_ids(generation["eos_token_id"], "eos_token_id", "generation_config.json",
                                   vocab_size)
    else:
        eos = config.get("eos_token_id", 2)
        eos_token_ids = () if eos is None else _token_ids(eos, "eos_token_id", "config.json", vocab_size)

    parsed = ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_ids=eos_token_ids,
        torch_dtype=_dtype(config),
        quantization=_quantization(config.get("quantization_config")),
    )
    if parsed.quantization is not None:
        _check_quantized_sizes(parsed)
    return parsed


# ---- quantization_config ---------------------------------------------------------------

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
        raise ConfigError(f"config.json: quantization_config.bits must be 4 (the int4 GEMM's width) for "
                          f"{method}, got {bits!r}")


def _q_group(q: Mapping[str, Any], default: int) -> Optional[int]:
    """-1 (one group per output row) -> None; otherwise a multiple of 32, the finest group
    our format holds, so each source group is a whole number of our groups."""
    g = _q_value(q, "group_size", default)
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
        raise ConfigError(f"config.json: quantization_config.group_size must be a positive integer or -1, got {g!r}")
    if g == -1:
        return None
    if g % min(GROUP_SIZES):
        raise ConfigError(f"config.json: quantization_config.group_size {g} is not supported: it must be a "
                          f"multiple of {min(GROUP_SIZES)} (or -1) so that it splits into the int4 format's "
                          f"groups of {', '.join(map(str, GROUP_SIZES))}")
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


def _quantization(value: Any) -> Optional[QuantizationConfig]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.json: quantization_config must be an object or null, got {value!r}")
    method = value.get("quant_method")
    if method == FASTINTERNLM_INT4:
        version = _q_value(value, "format_version")
        if version != INT4_FORMAT_VERSION or isinstance(version, bool):
            raise ConfigError(f"config.json: quantization_config.format_version must be {INT4_FORMAT_VERSION} "
                              f"(the packed layout this build reads), got {version!r}")
        g = _q_value(value, "group_size")
        if g not in GROUP_SIZES or isinstance(g, bool):
            raise ConfigError(f"config.json: quantization_config.group_size must be one of {GROUP_SIZES}, got {g!r}")
        return QuantizationConfig(method, g, quant_head=_q_bool(value, "quant_head", False))
    if method == "awq":
        _q_bits(value, method)
        version = str(_q_value(value, "version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"config.json: quantization_config.version {version!r} is not supported; AWQ "
                              f"checkpoints load in the 'gemm' layout only")
        if not _q_bool(value, "zero_point", True):
            raise ConfigError("config.json: quantization_config.zero_point=false (symmetric AWQ without qzeros) "
                              "is not supported; AWQ checkpoints load with zero points only")
        backend = value.get("backend")
        if backend not in (None, "autoawq"):
            raise ConfigError(f"config.json: quantization_config.backend {backend!r} is not supported (its packing "
                              f"differs); AutoAWQ's ('autoawq') is")
        return QuantizationConfig(method, _q_group(value, 128),
                                  dense_modules=_q_names(value, "modules_to_not_convert", False) or ())
    if method == "gptq":
        _q_bits(value, method)
        fmt = value.get("checkpoint_format", value.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"config.json: quantization_config.checkpoint_format {fmt!r} is not supported; GPTQ "
                              f"checkpoints load in the 'gptq' and 'gptq_v2' formats")
        pack = value.get("pack_dtype", "int32")
        if pack not in ("int32", "torch.int32"):
            raise ConfigError(f"config.json: quantization_config.pack_dtype must be int32, got {pack!r}")
        return QuantizationConfig(method, _q_group(value, 128), quant_head=_q_bool(value, "lm_head", False),
                                  zero_offset=1 if fmt == "gptq" else 0, desc_act=_q_bool(value, "desc_act", False),
                                  quantized_modules=_q_names(value, "modules_in_block_to_quantize", True))
    raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not supported; supported: "
                      f"{', '.join(QUANT_METHODS)} (4-bit)")


def _check_quantized_sizes(config: ModelConfig) -> None:
    q = config.quantization
    for lin in linears(config):
        if not q.quantizes(lin):
            continue
        g = q.group(lin.k)
        if lin.k % g:
            raise ConfigError(f"config.json: quantization_config.group_size {g} does not divide {lin.k_source} "
                              f"({lin.k}), the input size of {lin.name}")
        if lin.k % min(GROUP_SIZES):
            raise ConfigError(f"config.json: {lin.k_source} ({lin.k}), the input size of {lin.name}, must be a "
                              f"multiple of {min(GROUP_SIZES)} for the int4 format")
        if q.method != FASTINTERNLM_INT4 and lin.n % 8:
            raise ConfigError(f"config.json: {lin.name} has {lin.n} outputs, which {q.method} cannot pack "
                              f"(a multiple of 8 is needed)")


def check_quantizable(config: ModelConfig, group_size: int, quant_head: bool) -> None:
    """Raises ValueError unless every linear that int4 quantization at load (or
    `fastinternlm quantize`) would quantize has an input size divisible by group_size."""
    bad: Dict[str, str] = {}
    for lin in linears(config):
        if (quant_head or not lin.head) and lin.k % group_size:
            bad.setdefault(f"{lin.k_source} = {lin.k}", lin.name)
    if bad:
        listed = "; ".join(f"{size} (the input size of {name} and alike)" for size, name in bad.items())
        raise ValueError(f"int4 quantization with group_size={group_size} needs each quantized linear's input "
                         f"size to be a multiple of {group_size}, but {listed}; choose a group_size among "
                         f"{GROUP_SIZES} that divides it")


def linears(config: ModelConfig) -> List[Linear]:
    """Every linear layer in the checkpoint's naming: the decoder layers' (in checkpoint
    order), then the output head (listed even when tied to the embedding)."""
    h, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    out = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        if config.architecture == INTERNLM2:
            out += [Linear(p + "attention.wqkv", config.qkv_rows, h, "hidden_size"),
                    Linear(p + "attention.wo", h, q, "num_attention_heads * head_dim"),
                    Linear(p + "feed_forward.w1", f, h, "hidden_size"),
                    Linear(p + "feed_forward.w3", f, h, "hidden_size"),
                    Linear(p + "feed_forward.w2", h, f, "intermediate_size")]
        else:
            out += [Linear(p + "self_attn.q_proj", q, h, "hidden_size"),
                    Linear(p + "self_attn.k_proj", kv, h, "hidden_size"),
                    Linear(p + "self_attn.v_proj", kv, h, "hidden_size"),
                    Linear(p + "self_attn.o_proj", h, q, "num_attention_heads * head_dim"),
                    Linear(p + "mlp.gate_proj", f, h, "hidden_size"),
                    Linear(p + "mlp.up_proj", f, h, "hidden_size"),
                    Linear(p + "mlp.down_proj", h, f, "intermediate_size")]
    out.append(Linear("output" if config.architecture == INTERNLM2 else "lm_head", v, h, "hidden_size", head=True))
    return out


def int4_parts(method: str, n: int, k: int, group: int) -> Dict[str, TensorSpec]:
    """{part: spec} of one quantized linear W [n, k] with `group` input channels per group."""
    if method == FASTINTERNLM_INT4:
        return {"qweight": TensorSpec((n, k // 8), ("int32",)), "scales": TensorSpec((n, k // group), ("float16",)),
                "offsets": TensorSpec((n, k // group), ("float16",)), "int4_format": TensorSpec((4,), ("int64",))}
    if method == "awq":
        return {"qweight": TensorSpec((k, n // 8), ("int32",)), "qzeros": TensorSpec((k // group, n // 8), ("int32",)),
                "scales": TensorSpec((k // group, n), ("float16",))}
    if method == "gptq":
        return {"qweight": TensorSpec((k // 8, n), ("int32",)), "qzeros": TensorSpec((k // group, n // 8), ("int32",)),
                "scales": TensorSpec((k // group, n), ("float16",)),
                "g_idx": TensorSpec((k,), ("int32", "int64"), optional=True)}
    raise ValueError(f"unknown quantization method {method!r}")


def checkpoint_tensors(config: ModelConfig) -> Dict[str, TensorSpec]:
    """{tensor name: spec} of every tensor a checkpoint of `config` holds in its own
    naming: dense tensors (any floating dtype), and for a quantized checkpoint each
    quantized linear's parts (exact dtypes) in place of its weight."""
    specs = {name: TensorSpec(shape) for name, shape in _dense_tensors(config).items()}
    q = config.quantization
    if q is None:
        return specs
    for lin in linears(config):
        if not q.quantizes(lin):
            continue
        specs.pop(lin.name + ".weight", None)
        for part, spec in int4_parts(q.method, lin.n, lin.k, q.group(lin.k)).items():
            specs[f"{lin.name}.{part}"] = spec
    return specs


def expected_tensors(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """{checkpoint tensor name: shape} that a checkpoint of `config` must hold, in the
    checkpoint's own naming (a quantized checkpoint's parts included; optional ones such
    as GPTQ's g_idx left out). A tied output head is not listed (see `ignorable_tensor`)."""
    return {name: spec.shape for name, spec in checkpoint_tensors(config).items() if not spec.optional}


def _dense_tensors(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    h, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    out: Dict[str, Tuple[int, ...]] = {}
    if config.architecture == INTERNLM2:
        out["model.tok_embeddings.weight"] = (v, h)
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            out[p + "attention_norm.weight"] = (h,)
            out[p + "attention.wqkv.weight"] = (config.qkv_rows, h)
            out[p + "attention.wo.weight"] = (h, q)
            out[p + "ffn_norm.weight"] = (h,)
            out[p + "feed_forward.w1.weight"] = (f, h)
            out[p + "feed_forward.w3.weight"] = (f, h)
            out[p + "feed_forward.w2.weight"] = (h, f)
        out["model.norm.weight"] = (h,)
        if not config.tie_word_embeddings:
            out["output.weight"] = (v, h)
    else:
        out["model.embed_tokens.weight"] = (v, h)
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (q, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            out[p + "self_attn.o_proj.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (f, h)
            out[p + "mlp.up_proj.weight"] = (f, h)
            out[p + "mlp.down_proj.weight"] = (h, f)
        out["model.norm.weight"] = (h,)
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = (v, h)
    return out


def ignorable_tensor(config: ModelConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that the runtime skips without reading: cached
    rotary inverse frequencies (recomputed in the kernel), and the output head of a tied
    model (some exporters save the copy; the embedding is used)."""
    if name.endswith(".rotary_emb.inv_freq"):
        return True
    head = "output.weight" if config.architecture == INTERNLM2 else "lm_head.weight"
    return config.tie_word_embeddings and name == head


__all__ = [
    "FASTINTERNLM_INT4",
    "INTERNLM2",
    "LLAMA",
    "QUANT_METHODS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_HEAD_DIMS",
    "ConfigError",
    "Linear",
    "ModelConfig",
    "QuantizationConfig",
    "RopeScaling",
    "TensorSpec",
    "check_quantizable",
    "checkpoint_tensors",
    "expected_tensors",
    "ignorable_tensor",
    "int4_parts",
    "linears",
    "load_config",
]
