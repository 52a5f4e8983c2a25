"""Loading a Hugging Face checkpoint directory into the runtime's canonical weights.

Formats: `model.safetensors` or shards listed in `model.safetensors.index.json`
(preferred when both kinds are present), else `pytorch_model.bin` or shards listed in
`pytorch_model.bin.index.json` (unpickled with weights_only=True and memory-mapped).

Order of work, so that a bad checkpoint fails before any weight is read:
 1. config.json -> ModelConfig (validated).
 2. Every shard's metadata: the safetensors JSON headers, or the pickles' tensor records
    (memory-mapped, the data pages untouched). Names, shapes and dtypes are checked
    against `expected_tensors(config)`; every missing, unexpected, mis-shaped or
    non-floating tensor is reported in one error naming them.
 3. Tensor by tensor, shard by shard: read one tensor, convert it on its way to the
    device, drop it. Host memory peaks near the largest tensor, not the model.

Canonical form, the same for both architectures: per layer `wqkv` in InternLM2's grouped
row layout (Llama's q/k/v rows are placed into it as they arrive, so one GEMM serves
both), `wo`, `w1` (gate), `w3` (up), `w2` (down), `attention_norm`, `ffn_norm`; plus
`tok_embeddings`, `norm`, `output` (the same tensor object as `tok_embeddings` when tied).

The grouped layout: row (g*(G+2) + s)*D + d, for KV head g, slot s, d < D; slots s < G are
query head g*G + s, slot G key head g, slot G+1 value head g (G = heads / kv_heads).

int4 (see int4_import.py and quantize.py): the linears may come out as Int4Weight, either
quantized while loading (`quant="int4"`: each linear right after it is read, on the
device, from the checkpoint's own values; the dense copy is dropped before the next
tensor is read) or imported from a pre-quantized checkpoint (ours, AWQ "gemm", GPTQ),
whose config.json's quantization_config decides which tensors the checkpoint must hold
(validated like any other, before any data is read). A quantized linear's parts may sit
in different shards; they wait on the device (packed, a quarter of the dense size)
until the last one arrives. Llama's q/k/v rows go into the fused wqkv either way (rows
are output channels, and int4 groups run along the input channels, so placing rows is
exact); embeddings and norms stay dense in the activation dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from typing import Dict, Iterator, List, Optional, Set, Tuple, Union

import torch

from .config import (INTERNLM2, ConfigError, Linear, ModelConfig, TensorSpec, check_quantizable, checkpoint_tensors,
                     ignorable_tensor, linears, load_config)
from .int4_import import concat_rows, import_linear
from .ops.int4_gemm import GROUP_SIZES, Int4Weight, quantize_int4

LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SAFETENSORS_FLOAT = {"F16", "BF16", "F32", "F64"}
_TORCH_FLOAT = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_MAX_LISTED = 8
QUANT_MODES = (None, "int4")
# safetensors' dtype codes -> torch's names, so one message vocabulary serves both formats.
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointError(ValueError):
    """The checkpoint's files do not hold what its config.json describes."""


Weight = Union[torch.Tensor, Int4Weight]


@dataclasses.dataclass
class LayerWeights:
    attention_norm: torch.Tensor  # [hidden]
    wqkv: Weight  # [(H + 2 KV) * D, hidden], grouped layout
    wo: Weight  # [hidden, H * D]
    ffn_norm: torch.Tensor  # [hidden]
    w1: Weight  # gate [ffn, hidden]
    w3: Weight  # up [ffn, hidden]
    w2: Weight  # down [hidden, ffn]


@dataclasses.dataclass
class ModelWeights:
    tok_embeddings: torch.Tensor  # [vocab, hidden]
    layers: List[LayerWeights]
    norm: torch.Tensor  # [hidden]
    output: Weight  # [vocab, hidden]; `is tok_embeddings` when tied (and not quantized)

    def named_tensors(self) -> Iterator[Tuple[str, Weight]]:
        """Canonical names ("layers.3.wqkv"); a tied output is listed once. Quantized
        linears are listed as their Int4Weight."""
        yield "tok_embeddings", self.tok_embeddings
        for i, layer in enumerate(self.layers):
            for field in dataclasses.fields(LayerWeights):
                yield f"layers.{i}.{field.name}", getattr(layer, field.name)
        yield "norm", self.norm
        if self.output is not self.tok_embeddings:
            yield "output", self.output

    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, Int4Weight) else t.numel() * t.element_size()
                   for _, t in self.named_tensors())


