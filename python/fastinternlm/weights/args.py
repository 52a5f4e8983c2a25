"""`load`'s arguments, checked once, before any file is opened, whatever the format; and
the path's format (a checkpoint folder or a GGUF file), checked in the order a person
thinks: does it exist, is it a folder with config.json or a GGUF file."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch

from .. import memory_plan
from ..llm import NTK_MODES
from ..model import KV_CACHE_FLOAT, KV_CACHE_TYPES, resolve_kv_cache
from ..ops.int4_gemm import GROUP_SIZES
from .files import CheckpointError

LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_MODES = (None, "int4")
GGUF_MAGIC = b"GGUF"
HF = "hf"
GGUF = "gguf"


@dataclasses.dataclass(frozen=True)
class LoadArgs:
    device: torch.device  # with its index on CUDA
    dtype: Optional[torch.dtype]  # None: the format's default
    max_seq_len: Optional[int]  # None: the default for the device and the model
    max_batch: int
    ntk_mode: str
    quant: Optional[str]
    group_size: int
    quant_head: bool
    cuda_graph: bool
    progress: bool
    kv_cache: Optional[str]  # None: the activation dtype (model.resolve_kv_cache checks it)
    check_weights: bool


def check_dtype(dtype) -> Optional[torch.dtype]:
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
        dtype = named
    if dtype is not None and dtype not in LOAD_DTYPES:
        allowed = " or ".join(str(d).replace("torch.", "") for d in LOAD_DTYPES)
        raise TypeError(f"dtype must be {allowed} (or None for the checkpoint's own), got {dtype}")
    return dtype


def check_device(device) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device gets its index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
        raise TypeError(f"device must be a str or a torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be the CPU or a CUDA device, got {device!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be the CPU or a CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_quant_args(quant, group_size, quant_head) -> None:
    """The quantization arguments of load and quantize_checkpoint, checked before any
    work: TypeError for a wrong type, ValueError for a wrong value."""
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


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_load_args(
    device=None,
    dtype=None,
    max_seq_len=None,
    max_batch=1,
    ntk_mode="hf",
    quant=None,
    group_size=128,
    quant_head=False,
    cuda_graph=True,
    progress=True,
    kv_cache=None,
    check_weights=False,
) -> LoadArgs:
    check_quant_args(quant, group_size, quant_head)
    if ntk_mode not in NTK_MODES:
        raise ValueError(f"ntk_mode must be one of {NTK_MODES}, got {ntk_mode!r}")
    dtype = check_dtype(dtype)
    device = check_device(device)
    if device.type == "cuda" and dtype == torch.float32:
        raise TypeError("dtype float32 runs on the CPU only; use float16 or bfloat16 on CUDA")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if (
        max_seq_len is not None
        and max_seq_len != "auto"
        and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2)
    ):
        raise ValueError(f"max_seq_len must be an integer >= 2 or 'auto', got {max_seq_len!r}")
    if kv_cache is not None and kv_cache not in KV_CACHE_TYPES and kv_cache not in KV_CACHE_FLOAT:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_TYPES} or None, got {kv_cache!r}")
    return LoadArgs(
        device,
        dtype,
        max_seq_len,
        max_batch,
        ntk_mode,
        quant,
        group_size,
        quant_head,
        _flag("cuda_graph", cuda_graph),
        _flag("progress", progress),
        kv_cache,
        _flag("check_weights", check_weights),
    )


def default_max_seq_len(max_position_embeddings: int, device: torch.device) -> int:
    return min(max_position_embeddings, 32768 if device.type == "cuda" else 4096)


def check_memory(config, args: LoadArgs, dtype: torch.dtype, **weights) -> memory_plan.MemoryPlan:
    """The memory plan of a load (memory_plan.resolve) before any weight is read: the
    weights as they will be loaded, the KV cache for args' max_seq_len, max_batch and
    kv_cache, and the workspace, against the free memory of args.device; raises
    MemoryPlanError with the numbers and what would fit. `weights`: memory_plan.plan's
    weight keywords (quant, group_size, quant_head, or weights=bytes counted by the reader)."""
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(config.max_position_embeddings, args.device)
    return memory_plan.resolve(
        memory_plan.ModelShape.from_config(config),
        args.device,
        max_seq_len=max_seq_len,
        max_batch=args.max_batch,
        kv_cache=resolve_kv_cache(args.kv_cache, dtype),
        dtype=dtype,
        **weights,
    )


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


HF_ACCEPTS = "a Hugging Face checkpoint folder (with config.json)"
LOAD_ACCEPTS = "a checkpoint folder (with config.json) or a .gguf file"


def detect_format(path: Union[str, "os.PathLike[str]"], *, what: str = "load", accepts: str = LOAD_ACCEPTS) -> str:
    """HF (a folder with config.json) or GGUF (a .gguf file, or any file that starts with
    GGUF's magic), or an error that says what is wrong with `path`, checked in this
    order: the path exists; it is a folder with config.json or a GGUF file. `what` and
    `accepts` name the caller and what it takes, for the messages."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    if not os.path.exists(path):
        if path.lower().endswith(".gguf") and accepts == LOAD_ACCEPTS:
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        raise FileNotFoundError(f"{path} does not exist; {what} takes {accepts}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return HF
        entries = sorted(os.listdir(path))
        if not entries:
            raise FileNotFoundError(f"{path} is an empty folder; {what} takes {accepts}")
        ggufs = [e for e in entries if e.lower().endswith(".gguf")]
        hint = (
            f" (it holds {', '.join(ggufs[:3])}: pass that file's path)"
            if ggufs
            else f" (it holds {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''})"
        )
        raise FileNotFoundError(
            f"no config.json in {path}: not a Hugging Face checkpoint folder{hint}; {what} takes {accepts}"
        )
    if path.lower().endswith(".gguf") or _is_gguf(path):
        return GGUF
    raise CheckpointError(f"{path} is a file, neither a checkpoint folder nor a GGUF file; {what} takes {accepts}")


__all__ = [
    "GGUF",
    "HF",
    "LOAD_DTYPES",
    "QUANT_MODES",
    "LoadArgs",
    "check_device",
    "check_dtype",
    "check_load_args",
    "check_quant_args",
    "default_max_seq_len",
    "detect_format",
]
