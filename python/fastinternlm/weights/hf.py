"""A Hugging Face checkpoint directory -> its ModelConfig, tokenizer and weights in the
one weight form (model.ModelWeights of model.Layer).

Order of work, so that a bad checkpoint fails before any weight is read:
 1. config.json (+ generation_config.json, + AutoGPTQ's quantize_config.json) ->
    ModelConfig with its quantization (validated; `load_config`).
 2. Every shard's metadata (files.py: safetensors headers checked against the file
    sizes, or the pickles' tensor records). Names, shapes and dtypes are checked against
    arch.py's table for the architecture and quantized format; every missing,
    unexpected, mis-shaped or mis-typed tensor is reported in one error naming them.
 3. Tensor by tensor, shard by shard (files.iter_tensors): read one tensor, convert it
    on its way to the device, drop it. Host memory peaks near the largest tensor.

Placement (arch.destination, layout.py): Llama's q/k/v rows go into the grouped wqkv as
they arrive, gate and up are stacked into w13 once both are there; embeddings and norms
are in the activation dtype; the output head is the embedding tensor itself when tied.

int4 (int4_import.py, quantize.py): the linears may come out as Int4Weight, either
quantized while loading (`quant="int4"`: each linear right after it is read, on the
device, from the checkpoint's own values; the dense copy is dropped before the next
tensor is read) or imported from a pre-quantized checkpoint (ours, AWQ "gemm", GPTQ),
whose quantization_config decides which tensors the checkpoint must hold. A quantized
linear's parts may sit in different shards; they wait on the device (packed, a quarter
of the dense size) until the last one arrives.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Set, Tuple, Union

import torch

from ..config import ConfigError, ModelConfig, read_json
from ..model import Layer, ModelWeights
from ..ops.int4_gemm import Int4Weight, quantize_int4
from ..hf_tokenizer import HFTokenizer
from ..tokenizer import load_tokenizer
from . import files
from .args import HF, HF_ACCEPTS, LOAD_DTYPES, LoadArgs, check_load_args, detect_format
from .arch import Linear, TensorSpec, check_quantizable, checkpoint_tensors, destination, ignorable_tensor, linears
from .files import CheckpointError, TensorInfo, listing
from .int4_import import import_linear
from .layout import Int4Rows, Weight, place_qkv, stack_rows
from .quant_config import with_quantization


def load_config(path: Union[str, "os.PathLike[str]"]) -> ModelConfig:
    """Reads `path/config.json` and, when present, `path/generation_config.json` and
    AutoGPTQ's `path/quantize_config.json`."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path}")
    config = read_json(config_file)
    generation_file = os.path.join(path, "generation_config.json")
    generation = read_json(generation_file) if os.path.isfile(generation_file) else None
    # AutoGPTQ (and GPTQModel) write their settings to quantize_config.json rather than
    # into config.json; config.json's quantization_config wins when both exist.
    gptq_file = os.path.join(path, "quantize_config.json")
    quantization = config.get("quantization_config")
    if quantization is None and os.path.isfile(gptq_file):
        quantization = {"quant_method": "gptq", **read_json(gptq_file)}
    return with_quantization(ModelConfig.from_dict(config, generation), quantization)


def read_tokenizer(path: str):
    """The checkpoint's tokenizer; its files, when present, are checked first so a broken
    one is named (CheckpointError) rather than failing inside the tokenizer library."""
    model_file = os.path.join(path, "tokenizer.model")
    if os.path.isfile(model_file) and os.path.getsize(model_file) == 0:
        raise CheckpointError(f"{model_file} is empty (0 bytes)")
    config_file = os.path.join(path, "tokenizer_config.json")
    config = read_json(config_file, CheckpointError) if os.path.isfile(config_file) else None
    if not os.path.isfile(model_file):
        # Most Llama-family checkpoints since Llama 3 ship only tokenizer.json.
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_dir(path, config)
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    try:
        return load_tokenizer(path)
    except RuntimeError as e:  # sentencepiece's parse failures
        raise CheckpointError(f"{model_file} is not a readable SentencePiece model: {e}") from None