# ---- the wqkv layout ---------------------------------------------------------------------

def _qkv_dims(config: ModelConfig) -> Tuple[int, int, int]:
    return config.num_kv_heads, config.group_size, config.head_dim


def split_wqkv(wqkv: torch.Tensor, config: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped wqkv [(H + 2 KV) * D, ...] -> q [H * D, ...], k [KV * D, ...], v [KV * D, ...]
    (new contiguous tensors; rows in Llama's head-major order). Any trailing shape works,
    so per-row quantisation scales split the same way."""
    kv, g, d = _qkv_dims(config)
    if wqkv.dim() < 1 or wqkv.shape[0] != config.qkv_rows:
        raise ValueError(f"wqkv must have {config.qkv_rows} rows ((H + 2 KV) * D), got shape {tuple(wqkv.shape)}")
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(kv, g + 2, d, *rest)
    q = grouped[:, :g].reshape(kv * g * d, *rest).contiguous()
    k = grouped[:, g].reshape(kv * d, *rest).contiguous()
    v = grouped[:, g + 1].reshape(kv * d, *rest).contiguous()
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Inverse of split_wqkv: Llama q/k/v rows -> one grouped wqkv."""
    kv, g, d = _qkv_dims(config)
    rest = tuple(q.shape[1:])
    for name, t, rows in (("q", q, config.q_size), ("k", k, config.kv_size), ("v", v, config.kv_size)):
        if t.dim() < 1 or t.shape[0] != rows or tuple(t.shape[1:]) != rest:
            raise ValueError(f"{name} must have shape {(rows, *rest)}, got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("q, k and v must share dtype and device")
    out = torch.empty((config.qkv_rows, *rest), dtype=q.dtype, device=q.device)
    _place_qkv(out, "q", q, config)
    _place_qkv(out, "k", k, config)
    _place_qkv(out, "v", v, config)
    return out


def _place_qkv(wqkv: torch.Tensor, part: str, src: torch.Tensor, config: ModelConfig) -> None:
    """Copies one of Llama's q/k/v (any dtype/device) into its rows of the grouped wqkv."""
    kv, g, d = _qkv_dims(config)
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.view(kv, g + 2, d, *rest)
    if part == "q":
        grouped[:, :g].copy_(src.reshape(kv, g, d, *rest))
    else:
        grouped[:, g if part == "k" else g + 1].copy_(src.reshape(kv, d, *rest))


# ---- checkpoint files --------------------------------------------------------------------

@dataclasses.dataclass
class _TensorInfo:
    file: str
    shape: Tuple[int, ...]
    dtype: str  # as the file spells it, for messages
    floating: bool
    nbytes: int
    torch_dtype: str = ""  # torch's name for the dtype ("int32")


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def _index_files(path: str, index_name: str) -> List[str]:
    index_file = os.path.join(path, index_name)
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file} has no weight_map")
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{index_file} lists shard {name}, which is not in {path}")
    return files


def _checkpoint_files(path: str) -> Tuple[str, List[str]]:
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return "safetensors", _index_files(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "safetensors", ["model.safetensors"]
    if os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json")):
        return "bin", _index_files(path, "pytorch_model.bin.index.json")
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return "bin", ["pytorch_model.bin"]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json")


def _read_safetensors_header(file: str) -> Dict[str, _TensorInfo]:
    """The JSON header only: the first 8 bytes give its length; no tensor data is read."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointError(f"{file} is not a safetensors file (header length {length} > file size {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has an unreadable safetensors header: {e}") from None
    out = {}
    base = os.path.basename(file)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = _TensorInfo(base, tuple(entry["shape"]), entry["dtype"], entry["dtype"] in _SAFETENSORS_FLOAT,
                                end - begin, _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
    return out


def _load_bin(file: str) -> Dict[str, torch.Tensor]:
    # mmap: the pickle is parsed but storages stay on disk until a tensor is touched.
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        # Only the zip format (torch >= 1.6) can be memory-mapped; the legacy format is
        # read whole, one shard at a time.
        if "zip" not in str(e).lower():
            raise
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict (got {type(state).__name__})")
    return state


def _read_bin_metadata(file: str) -> Dict[str, _TensorInfo]:
    base = os.path.basename(file)
    out = {}
    for name, t in _load_bin(file).items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name} is not a tensor ({type(t).__name__})")
        dtype = str(t.dtype).replace("torch.", "")
        out[name] = _TensorInfo(base, tuple(t.shape), dtype, t.dtype in _TORCH_FLOAT, t.numel() * t.element_size(),
                                dtype)
    return out


def _scan(path: str, kind: str, files: List[str]) -> Dict[str, _TensorInfo]:
    infos: Dict[str, _TensorInfo] = {}
    for name in files:
        file = os.path.join(path, name)
        found = _read_safetensors_header(file) if kind == "safetensors" else _read_bin_metadata(file)
        for tensor, info in found.items():
            if tensor in infos:
                raise CheckpointError(f"tensor {tensor} is stored twice: in {infos[tensor].file} and {name}")
            infos[tensor] = info
    return infos


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _validate(path: str, config: ModelConfig, infos: Dict[str, _TensorInfo]) -> None:
    specs = checkpoint_tensors(config)
    problems = []
    missing = [n for n, spec in specs.items() if n not in infos and not spec.optional]
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)}")
    extra = [n for n in infos if n not in specs and not ignorable_tensor(config, n)]
    if extra:
        problems.append(f"unexpected tensor(s) {_listing(sorted(extra))}")
        if config.quantization is None and any(n.endswith(".qweight") for n in extra):
            problems.append("(tensors named *.qweight belong to a quantized checkpoint, but config.json has no "
                            "quantization_config)")
    for name, info in infos.items():
        spec = specs.get(name)
        if spec is None and ignorable_tensor(config, name) and not name.endswith(".inv_freq"):
            spec = TensorSpec((config.vocab_size, config.hidden_size))  # a tied head's saved copy
        if spec is not None and info.shape != spec.shape:
            problems.append(f"tensor {name} has shape {info.shape}, expected {spec.shape}")
        if spec is not None and not spec.dtypes and not info.floating:
            problems.append(f"tensor {name} has dtype {info.dtype}; only floating-point weights are supported")
        if spec is not None and spec.dtypes and info.torch_dtype not in spec.dtypes:
            problems.append(f"tensor {name} has dtype {info.dtype}, expected {' or '.join(spec.dtypes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} ({config.architecture}, {config.num_layers} layers) does not match its "
            f"config.json: " + "; ".join(problems))


def _read_tensor(handle, name: str) -> torch.Tensor:
    """The one place tensor data is read (a safetensors handle or a memory-mapped state
    dict); everything before the loading loop touches metadata only."""
    if isinstance(handle, dict):
        return handle[name]
    return handle.get_tensor(name)


# ---- canonical placement -----------------------------------------------------------------

_INTERNLM2_LAYER = {
    "attention_norm.weight": "attention_norm",
    "attention.wqkv.weight": "wqkv",
    "attention.wo.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "feed_forward.w1.weight": "w1",
    "feed_forward.w3.weight": "w3",
    "feed_forward.w2.weight": "w2",
}
_LLAMA_LAYER = {
    "input_layernorm.weight": "attention_norm",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w1",
    "mlp.up_proj.weight": "w3",
    "mlp.down_proj.weight": "w2",
}
_GLOBALS = {
    INTERNLM2: {"model.tok_embeddings.weight": "tok_embeddings", "model.norm.weight": "norm",
                "output.weight": "output"},
    "LlamaForCausalLM": {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
                         "lm_head.weight": "output"},
}


def _destination(config: ModelConfig, name: str) -> Tuple[Optional[int], str]:
    """(layer index or None, canonical field; "q"/"k"/"v" for Llama's parts of wqkv)."""
    globals_ = _GLOBALS[config.architecture]
    if name in globals_:
        return None, globals_[name]
    _, _, index, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    table = _INTERNLM2_LAYER if config.architecture == INTERNLM2 else _LLAMA_LAYER
    return int(index), table[rest]


def _check_target(device, dtype) -> Tuple[torch.device, Optional[torch.dtype]]:
    if dtype is not None and dtype not in LOAD_DTYPES:
        allowed = " or ".join(str(d).replace("torch.", "") for d in LOAD_DTYPES)
        raise TypeError(f"dtype must be {allowed} (or None for the checkpoint's own), got {dtype}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be the CPU or a CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but torch sees no CUDA device")
    return device, dtype


def check_quant_args(quant, group_size, quant_head) -> None:
    """The quantization arguments of load / load_checkpoint / quantize_checkpoint, checked
    before any work: TypeError for a wrong type, ValueError for a wrong value."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be None or 'int4', got {quant!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if not isinstance(quant_head, bool):
        raise TypeError(f"quant_head must be True or False, got {quant_head!r}")
    if quant is None and (group_size != 128 or quant_head):
        raise ValueError("group_size and quant_head apply to quant='int4' only (quant is None)")


def load_checkpoint(path: Union[str, "os.PathLike[str]"], device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None, progress: bool = True, *, quant: Optional[str] = None,
                    group_size: int = 128, quant_head: bool = False) -> Tuple[ModelConfig, ModelWeights]:
    """(config, weights) of the checkpoint directory `path`, every weight on `device` in
    `dtype` (None: the checkpoint's declared torch_dtype if it is float16, bfloat16 or
    float32, else float16). `progress` shows a tqdm bar on stderr.

    quant="int4" quantizes every decoder-layer linear (and the output head if quant_head)
    round-to-nearest, asymmetric, `group_size` input channels per group, while loading.
    A pre-quantized checkpoint (quantization_config in config.json) loads its linears as
    Int4Weight with quant=None."""
    device, dtype = _check_target(device, dtype)
    check_quant_args(quant, group_size, quant_head)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = load_config(path)
    if quant is not None:
        if config.quantization is not None:
            raise ValueError(f"checkpoint {path} is already quantized (quantization_config.quant_method "
                             f"{config.quantization.method!r}); load it with quant=None")
        check_quantizable(config, group_size, quant_head)
    if dtype is None:
        dtype = config.torch_dtype if config.torch_dtype in LOAD_DTYPES else torch.float16
    kind, files = _checkpoint_files(path)
    infos = _scan(path, kind, files)
    _validate(path, config, infos)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _check_act_order(path, kind, config, infos)

    from tqdm.auto import tqdm

    wanted = [n for n in checkpoint_tensors(config) if n in infos]
    total = sum(infos[n].nbytes for n in wanted)
    by_file: Dict[str, List[str]] = {}
    for name in wanted:
        by_file.setdefault(infos[name].file, []).append(name)
    loader = _Loader(config, device, dtype, infos, group_size if quant else None, quant_head)
    what = f"Loading {os.path.basename(os.path.normpath(path))}"
    if quant:
        what += f" (int4, group_size {group_size})"

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=not progress, desc=what) as bar:
        for file in files:
            names = by_file.get(file)
            if not names:
                continue
            full = os.path.join(path, file)
            if kind == "safetensors":
                from safetensors import safe_open

                with safe_open(full, framework="pt", device="cpu") as handle:
                    loader.convert_file(handle, names, bar)
            else:
                handle = _load_bin(full)
                loader.convert_file(handle, names, bar)
                del handle
    return config, loader.finish()


def _check_act_order(path: str, kind: str, config: ModelConfig, infos: Dict[str, _TensorInfo]) -> None:
    """A GPTQ checkpoint that declares desc_act: read every g_idx (K integers per linear)
    before any weight, so an act-order permutation is refused before the long part."""
    q = config.quantization
    if q is None or q.method != "gptq" or not q.desc_act:
        return
    names = [n for n in infos if n.endswith(".g_idx")]
    for file in sorted({infos[n].file for n in names}):
        full = os.path.join(path, file)
        in_file = [n for n in names if infos[n].file == file]
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(full, framework="pt", device="cpu") as handle:
                gidx = {n: _read_tensor(handle, n) for n in in_file}
        else:
            handle = _load_bin(full)
            gidx = {n: _read_tensor(handle, n).clone() for n in in_file}
            del handle
        for name, g in gidx.items():
            k = g.shape[0]
            group = q.group(k)
            if not torch.equal(g.to(torch.int64), torch.arange(k) // group):
                raise CheckpointError(
                    f"checkpoint {path}: {name} is not k // group_size ({group}): an act-order (desc_act=true) "
                    f"GPTQ checkpoint whose input channels are permuted across groups, which the int4 format "
                    f"(groups of consecutive channels) cannot hold; re-quantize with desc_act=false (or "
                    f"static_groups=true), or load the unquantized model with quant='int4'")


class _Int4Rows:
    """The packed tensors of a fused wqkv, filled part by part (Llama's q, k, v) by the
    same row placement as dense weights."""

    def __init__(self, rows: int, first: Int4Weight):
        self.group_size = first.group_size
        self.k = first.k
        self.qweight = torch.empty((rows, first.qweight.shape[1]), dtype=torch.int32, device=first.device)
        self.scales = torch.empty((rows, first.scales.shape[1]), dtype=torch.float16, device=first.device)
        self.offsets = torch.empty_like(self.scales)

    def place(self, part: str, w: Int4Weight, config: ModelConfig) -> None:
        if (w.k, w.group_size) != (self.k, self.group_size):
            raise CheckpointError(f"the {part} projection is {w}, but the other parts of wqkv have k={self.k}, "
                                  f"group_size={self.group_size}")
        _place_qkv(self.qweight, part, w.qweight, config)
        _place_qkv(self.scales, part, w.scales, config)
        _place_qkv(self.offsets, part, w.offsets, config)

    def finish(self) -> Int4Weight:
        return Int4Weight.from_tensors(self.qweight, self.scales, self.offsets, self.group_size)


class _Loader:
    """Turns checkpoint tensors, one at a time, into the canonical weights."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 infos: Dict[str, _TensorInfo], group_size: Optional[int], quant_head: bool):
        self.config, self.device, self.dtype = config, device, dtype
        self.group_size = group_size  # quantize at load with this group size; None: no
        self.layers: List[Dict[str, object]] = [{} for _ in range(config.num_layers)]
        self.globals: Dict[str, Weight] = {}
        self.linears: Dict[str, Linear] = {lin.name: lin for lin in linears(config)}
        # Dense tensors to quantize on arrival (checkpoint name -> linear).
        self.to_quantize: Dict[str, Linear] = {}
        self.head_from_embedding = False
        if group_size is not None:
            for lin in self.linears.values():
                if not lin.head or quant_head:
                    self.to_quantize[lin.name + ".weight"] = lin
            self.head_from_embedding = quant_head and config.tie_word_embeddings
        # Pre-quantized: each quantized linear's parts present in the checkpoint (validated
        # already); parts that arrived wait in `pending` until all have.
        self.expected_parts: Dict[str, Set[str]] = {}
        q = config.quantization
        if q is not None:
            quantized = {lin.name for lin in self.linears.values() if q.quantizes(lin)}
            for n in infos:
                module, _, part = n.rpartition(".")
                if module in quantized and part != "weight":
                    self.expected_parts.setdefault(module, set()).add(part)
        self.pending: Dict[str, Dict[str, torch.Tensor]] = {}
        self.infos = infos

    def convert_file(self, handle, names: List[str], bar) -> None:
        for name in names:
            src = _read_tensor(handle, name)
            self.convert(name, src)
            bar.update(self.infos[name].nbytes)
            del src

    def convert(self, name: str, src: torch.Tensor) -> None:
        module, _, part = name.rpartition(".")
        if part != "weight" and module in self.expected_parts:
            # A part of a pre-quantized linear: to the device as it is (integers and
            # float16 scales are used bit for bit).
            parts = self.pending.setdefault(module, {})
            parts[part] = src.to(self.device, copy=True).contiguous()
            if set(parts) == self.expected_parts[module]:
                lin = self.linears[module]
                try:
                    w = import_linear(self.config.quantization, module, self.pending.pop(module), lin.n, lin.k)
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
                self._store(module + ".weight", w)
            return
        lin = self.to_quantize.get(name)
        if lin is not None:
            self._store(name, self._quantize(name, src))
            return
        # A fresh tensor per weight: owned, contiguous memory (never a view of a
        # memory-mapped file), converted during the copy.
        dst = torch.empty(tuple(src.shape), dtype=self.dtype, device=self.device)
        dst.copy_(src)
        self._store(name, dst)
        if self.head_from_embedding and self._destination(name) == (None, "tok_embeddings"):
            self.globals["output"] = self._quantize(name, src)

    def _quantize(self, name: str, src: torch.Tensor) -> Int4Weight:
        """src on the device in its own dtype (float64 narrowed to float32), quantized
        there; the dense copy is dropped before the caller reads the next tensor. From the
        checkpoint's values rather than the activation dtype's, so the int4 weights do not
        depend on the dtype the model runs in (and `fastinternlm quantize` writes the same)."""
        dtype = src.dtype if src.dtype in LOAD_DTYPES else torch.float32
        w = src.to(self.device, dtype).contiguous()
        try:
            return quantize_int4(w, self.group_size)
        except ValueError as e:
            raise CheckpointError(f"cannot quantize {name}: {e}") from None

    def _destination(self, name: str) -> Tuple[Optional[int], str]:
        return _destination(self.config, name)

    def _store(self, name: str, value: Weight) -> None:
        layer, field = self._destination(name)
        if field not in ("q", "k", "v"):
            (self.globals if layer is None else self.layers[layer])[field] = value
            return
        wqkv = self.layers[layer].get("wqkv")
        if wqkv is None:
            if isinstance(value, Int4Weight):
                wqkv = _Int4Rows(self.config.qkv_rows, value)
            else:
                wqkv = torch.empty((self.config.qkv_rows, self.config.hidden_size), dtype=self.dtype,
                                   device=self.device)
            self.layers[layer]["wqkv"] = wqkv
        if isinstance(wqkv, _Int4Rows) != isinstance(value, Int4Weight):
            raise CheckpointError(f"layer {layer}: q, k and v projections must be all quantized or all dense")
        if isinstance(wqkv, _Int4Rows):
            wqkv.place(field, value, self.config)
        else:
            _place_qkv(wqkv, field, value, self.config)

    def finish(self) -> ModelWeights:
        if self.pending:
            raise CheckpointError(f"incomplete quantized linear(s) {_listing(sorted(self.pending))}")
        for layer in self.layers:
            if isinstance(layer.get("wqkv"), _Int4Rows):
                layer["wqkv"] = layer["wqkv"].finish()
        if "output" not in self.globals:  # tied, not quantized
            self.globals["output"] = self.globals["tok_embeddings"]
        return ModelWeights(
            tok_embeddings=self.globals["tok_embeddings"],
            layers=[LayerWeights(**{f.name: layer[f.name] for f in dataclasses.fields(LayerWeights)})
                    for layer in self.layers],
            norm=self.globals["norm"],
            output=self.globals["output"],
        )


def stack_rows(a: Weight, b: Weight) -> Weight:
    """Rows of a, then rows of b (gate and up into one GEMM), dense or int4; exact."""
    if isinstance(a, Int4Weight) or isinstance(b, Int4Weight):
        if not (isinstance(a, Int4Weight) and isinstance(b, Int4Weight)):
            raise CheckpointError("gate and up projections must be both quantized or both dense")
        return concat_rows(a, b)
    return torch.cat([a, b])


__all__ = [
    "LOAD_DTYPES",
    "QUANT_MODES",
    "CheckpointError",
    "ConfigError",
    "LayerWeights",
    "ModelWeights",
    "check_quant_args",
    "fuse_qkv",
    "load_checkpoint",
    "split_wqkv",
    "stack_rows",
]
