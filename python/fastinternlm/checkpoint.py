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
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from .config import INTERNLM2, ConfigError, ModelConfig, expected_tensors, ignorable_tensor, load_config

LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SAFETENSORS_FLOAT = {"F16", "BF16", "F32", "F64"}
_TORCH_FLOAT = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """The checkpoint's files do not hold what its config.json describes."""


@dataclasses.dataclass
class LayerWeights:
    attention_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(H + 2 KV) * D, hidden], grouped layout
    wo: torch.Tensor  # [hidden, H * D]
    ffn_norm: torch.Tensor  # [hidden]
    w1: torch.Tensor  # gate [ffn, hidden]
    w3: torch.Tensor  # up [ffn, hidden]
    w2: torch.Tensor  # down [hidden, ffn]


@dataclasses.dataclass
class ModelWeights:
    tok_embeddings: torch.Tensor  # [vocab, hidden]
    layers: List[LayerWeights]
    norm: torch.Tensor  # [hidden]
    output: torch.Tensor  # [vocab, hidden]; `is tok_embeddings` when tied

    def named_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Canonical names ("layers.3.wqkv"); a tied output is listed once."""
        yield "tok_embeddings", self.tok_embeddings
        for i, layer in enumerate(self.layers):
            for field in dataclasses.fields(LayerWeights):
                yield f"layers.{i}.{field.name}", getattr(layer, field.name)
        yield "norm", self.norm
        if self.output is not self.tok_embeddings:
            yield "output", self.output

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.named_tensors())


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
                                end - begin)
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
        out[name] = _TensorInfo(base, tuple(t.shape), str(t.dtype).replace("torch.", ""), t.dtype in _TORCH_FLOAT,
                                t.numel() * t.element_size())
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
    expected = expected_tensors(config)
    problems = []
    missing = [n for n in expected if n not in infos]
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)}")
    extra = [n for n in infos if n not in expected and not ignorable_tensor(config, n)]
    if extra:
        problems.append(f"unexpected tensor(s) {_listing(sorted(extra))}")
    for name, info in infos.items():
        want = expected.get(name)
        if want is None and ignorable_tensor(config, name) and not name.endswith(".inv_freq"):
            want = (config.vocab_size, config.hidden_size)  # a tied head's saved copy
        if want is not None and info.shape != want:
            problems.append(f"tensor {name} has shape {info.shape}, expected {want}")
        if want is not None and not info.floating:
            problems.append(f"tensor {name} has dtype {info.dtype}; only floating-point weights are supported")
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


def load_checkpoint(path: Union[str, "os.PathLike[str]"], device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None, progress: bool = True
                    ) -> Tuple[ModelConfig, ModelWeights]:
    """(config, weights) of the checkpoint directory `path`, every weight on `device` in
    `dtype` (None: the checkpoint's declared torch_dtype if it is float16, bfloat16 or
    float32, else float16). `progress` shows a tqdm bar on stderr."""
    device, dtype = _check_target(device, dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = load_config(path)
    if dtype is None:
        dtype = config.torch_dtype if config.torch_dtype in LOAD_DTYPES else torch.float16
    kind, files = _checkpoint_files(path)
    infos = _scan(path, kind, files)
    _validate(path, config, infos)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    from tqdm.auto import tqdm

    wanted = expected_tensors(config)
    total = sum(infos[n].nbytes for n in wanted)
    layers: List[Dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
    globals_: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for name in wanted:
        by_file.setdefault(infos[name].file, []).append(name)

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=not progress, desc=f"Loading {os.path.basename(os.path.normpath(path))}") as bar:
        for file in files:
            names = by_file.get(file)
            if not names:
                continue
            full = os.path.join(path, file)
            if kind == "safetensors":
                from safetensors import safe_open

                with safe_open(full, framework="pt", device="cpu") as handle:
                    _convert_file(handle, names, config, device, dtype, layers, globals_, infos, bar)
            else:
                handle = _load_bin(full)
                _convert_file(handle, names, config, device, dtype, layers, globals_, infos, bar)
                del handle

    if config.tie_word_embeddings:
        globals_["output"] = globals_["tok_embeddings"]
    weights = ModelWeights(
        tok_embeddings=globals_["tok_embeddings"],
        layers=[LayerWeights(**{f.name: layer[f.name] for f in dataclasses.fields(LayerWeights)})
                for layer in layers],
        norm=globals_["norm"],
        output=globals_["output"],
    )
    return config, weights


def _convert_file(handle, names, config, device, dtype, layers, globals_, infos, bar) -> None:
    for name in names:
        src = _read_tensor(handle, name)
        layer, field = _destination(config, name)
        if field in ("q", "k", "v"):
            wqkv = layers[layer].get("wqkv")
            if wqkv is None:
                wqkv = layers[layer]["wqkv"] = torch.empty(
                    (config.qkv_rows, config.hidden_size), dtype=dtype, device=device)
            _place_qkv(wqkv, field, src, config)
        else:
            # A fresh tensor per weight: owned, contiguous memory (never a view of a
            # memory-mapped file), converted during the copy.
            dst = torch.empty(tuple(src.shape), dtype=dtype, device=device)
            dst.copy_(src)
            (globals_ if layer is None else layers[layer])[field] = dst
        bar.update(infos[name].nbytes)
        del src


__all__ = [
    "LOAD_DTYPES",
    "CheckpointError",
    "ConfigError",
    "LayerWeights",
    "ModelWeights",
    "fuse_qkv",
    "load_checkpoint",
    "split_wqkv",
]