def validate(path: str, config: ModelConfig, infos: Dict[str, TensorInfo]) -> None:
    """Every tensor of the checkpoint against arch.py's table for `config`."""
    specs = checkpoint_tensors(config)
    problems = []
    missing = [n for n, spec in specs.items() if n not in infos and not spec.optional]
    if missing:
        problems.append(f"missing tensor(s) {listing(missing)}")
    extra = [n for n in infos if n not in specs and not ignorable_tensor(config, n)]
    if extra:
        problems.append(f"unexpected tensor(s) {listing(sorted(extra))}")
        if config.quantization is None and any(n.endswith(".qweight") for n in extra):
            problems.append(
                "(tensors named *.qweight belong to a quantized checkpoint, but config.json has no quantization_config)"
            )
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
            f"config.json: " + "; ".join(problems)
        )


def scan_checkpoint(path: str, config: ModelConfig) -> Tuple[str, List[str], Dict[str, TensorInfo]]:
    """(kind, shard files, tensor infos) of a checkpoint, every shard's metadata read and
    validated against `config`; no tensor data is read."""
    kind, shards = files.checkpoint_files(path)
    infos = files.scan(path, kind, shards)
    validate(path, config, infos)
    return kind, shards, infos


def load_checkpoint(
    path: Union[str, "os.PathLike[str]"],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    *,
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
) -> Tuple[ModelConfig, ModelWeights]:
    """(config, weights) of the checkpoint directory `path`, every weight on `device` in
    `dtype` (None: the checkpoint's declared torch_dtype if it is float16, bfloat16 or
    float32, else float16). `progress` shows a tqdm bar on stderr.

    quant="int4" quantizes every decoder-layer linear (and the output head if quant_head)
    round-to-nearest, asymmetric, `group_size` input channels per group, while loading.
    A pre-quantized checkpoint (quantization_config in config.json) loads its linears as
    Int4Weight with quant=None. `fastinternlm.load` is this plus the tokenizer and the model."""
    args = check_load_args(
        device=device, dtype=dtype, quant=quant, group_size=group_size, quant_head=quant_head, progress=progress
    )
    if detect_format(path, what="load_checkpoint", accepts=HF_ACCEPTS) != HF:
        raise CheckpointError(
            f"{path} is a GGUF file; load_checkpoint takes {HF_ACCEPTS} (fastinternlm.load reads GGUF files)"
        )
    path = os.fspath(path)
    return read_weights(path, load_config(path), args)


def read_weights(path: str, config: ModelConfig, args: LoadArgs) -> Tuple[ModelConfig, ModelWeights]:
    """The weights of a checkpoint whose config is read and whose arguments are checked."""
    if args.quant is not None:
        if config.quantization is not None:
            raise ValueError(
                f"checkpoint {path} is already quantized (quantization_config.quant_method "
                f"{config.quantization.method!r}); load it with quant=None"
            )
        check_quantizable(config, args.group_size, args.quant_head)
    dtype = args.dtype
    if dtype is None:
        dtype = config.torch_dtype if config.torch_dtype in LOAD_DTYPES else torch.float16
        if args.device.type == "cuda" and dtype == torch.float32:
            raise TypeError("this checkpoint is float32; on CUDA pass dtype='float16' or 'bfloat16'")
    kind, shards, infos = scan_checkpoint(path, config)
    _check_act_order(path, kind, config, infos)

    wanted = [n for n in checkpoint_tensors(config) if n in infos]
    loader = _Loader(config, args.device, dtype, infos, args.group_size if args.quant else None, args.quant_head)
    what = f"Loading {os.path.basename(os.path.normpath(path))}"
    if args.quant:
        what += f" (int4, group_size {args.group_size})"
    for name, src in files.iter_tensors(path, kind, shards, infos, wanted, desc=what, progress=args.progress):
        loader.convert(name, src)
        del src
    return config, loader.finish()


