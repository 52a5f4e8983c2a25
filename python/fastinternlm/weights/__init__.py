"""Everything between a path and a running model: `load` checks its arguments once,
recognises the format, has the format's reader return the one weight form
(model.ModelWeights of model.Layer), and builds the Transformer and the LLM (`build`,
which the benchmarks use too).

    args.py         load's arguments and the path's format, checked once
    arch.py         tensor names per architecture and quantized format (one table)
    quant_config.py a pre-quantized checkpoint's quantization_config
    files.py        shards, headers, validation, iter_tensors (the one reading loop)
    layout.py       grouped wqkv fuse/split, row stacking (dense and int4)
    hf.py           a Hugging Face checkpoint folder -> config, tokenizer, weights
    gguf.py         a GGUF file -> config, tokenizer, chat template, weights
    int4_import.py  AWQ / GPTQ / our int4 tensors -> Int4Weight
    quantize.py     `fastinternlm quantize`: write an int4 checkpoint
    synthetic.py    random weights of a given shape (benchmarks)

A new checkpoint format is a new reader module beside hf.py and gguf.py returning
(config, tokenizer, ModelWeights), plus one branch in `load`; a new architecture's tensor
names are one `Naming` in arch.py.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from ..chat_template import ChatTemplate
import torch

from ..llm import LLM
from ..model import ModelWeights, Transformer
from . import gguf, hf
from .args import GGUF, LOAD_DTYPES, check_load_args, check_memory, default_max_seq_len, detect_format
from .files import CheckpointError


def build_model(
    config,
    weights: ModelWeights,
    *,
    max_batch: int = 1,
    max_seq_len: Union[None, int, str] = None,
    kv_cache: Optional[str] = None,
    check_weights: bool = False,
) -> Transformer:
    """The Transformer (with its KV cache) over `weights`; the tensors are used as they
    are, never copied. max_seq_len None: min(max_position_embeddings, 32768) on CUDA, 4096
    on the CPU; "auto": the longest that fits the free memory (memory_plan.py).
    check_weights: scan every weight for NaN/Inf first (Transformer.check_finite)."""
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(config.max_position_embeddings, weights.tok_embeddings.device)
    if check_weights:
        # Before the cache is allocated: a bad checkpoint is named without using the memory.
        weights.check_finite()
    return Transformer(
        config,
        weights.tok_embeddings,
        weights.layers,
        weights.norm,
        weights.output,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        kv_cache=kv_cache,
    )


def build(
    config,
    weights: ModelWeights,
    tokenizer,
    *,
    max_batch: int = 1,
    max_seq_len: Union[None, int, str] = None,
    ntk_mode: str = "hf",
    cuda_graph: bool = True,
    stop_ids: Optional[Sequence[int]] = None,
    chat_template=None,
    kv_cache: Optional[str] = None,
    check_weights: bool = False,
) -> LLM:
    """The LLM over build_model's Transformer: what load returns, for every format."""
    model = build_model(
        config, weights, max_batch=max_batch, max_seq_len=max_seq_len, kv_cache=kv_cache, check_weights=check_weights
    )
    return LLM(
        model, tokenizer, ntk_mode=ntk_mode, stop_ids=stop_ids, chat_template=chat_template, cuda_graph=cuda_graph
    )


def _check_memory(config, args) -> None:
    """Refuse a KV cache that cannot fit before any weight is read: the memory plan for
    the weights as they will be loaded (dtype, int4 or not), the cache and the activation
    workspace against the device's free memory (memory_plan.py; Transformer checks again,
    with the real free memory, once the weights are resident). GGUF files run the same
    check from their header (gguf.read_gguf)."""
    q = config.quantization
    dtype = args.dtype or (config.torch_dtype if config.torch_dtype in LOAD_DTYPES else torch.float16)
    group_size = args.group_size if args.quant else ((q.group_size or 128) if q is not None else 128)
    check_memory(
        config,
        args,
        dtype,
        quant=args.quant or ("int4" if q is not None else None),
        group_size=min(group_size, 128),
        quant_head=args.quant_head or bool(q and q.quant_head),
    )


