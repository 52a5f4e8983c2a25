"""Tensor names, per architecture and per quantized format: the one table every loader
(hf.py, gguf.py) and `fastinternlm quantize` read. To add an architecture's (or a file
format's) naming, add one `Naming` here.

A naming maps each stored tensor to its place in the runtime's one weight form,
`model.Layer` (plus tok_embeddings, norm, output):
- `wqkv` holds q, k and v in InternLM2's grouped row layout (layout.py); a naming that
  stores them apart names the parts "q", "k", "v";
- `w13` holds the gate (w1) rows, then the up (w3) rows: parts "w1" and "w3".
Shapes are in numpy/torch order, [output features, input features] for a matrix, given
as config dimensions ("hidden", "qkv", "q", "kv", "ffn", "vocab").
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from ..config import INTERNLM2, LLAMA, ModelConfig
from ..ops.int4_gemm import GROUP_SIZES

# Our own int4 checkpoints, as `fastinternlm quantize` writes them.
FASTINTERNLM_INT4 = "fastinternlm-int4"
QUANT_METHODS = (FASTINTERNLM_INT4, "awq", "gptq")

# Which config field each dimension comes from, for messages.
_DIM_SOURCE = {"hidden": "hidden_size", "q": "num_attention_heads * head_dim", "ffn": "intermediate_size"}


@dataclasses.dataclass(frozen=True)
class Naming:
    """Where one architecture's tensors are, in one file format's naming."""

    embedding: str  # tensor names without the ".weight" suffix
    norm: str
    head: str  # the output head; absent from the file when the embedding is tied
    layer: str  # per-layer prefix, with {i} for the layer index
    # Per layer, in the file's order: (module, field in model.Layer or a part of one,
    # rows, columns); norms have columns None.
    layer_tensors: Tuple[Tuple[str, str, str, Optional[str]], ...]

    def name(self, module: str) -> str:
        return module + ".weight"


INTERNLM2_HF = Naming(
    embedding="model.tok_embeddings",
    norm="model.norm",
    head="output",
    layer="model.layers.{i}.",
    layer_tensors=(
        ("attention_norm", "attention_norm", "hidden", None),
        ("attention.wqkv", "wqkv", "qkv", "hidden"),
        ("attention.wo", "wo", "hidden", "q"),
        ("ffn_norm", "ffn_norm", "hidden", None),
        ("feed_forward.w1", "w1", "ffn", "hidden"),
        ("feed_forward.w3", "w3", "ffn", "hidden"),
        ("feed_forward.w2", "w2", "hidden", "ffn"),
    ),
)

LLAMA_HF = Naming(
    embedding="model.embed_tokens",
    norm="model.norm",
    head="lm_head",
    layer="model.layers.{i}.",
    layer_tensors=(
        ("input_layernorm", "attention_norm", "hidden", None),
        ("self_attn.q_proj", "q", "q", "hidden"),
        ("self_attn.k_proj", "k", "kv", "hidden"),
        ("self_attn.v_proj", "v", "kv", "hidden"),
        ("self_attn.o_proj", "wo", "hidden", "q"),
        ("post_attention_layernorm", "ffn_norm", "hidden", None),
        ("mlp.gate_proj", "w1", "ffn", "hidden"),
        ("mlp.up_proj", "w3", "ffn", "hidden"),
        ("mlp.down_proj", "w2", "hidden", "ffn"),
    ),
)

# llama.cpp's names for the llama architecture (GGUF files).
LLAMA_GGUF = Naming(
    embedding="token_embd",
    norm="output_norm",
    head="output",
    layer="blk.{i}.",
    layer_tensors=(
        ("attn_norm", "attention_norm", "hidden", None),
        ("attn_q", "q", "q", "hidden"),
        ("attn_k", "k", "kv", "hidden"),
        ("attn_v", "v", "kv", "hidden"),
        ("attn_output", "wo", "hidden", "q"),
        ("ffn_norm", "ffn_norm", "hidden", None),
        ("ffn_gate", "w1", "ffn", "hidden"),
        ("ffn_up", "w3", "ffn", "hidden"),
        ("ffn_down", "w2", "hidden", "ffn"),
    ),
)

HF_NAMINGS = {INTERNLM2: INTERNLM2_HF, LLAMA: LLAMA_HF}


def hf_naming(config: ModelConfig) -> Naming:
    return HF_NAMINGS[config.architecture]


def _dim(config: ModelConfig, dim: str) -> int:
    return {
        "hidden": config.hidden_size,
        "qkv": config.qkv_rows,
        "q": config.q_size,
        "kv": config.kv_size,
        "ffn": config.intermediate_size,
        "vocab": config.vocab_size,
    }[dim]


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of the checkpoint: its tensors are `name + ".weight"` (dense) or
    `name + "." + part` (quantized)."""

    name: str  # module name in the checkpoint's naming, e.g. "model.layers.0.attention.wqkv"
    n: int  # output features (rows of W)
    k: int  # input features (columns of W)
    k_source: str  # the config field k comes from, for messages
    head: bool = False


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor must look like."""

    shape: Tuple[int, ...]
    dtypes: Tuple[str, ...] = ()  # exact dtypes allowed ("int32", ...); () means any floating dtype
    optional: bool = False


def linears(config: ModelConfig, naming: Optional[Naming] = None) -> List[Linear]:
    """Every linear layer in the file's naming: the decoder layers' (in file order), then
    the output head (listed even when tied to the embedding)."""
    naming = naming or hf_naming(config)
    out = []
    for i in range(config.num_layers):
        p = naming.layer.format(i=i)
        out += [
            Linear(p + module, _dim(config, rows), _dim(config, cols), _DIM_SOURCE[cols])
            for module, _, rows, cols in naming.layer_tensors
            if cols is not None
        ]
    out.append(Linear(naming.head, config.vocab_size, config.hidden_size, "hidden_size", head=True))
    return out


def dense_tensors(config: ModelConfig, naming: Optional[Naming] = None) -> Dict[str, Tuple[int, ...]]:
    """{tensor name: shape} of an unquantized file: embedding, layers, norm, and the head
    unless tied."""
    naming = naming or hf_naming(config)
    h, v = config.hidden_size, config.vocab_size
    out: Dict[str, Tuple[int, ...]] = {naming.name(naming.embedding): (v, h)}
    for i in range(config.num_layers):
        p = naming.layer.format(i=i)
        for module, _, rows, cols in naming.layer_tensors:
            shape = (_dim(config, rows),) if cols is None else (_dim(config, rows), _dim(config, cols))
            out[naming.name(p + module)] = shape
    out[naming.name(naming.norm)] = (h,)
    if not config.tie_word_embeddings:
        out[naming.name(naming.head)] = (v, h)
    return out


def destination(config: ModelConfig, name: str, naming: Optional[Naming] = None) -> Tuple[Optional[int], str]:
    """(layer index or None, field) of a tensor name (".weight" or a quantized part's
    module): fields of model.Layer or their parts ("q"/"k"/"v" of wqkv, "w1"/"w3" of
    w13), or "tok_embeddings", "norm", "output"."""
    naming = naming or hf_naming(config)
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    top = {naming.embedding: "tok_embeddings", naming.norm: "norm", naming.head: "output"}
    if module in top:
        return None, top[module]
    prefix, rest = naming.layer.split("{i}")
    if module.startswith(prefix):
        index, _, suffix = module[len(prefix) :].partition(rest)
        for layer_module, field, _, _ in naming.layer_tensors:
            if suffix == layer_module and index.isdigit():
                return int(index), field
    raise KeyError(f"{name} is not a tensor of {config.architecture}")


def int4_parts(method: str, n: int, k: int, group: int) -> Dict[str, TensorSpec]:
    """{part: spec} of one quantized linear W [n, k] with `group` input channels per group."""
    if method == FASTINTERNLM_INT4:
        return {
            "qweight": TensorSpec((n, k // 8), ("int32",)),
            "scales": TensorSpec((n, k // group), ("float16",)),
            "offsets": TensorSpec((n, k // group), ("float16",)),
            "int4_format": TensorSpec((4,), ("int64",)),
        }
    if method == "awq":
        return {
            "qweight": TensorSpec((k, n // 8), ("int32",)),
            "qzeros": TensorSpec((k // group, n // 8), ("int32",)),
            "scales": TensorSpec((k // group, n), ("float16",)),
        }
    if method == "gptq":
        return {
            "qweight": TensorSpec((k // 8, n), ("int32",)),
            "qzeros": TensorSpec((k // group, n // 8), ("int32",)),
            "scales": TensorSpec((k // group, n), ("float16",)),
            "g_idx": TensorSpec((k,), ("int32", "int64"), optional=True),
        }
    raise ValueError(f"unknown quantization method {method!r}")


def checkpoint_tensors(config: ModelConfig) -> Dict[str, TensorSpec]:
    """{tensor name: spec} of every tensor a checkpoint of `config` holds in its own
    naming: dense tensors (any floating dtype), and for a quantized checkpoint each
    quantized linear's parts (exact dtypes) in place of its weight."""
    specs = {name: TensorSpec(shape) for name, shape in dense_tensors(config).items()}
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


