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

Only the model's shape and behaviour live here. A pre-quantized checkpoint's
`quantization_config` is parsed by weights/quant_config.py (which fills
`ModelConfig.quantization`), the tensor names of each architecture are in weights/arch.py,
and reading a checkpoint directory's config files is weights/hf.py's `load_config`. This
module needs neither the compiled extension nor any other module of the package.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch

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
    # A pre-quantized 4-bit checkpoint's format (weights.quant_config.QuantizationConfig),
    # set by weights.hf.load_config; None for dense checkpoints.
    quantization: Optional[Any] = None

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
    def ntk_args(self) -> Tuple[float, Optional[float], int, int]:
        """(theta, dynamic-NTK factor or None, max_position_embeddings, head_dim): the
        rotary base's inputs, as ops.ntk_bases takes them."""
        factor = self.rope_scaling.factor if self.rope_scaling is not None else None
        return self.rope_theta, factor, self.max_position_embeddings, self.head_dim

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused wqkv: (H + 2 * KV) * D."""
        return self.q_size + 2 * self.kv_size

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any], generation_config: Optional[Mapping[str, Any]] = None
    ) -> "ModelConfig":
        """The model described by a config.json dict (and generation_config.json's). Its
        quantization_config is not read here (see weights.quant_config)."""
        return _parse(config, generation_config)


def read_json(file: str, error: Type[Exception] = None) -> Dict[str, Any]:
    """The JSON object in `file`; anything else (unreadable bytes, invalid JSON, a list)
    raises `error` (ConfigError by default) naming the file."""
    error = error or ConfigError
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{file} must hold a JSON object, got {type(value).__name__}")
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
            f"{sorted(_MODEL_TYPES)}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"config.json: architectures must be a list of names, got {architectures!r}")
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"config.json: architectures {architectures} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (exactly one)"
        )
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
        raise ConfigError(f"config.json: rope_scaling needs one kind in 'type' or 'rope_type', got {value!r}")
    kind = kinds.pop()
    if kind == "default":
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(
            f"config.json: rope_scaling type {kind!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_SCALING)} or null); linear position interpolation does not fit "
            f"the integer-position rotary kernel"
        )
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
            f"config.json: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    if architecture == LLAMA and config.get("head_dim") is not None:
        head_dim = _int(config, "head_dim")
        derived = f"head_dim {head_dim}"
    else:
        if hidden_size % num_heads != 0:
            raise ConfigError(
                f"config.json: hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_heads})"
            )
        head_dim = hidden_size // num_heads
        derived = f"head_dim {head_dim} (hidden_size {hidden_size} / num_attention_heads {num_heads})"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(
            f"config.json: {derived} is not supported; the attention kernels support head_dim "
            f"{' and '.join(map(str, SUPPORTED_HEAD_DIMS))}"
        )

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
        eos_token_ids = _token_ids(generation["eos_token_id"], "eos_token_id", "generation_config.json", vocab_size)
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
    )
    return parsed


__all__ = [
    "INTERNLM2",
    "LLAMA",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_HEAD_DIMS",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "read_json",
]