def load(
    path: Union[str, "os.PathLike[str]"],
    device=None,
    dtype=None,
    max_seq_len: Union[None, int, str] = None,
    max_batch: int = 1,
    ntk_mode: str = "hf",
    progress: bool = True,
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
    cuda_graph: bool = True,
    kv_cache: Optional[str] = None,
    check_weights: bool = False,
) -> LLM:
    """Load an InternLM2/2.5 (or Llama-family) checkpoint directory, or a llama-architecture
    GGUF file (see weights/gguf.py; there dtype None means float32 on the CPU and float16
    on CUDA).

    device: None means CUDA when available, else the CPU. dtype: None means the
    checkpoint's (float16/bfloat16; float32 runs on the CPU only). max_seq_len: the KV
    cache length per sequence, default min(max_position_embeddings, 32768) on CUDA and
    min(max_position_embeddings, 4096) on the CPU; "auto" takes the longest context that
    fits the free memory (memory_plan.py; a size that does not fit is refused with the
    numbers and what would fit, before the cache is allocated). max_batch: KV-cache slots, i.e. how
    many prompts one generate call can take. ntk_mode: "hf" or "fixed" (llm.py).

    quant: None keeps the checkpoint's weights (a pre-quantized AWQ, GPTQ or
    `fastinternlm quantize` checkpoint loads as int4 by itself); "int4" quantizes every
    decoder-layer linear round-to-nearest, asymmetric, group_size (32, 64 or 128) input
    channels per group, tensor by tensor while loading. The output head stays in the
    activation dtype unless quant_head=True; embeddings and norms always do.

    cuda_graph: on CUDA, replay each decode step as a captured CUDA graph (one per batch
    size, captured on first use); False runs every kernel eagerly from Python (the same
    tokens, much more host time per token).

    kv_cache: None (the activation dtype), "int8" or "int4": a quantized KV cache
    (attention.h documents the format). check_weights: scan every weight for NaN/Inf
    after loading and name the first bad tensor (model.NonFiniteWeightError).

    Everything is checked before any tensor is read, in this order: the arguments; the
    path (exists; a folder with config.json, or a GGUF file); the config; the tokenizer;
    every weight file's headers against the config."""
    args = check_load_args(
        device=device,
        dtype=dtype,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        ntk_mode=ntk_mode,
        quant=quant,
        group_size=group_size,
        quant_head=quant_head,
        cuda_graph=cuda_graph,
        progress=progress,
        kv_cache=kv_cache,
        check_weights=check_weights,
    )
    built = dict(
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        ntk_mode=args.ntk_mode,
        cuda_graph=args.cuda_graph,
        kv_cache=args.kv_cache,
        check_weights=args.check_weights,
    )
    if detect_format(path) == GGUF:
        if quant is not None:
            raise ValueError(
                "quant applies to checkpoint directories; a GGUF file's Q4_0/Q4_1 tensors load as int4 by themselves"
            )
        config, tokenizer, template, weights = gguf.read_gguf(path, args)
        return build(config, weights, tokenizer, stop_ids=gguf.stop_ids(tokenizer), chat_template=template, **built)
    path = os.fspath(path)
    config = hf.load_config(path)
    tokenizer = hf.read_tokenizer(path)
    _check_memory(config, args)
    # A tokenizer.json checkpoint brings its own chat format (tokenizer_config.json's template).
    template = ChatTemplate(tokenizer.chat_template, tokenizer) if getattr(tokenizer, "chat_template", None) else None
    config, weights = hf.read_weights(path, config, args)
    return build(config, weights, tokenizer, chat_template=template, **built)


__all__ = ["CheckpointError", "build", "build_model", "load"]