def ignorable_tensor(config: ModelConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that the runtime skips without reading: cached
    rotary inverse frequencies (recomputed in the kernel), and the output head of a tied
    model (some exporters save the copy; the embedding is used)."""
    if name.endswith(".rotary_emb.inv_freq"):
        return True
    return config.tie_word_embeddings and name == hf_naming(config).name(hf_naming(config).head)


def check_quantizable(config: ModelConfig, group_size: int, quant_head: bool) -> None:
    """Raises ValueError unless every linear that int4 quantization at load (or
    `fastinternlm quantize`) would quantize has an input size divisible by group_size."""
    bad: Dict[str, str] = {}
    for lin in linears(config):
        if (quant_head or not lin.head) and lin.k % group_size:
            bad.setdefault(f"{lin.k_source} = {lin.k}", lin.name)
    if bad:
        listed = "; ".join(f"{size} (the input size of {name} and alike)" for size, name in bad.items())
        raise ValueError(
            f"int4 quantization with group_size={group_size} needs each quantized linear's input "
            f"size to be a multiple of {group_size}, but {listed}; choose a group_size among "
            f"{GROUP_SIZES} that divides it"
        )


__all__ = [
    "FASTINTERNLM_INT4",
    "HF_NAMINGS",
    "INTERNLM2_HF",
    "LLAMA_GGUF",
    "LLAMA_HF",
    "QUANT_METHODS",
    "Linear",
    "Naming",
    "TensorSpec",
    "check_quantizable",
    "checkpoint_tensors",
    "dense_tensors",
    "destination",
    "expected_tensors",
    "hf_naming",
    "ignorable_tensor",
    "int4_parts",
    "linears",
]