def _check_act_order(path: str, kind: str, config: ModelConfig, infos: Dict[str, TensorInfo]) -> None:
    """A GPTQ checkpoint that declares desc_act: read every g_idx (K integers per linear)
    before any weight, so an act-order permutation is refused before the long part."""
    q = config.quantization
    if q is None or q.method != "gptq" or not q.desc_act:
        return
    names = [n for n in infos if n.endswith(".g_idx")]
    for file in sorted({infos[n].file for n in names}):
        with files.open_shard(path, kind, file) as handle:
            gidx = {n: files.read_tensor(handle, n).clone() for n in names if infos[n].file == file}
        for name, g in gidx.items():
            k = g.shape[0]
            group = q.group(k)
            if not torch.equal(g.to(torch.int64), torch.arange(k) // group):
                raise CheckpointError(
                    f"checkpoint {path}: {name} is not k // group_size ({group}): an act-order (desc_act=true) "
                    f"GPTQ checkpoint whose input channels are permuted across groups, which the int4 format "
                    f"(groups of consecutive channels) cannot hold; re-quantize with desc_act=false (or "
                    f"static_groups=true), or load the unquantized model with quant='int4'"
                )


class _Loader:
    """Turns checkpoint tensors, one at a time, into the one weight form."""

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        infos: Dict[str, TensorInfo],
        group_size: Optional[int],
        quant_head: bool,
    ):
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
        if name in self.to_quantize:
            self._store(name, self._quantize(name, src))
            return
        # A fresh tensor per weight: owned, contiguous memory (never a view of a
        # memory-mapped file), converted during the copy.
        dst = torch.empty(tuple(src.shape), dtype=self.dtype, device=self.device)
        dst.copy_(src)
        self._store(name, dst)
        if self.head_from_embedding and destination(self.config, name) == (None, "tok_embeddings"):
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

    def _store(self, name: str, value: Weight) -> None:
        layer, field = destination(self.config, name)
        if field not in ("q", "k", "v"):
            (self.globals if layer is None else self.layers[layer])[field] = value
            return
        wqkv = self.layers[layer].get("wqkv")
        if wqkv is None:
            if isinstance(value, Int4Weight):
                wqkv = Int4Rows(self.config.qkv_rows, value)
            else:
                wqkv = torch.empty(
                    (self.config.qkv_rows, self.config.hidden_size), dtype=self.dtype, device=self.device
                )
            self.layers[layer]["wqkv"] = wqkv
        if isinstance(wqkv, Int4Rows) != isinstance(value, Int4Weight):
            raise CheckpointError(f"layer {layer}: q, k and v projections must be all quantized or all dense")
        if isinstance(wqkv, Int4Rows):
            wqkv.place(field, value, self.config)
        else:
            place_qkv(wqkv, field, value, self.config)

    def finish(self) -> ModelWeights:
        if self.pending:
            raise CheckpointError(f"incomplete quantized linear(s) {listing(sorted(self.pending))}")
        layers = []
        for parts in self.layers:
            wqkv = parts.pop("wqkv")
            if isinstance(wqkv, Int4Rows):
                wqkv = wqkv.finish()
            # Gate and up stacked so one GEMM feeds silu_and_mul; the separate copies go.
            w13 = stack_rows(parts.pop("w1"), parts.pop("w3"))
            layers.append(Layer(parts["attention_norm"], wqkv, parts["wo"], parts["ffn_norm"], w13, parts["w2"]))
            parts.clear()
        if "output" not in self.globals:  # tied, not quantized
            self.globals["output"] = self.globals["tok_embeddings"]
        return ModelWeights(self.globals["tok_embeddings"], layers, self.globals["norm"], self.globals["output"])


__all__ = [
    "ConfigError",
    "CheckpointError",
    "load_checkpoint",
    "load_config",
    "read_tokenizer",
    "read_weights",
    "scan_checkpoint",
    "validate",
]
