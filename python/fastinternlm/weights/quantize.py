"""`fastinternlm quantize IN_DIR OUT_DIR`: write an int4 checkpoint that
`fastinternlm.load(OUT_DIR)` loads without quantizing again.

The output is the input checkpoint with every decoder-layer linear (and the output head
with quant_head) replaced by the tensors of its Int4Weight (packed format v1):
    <module>.qweight      int32   [n, k / 8]
    <module>.scales       float16 [n, k / group_size]
    <module>.offsets      float16 [n, k / group_size]
    <module>.int4_format  int64   [4] = format_version, n, k, group_size
in the checkpoint's own naming (InternLM2's fused wqkv stays fused; Llama's q/k/v stay
separate and are fused by the loader, which is exact because int4 groups run along the
input channels of one row). Every other tensor is copied unchanged (same dtype, same
bytes). config.json is copied with
    "quantization_config": {"quant_method": "fastinternlm-int4", "format_version": 1,
                            "group_size": g, "quant_head": false}
added; every other file that is not a weight file (tokenizer, generation config, remote
code) is copied as it is.

The weights are the same as `fastinternlm.load(IN_DIR, quant="int4", group_size=g,
quant_head=...)` builds: both quantize each linear from the checkpoint's own values
(float16/bfloat16/float32; float64 narrowed to float32) with ops.quantize_int4, whose
CPU and CUDA versions agree bit for bit. Tensors are read one at a time; the output is
written in safetensors shards of at most `max_shard_bytes` (plus one tensor), so host
memory peaks near one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, List, Union

import torch

from ..ops.int4_gemm import INT4_FORMAT_VERSION, quantize_int4
from . import files
from .args import HF, HF_ACCEPTS, LOAD_DTYPES, check_device, check_quant_args, detect_format
from .arch import FASTINTERNLM_INT4, check_quantizable, destination, ignorable_tensor, linears
from .files import WEIGHT_INDEX_FILES, CheckpointError
from .hf import load_config, scan_checkpoint

DEFAULT_SHARD_BYTES = 2 * 1024**3


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name in WEIGHT_INDEX_FILES


class _ShardWriter:
    """Collects CPU tensors and writes a safetensors shard whenever max_bytes is reached;
    names the shards model-0000i-of-0000N.safetensors (or model.safetensors) at the end."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.part: Dict[str, torch.Tensor] = {}
        self.part_bytes = 0
        self.written: List[Dict[str, object]] = []  # per shard: temporary file, names
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.part and self.part_bytes + nbytes > self.max_bytes:
            self._flush()
        self.part[name] = t.contiguous()
        self.part_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = os.path.join(self.directory, f".shard-{len(self.written)}.tmp")
        save_file(self.part, tmp, metadata={"format": "pt"})
        self.written.append({"tmp": tmp, "names": list(self.part)})
        self.part, self.part_bytes = {}, 0

    def close(self) -> None:
        if self.part or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            os.replace(self.written[0]["tmp"], os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for i, shard in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(shard["tmp"], os.path.join(self.directory, name))
            weight_map.update({n: name for n in shard["names"]})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def quantize_checkpoint(
    src: Union[str, "os.PathLike[str]"],
    dst: Union[str, "os.PathLike[str]"],
    group_size: int = 128,
    quant_head: bool = False,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> str:
    """Quantize the checkpoint directory `src` (a Hugging Face checkpoint folder; GGUF
    files are refused with a message saying so) into the new directory `dst` (which must
    not exist or be empty); returns dst. device: where to quantize (None: CUDA when
    available, else the CPU); the result is the same on either. Everything is checked
    before any tensor is read or any file written."""
    check_quant_args("int4", group_size, quant_head)
    device = check_device(device)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    if detect_format(src, what="quantize", accepts=HF_ACCEPTS) != HF:
        raise ValueError(
            f"{src} is a GGUF file; quantize takes {HF_ACCEPTS} (a GGUF file's Q4_0/Q4_1 tensors "
            f"load as int4 by themselves: pass the file to load, generate or chat as it is)"
        )
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError("the output directory must differ from the input directory")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"output directory {dst} exists and is not empty")
    config = load_config(src)
    if config.quantization is not None:
        raise ValueError(
            f"checkpoint {src} is already quantized (quantization_config.quant_method {config.quantization.method!r})"
        )
    check_quantizable(config, group_size, quant_head)
    kind, shards, infos = scan_checkpoint(src, config)

    quantized = {lin.name + ".weight": lin for lin in linears(config) if quant_head or not lin.head}
    head = next(lin for lin in linears(config) if lin.head)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)

    os.makedirs(dst, exist_ok=True)
    writer = _ShardWriter(dst, max_shard_bytes)
    names = [n for n in infos if not ignorable_tensor(config, n)]

    def quantize(name: str, t: torch.Tensor, prefix: str) -> None:
        dtype = t.dtype if t.dtype in LOAD_DTYPES else torch.float32
        try:
            qw = quantize_int4(t.to(device, dtype).contiguous(), group_size)
        except ValueError as e:
            raise CheckpointError(f"cannot quantize {name}: {e}") from None
        for key, value in qw.state_dict(prefix).items():
            writer.add(key, value.cpu())

    desc = f"Quantizing {os.path.basename(os.path.normpath(src))} (int4, group_size {group_size})"
    for name, t in files.iter_tensors(src, kind, shards, infos, names, desc=desc, progress=progress):
        lin = quantized.get(name)
        if lin is not None:
            quantize(name, t, lin.name + ".")
        else:
            # Unchanged bytes; a clone, so tensors that shared storage in a pickle do not
            # share it in the safetensors file (which refuses that).
            writer.add(name, t.detach().clone())
            if quant_head and config.tie_word_embeddings and destination(config, name) == (None, "tok_embeddings"):
                quantize(name, t, head.name + ".")  # the tied head, quantized from the embedding
        del t
    writer.close()

    raw_config["quantization_config"] = {
        "quant_method": FASTINTERNLM_INT4,
        "format_version": INT4_FORMAT_VERSION,
        "group_size": group_size,
        "quant_head": quant_head,
    }
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for entry in sorted(os.listdir(src)):
        full = os.path.join(src, entry)
        if os.path.isfile(full) and entry != "config.json" and not _is_weight_file(entry):
            shutil.copy2(full, os.path.join(dst, entry))
    return dst


def main_args(args) -> int:
    """The `fastinternlm quantize` subcommand (cli.py builds the parser)."""
    out = quantize_checkpoint(
        args.input,
        args.output,
        group_size=args.group_size,
        quant_head=args.quant_head,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


__all__ = ["DEFAULT_SHARD_BYTES", "quantize_checkpoint"]
