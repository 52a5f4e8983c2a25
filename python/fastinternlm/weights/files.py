"""A checkpoint directory's weight files: which shards, what their headers say, and the
one loop that reads tensors from them (with the progress bar).

Formats: `model.safetensors` or shards listed in `model.safetensors.index.json`
(preferred when both kinds are present), else `pytorch_model.bin` or shards listed in
`pytorch_model.bin.index.json` (unpickled with weights_only=True and memory-mapped).

Everything about the files is checked before any tensor data is read, every shard first:
- safetensors: the 8-byte header length against the file size, the header as a JSON
  object whose entries each carry a known dtype, a shape and data_offsets [begin, end]
  with end - begin = the shape's bytes and the data inside the file (a truncated shard
  is found here, named, before the first shard is loaded);
- .bin: the pickle's tensor records, read with the data pages memory-mapped and
  untouched; a file torch cannot read is named in the error.
The tensor data itself is read in one place, `read_tensor`, by `iter_tensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import sys
from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from ..config import read_json

_SAFETENSORS_FLOAT = {"F16", "BF16", "F32", "F64"}
_TORCH_FLOAT = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# safetensors' dtype codes -> (torch's name, bytes per element), so one message vocabulary
# serves both formats.
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_INDEX_FILES = (SAFETENSORS_INDEX, BIN_INDEX)
MAX_LISTED = 8


class CheckpointError(ValueError):
    """The checkpoint's files are unreadable, or do not hold what its config.json describes."""


@dataclasses.dataclass
class TensorInfo:
    file: str  # the shard's name inside the checkpoint directory
    shape: Tuple[int, ...]
    dtype: str  # as the file spells it, for messages
    floating: bool
    nbytes: int
    torch_dtype: str = ""  # torch's name for the dtype ("int32")


def listing(names: List[str]) -> str:
    """At most MAX_LISTED names, then how many more."""
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _index_files(path: str, index_name: str) -> List[str]:
    index_file = os.path.join(path, index_name)
    weight_map = read_json(index_file, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file} has no weight_map")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: weight_map must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{index_file} lists shard {name}, which is not in {path}")
    return files


def checkpoint_files(path: str) -> Tuple[str, List[str]]:
    """("safetensors" or "bin", shard file names) of the checkpoint directory `path`."""
    if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
        return "safetensors", _index_files(path, SAFETENSORS_INDEX)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "safetensors", ["model.safetensors"]
    if os.path.isfile(os.path.join(path, BIN_INDEX)):
        return "bin", _index_files(path, BIN_INDEX)
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return "bin", ["pytorch_model.bin"]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _header_entry(file: str, name: str, entry, data_size: int) -> TensorInfo:
    """One safetensors header entry, checked against the data area's size."""
    where = f"{file}: tensor {name}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: the header entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(f"{where}: the header entry has no {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (expected one of {', '.join(_SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of integers >= 0, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}")
    begin, end = offsets
    torch_name, itemsize = _SAFETENSORS_DTYPES[dtype]
    nbytes = math.prod(shape) * itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} do not hold its {dtype} {tuple(shape)} ({nbytes} bytes)"
        )
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets end at byte {end} of the data, but the file holds only "
            f"{data_size} bytes of data (the file is truncated or the header is wrong)"
        )
    return TensorInfo(os.path.basename(file), tuple(shape), dtype, dtype in _SAFETENSORS_FLOAT, nbytes, torch_name)


def read_safetensors_header(file: str) -> Dict[str, TensorInfo]:
    """The JSON header only (its first 8 bytes give its length), every entry checked
    against the file's size; no tensor data is read."""
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
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - length
    return {
        name: _header_entry(file, name, entry, data_size) for name, entry in header.items() if name != "__metadata__"
    }


def load_bin(file: str) -> Dict[str, torch.Tensor]:
    """A pytorch_model*.bin state dict; the storages stay on disk (memory-mapped) until a
    tensor is touched. Any file torch cannot read raises CheckpointError naming it."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Only the zip format (torch >= 1.6) can be memory-mapped; the legacy format is
            # read whole, one shard at a time.
            if "zip" not in str(e).lower():
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged pickle; name the file in one
        raise CheckpointError(
            f"{file} is not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict (got {type(state).__name__})")
    return state


def _read_bin_metadata(file: str) -> Dict[str, TensorInfo]:
    base = os.path.basename(file)
    out = {}
    for name, t in load_bin(file).items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name} is not a tensor ({type(t).__name__})")
        dtype = str(t.dtype).replace("torch.", "")
        out[name] = TensorInfo(
            base, tuple(t.shape), dtype, t.dtype in _TORCH_FLOAT, t.numel() * t.element_size(), dtype
        )
    return out


def scan(path: str, kind: str, files: List[str]) -> Dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of every shard, each shard's metadata checked; reads no
    tensor data."""
    infos: Dict[str, TensorInfo] = {}
    for name in files:
        file = os.path.join(path, name)
        found = read_safetensors_header(file) if kind == "safetensors" else _read_bin_metadata(file)
        for tensor, info in found.items():
            if tensor in infos:
                raise CheckpointError(f"tensor {tensor} is stored twice: in {infos[tensor].file} and {name}")
            infos[tensor] = info
    return infos


def read_tensor(handle, name: str) -> torch.Tensor:
    """The one place tensor data is read (a safetensors handle or a memory-mapped state
    dict); everything before the loading loop touches metadata only."""
    if isinstance(handle, dict):
        return handle[name]
    return handle.get_tensor(name)


@contextlib.contextmanager
def open_shard(path: str, kind: str, file: str):
    full = os.path.join(path, file)
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(full, framework="pt", device="cpu") as handle:
            yield handle
    else:
        handle = load_bin(full)
        try:
            yield handle
        finally:
            del handle


def progress_bar(total: int, desc: str, progress: bool):
    """The loading progress bar (bytes, on stderr) every reader shows; a context manager."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not progress, desc=desc
    )


def iter_tensors(
    path: str,
    kind: str,
    files: List[str],
    infos: Dict[str, TensorInfo],
    names: Iterable[str],
    *,
    desc: str,
    progress: bool = True,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for each of `names`, shard by shard in `files` order, with a
    tqdm progress bar on stderr (bytes of the named tensors). A tensor is a view of the
    file's data (safetensors) or of a memory-mapped pickle: copy it before keeping it."""
    names = list(names)
    by_file: Dict[str, List[str]] = {}
    for name in names:
        by_file.setdefault(infos[name].file, []).append(name)
    total = sum(infos[n].nbytes for n in names)
    with progress_bar(total, desc, progress) as bar:
        for file in files:
            in_file = by_file.get(file)
            if not in_file:
                continue
            with open_shard(path, kind, file) as handle:
                for name in in_file:
                    t = read_tensor(handle, name)
                    yield name, t
                    del t
                    bar.update(infos[name].nbytes)


__all__ = [
    "WEIGHT_INDEX_FILES",
    "CheckpointError",
    "TensorInfo",
    "checkpoint_files",
    "iter_tensors",
    "listing",
    "load_bin",
    "open_shard",
    "progress_bar",
    "read_safetensors_header",
    "read_tensor",
    "scan",
]
