"""python -m fastinternlm.bench e2e: whole-model speed on InternLM2.5-7B shapes with random
weights built on the device (no checkpoint, no download), fastinternlm next to two
baselines on the same weight tensors, in one run:

- ours: fastinternlm's Transformer, decode steps replayed from a captured CUDA graph
  (cuda_graph.DecodeGraph), fp16 and int4 g128 (decoder linears quantized on the device by
  ops.quantize_int4; the output head stays fp16);
- HF: transformers' LlamaForCausalLM with the same shapes (SDPA, StaticCache, eager
  generate-style decode loop), its parameters set to our tensors (q/k/v split out of the
  grouped wqkv, gate/up as row views of w13), fp16 only;
- torch: a gpt-fast-style plain-torch decoder (torch_ref.py) on the same weights, its
  decode step captured in a CUDA graph; int4 through tinygemm (torch._weight_int4pack_mm).

Measured (CUDA events, warm-up first, median of repetitions): batch-1 decode tokens/s at
several contexts (the KV cache holds random values, the sequence's position = context; one
step = graph replay, greedy argmax, position + 1, the new token copied to the host), ours
eager once, time to first token of a prompt (prefill + last row's logits + argmax +
.item()), and decode throughput at larger batches. Each section is wrapped: a failure
prints one line and the run goes on; --time-budget stops starting new sections.

`--kv-cache fp16,int8,int4` runs the long-context mode instead (ours only: the baselines
have no quantized cache): for each weight precision, cache type and context, a model whose
cache holds exactly that context (+ the decode steps) is built, its cache filled, and
batch-1 decode measured with the bandwidth limit (bytes read per token: weights + cache
rows incl. their (scale, zero) parameters, over the copy bandwidth measured in the same
run), the share of it reached and the peak memory. The cache is written directly (random
rows: codes and parameters for a quantized cache), so decode runs at any context in
seconds; `--prefill N` prefills contexts up to N tokens for real, chunk by chunk as LLM
does, and reports that as time to first token. A context the memory plan refuses is
reported with the plan's message (memory_plan.py) instead of reaching the allocator.

`--shapes tiny --device cpu` runs a 2-layer toy model eagerly on the CPU (what the test uses)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import memory_plan, ops
from ..config import INTERNLM2, ModelConfig, RopeScaling
from ..memory_plan import MemoryPlanError
from ..sequence import prefill_chunk, prefill_progress
from ..model import Layer, Transformer
from ..weights import build_model
from ..weights.layout import split_wqkv
from ..weights.synthetic import quantize_linears, random_weights
from ._harness import copy_bandwidth, measure

SHAPES = {
    # InternLM2.5-7B; dynamic NTK factor 2.5 so positions past 32K take a scaled base.
    "7b": dict(
        vocab_size=92544,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=1e6,
        ntk_factor=2.5,
        max_position_embeddings=32768,
        contexts=[128, 2048, 8192, 32768],
        kv_contexts=[4096, 32768, 131072, 1048576],
        batches=[4, 16],
        batch_context=2048,
        prompt=2048,
        steps=32,
    ),
    # Small enough for the CPU; max_position_embeddings 128 so the last context exercises NTK.
    "tiny": dict(
        vocab_size=1000,
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=512,
        rope_theta=1e6,
        ntk_factor=2.5,
        max_position_embeddings=128,
        contexts=[16, 160],
        kv_contexts=[16, 160, 1024],
        batches=[2, 4],
        batch_context=32,
        prompt=48,
        steps=4,
    ),
}
GROUP_SIZE = 128
IMPLS = ("ours", "hf", "torch")


def make_config(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(
        architecture=INTERNLM2,
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        num_kv_heads=s["num_kv_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        rms_norm_eps=1e-5,
        rope_theta=s["rope_theta"],
        rope_scaling=RopeScaling("dynamic", s["ntk_factor"]),
        max_position_embeddings=s["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype=torch.float16,
    )


class Weights:
    """Random fp16 weights on the device (weights.synthetic) and their int4 g128 twin,
    sharing embeddings, norms and head; models are built by weights.build_model, as load
    builds them."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float16, seed: int = 0):
        self.config = config
        self.fp16 = random_weights(config, device, dtype, seed)
        self.int4 = None
        self.tok_embeddings, self.norm, self.output = self.fp16.tok_embeddings, self.fp16.norm, self.fp16.output
        self.layers = self.fp16.layers
        self.int4_layers: Optional[List[Layer]] = None

    def quantize(self, group_size: int = GROUP_SIZE) -> None:
        self.int4 = quantize_linears(self.fp16, group_size)
        self.int4_layers = self.int4.layers

    def layers_for(self, precision: str) -> List[Layer]:
        if precision == "int4":
            if self.int4_layers is None:
                self.quantize()
            return self.int4_layers
        if self.layers is None:
            raise RuntimeError("the fp16 linears were dropped (drop_fp16_linears) after quantizing")
        return self.layers

    def drop_fp16_linears(self) -> None:
        """Free the fp16 decoder linears once the int4 twin exists (embeddings, norms and
        head are shared): 7B's 13 GB of fp16 linears would otherwise sit beside the cache."""
        if self.int4 is None:
            self.quantize()
        self.fp16 = None
        self.layers = None

    def resident_bytes(self) -> int:
        """Bytes of every weight tensor held now (shared ones once; both twins while both exist)."""
        held = {id(t): t for m in (self.fp16, self.int4) if m is not None for _, t in m.named_tensors()}
        return sum(t.nbytes if isinstance(t, ops.Int4Weight) else t.numel() * t.element_size() for t in held.values())

    def model(self, precision: str, max_batch: int, max_seq: int, kv_cache: Optional[str] = None) -> Transformer:
        """A Transformer on these tensors (shared, never copied) with its own KV cache
        (kv_cache None: the activation dtype). Raises MemoryPlanError, before allocating
        the cache, when it does not fit the free memory."""
        self.layers_for(precision)
        return build_model(
            self.config,
            self.int4 if precision == "int4" else self.fp16,
            max_batch=max_batch,
            max_seq_len=max_seq,
            kv_cache=kv_cache,
        )

    def weight_bytes(self, precision: str) -> int:
        """Bytes one decode step reads from weights: decoder linears + output head."""
        total = self.output.numel() * self.output.element_size()
        for l in self.layers_for(precision):
            for w in (l.wqkv, l.wo, l.w13, l.w2):
                total += w.nbytes if isinstance(w, ops.Int4Weight) else w.numel() * w.element_size()
        return total


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def bases_function(config: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """positions -> float32 bases, as LLM's "hf" NTK mode computes them (L = position + 1)."""
    args = config.ntk_args
    return lambda positions: ops.ntk_bases(positions + 1, *args)


def prompt_base(config: ModelConfig, length: int) -> float:
    theta, factor, max_position_embeddings, head_dim = config.ntk_args
    return ops.ntk_base(theta, factor, max_position_embeddings, length, head_dim)


# ---- ours --------------------------------------------------------------------------------


def fill_cache(tensors) -> None:
    for t in tensors:
        t.normal_()


def ours_decode_rate(model: Transformer, batch: int, context: int, steps: int, reps: int, graph=None) -> float:
    """tokens/s of the real per-token loop: (graph replay | eager decode) -> argmax ->
    positions += 1 -> the new tokens to the host."""
    dev, c = model.device, model.config
    slots = torch.arange(batch, dtype=torch.int32, device=dev)
    positions = torch.full((batch,), context, dtype=torch.int32, device=dev)
    first = torch.randint(0, c.vocab_size, (batch,), device=dev)
    bases_for = bases_function(c)

    def setup():
        positions.fill_(context)

    def loop():
        tokens = first
        for _ in range(steps):
            if graph is not None:
                logits = graph.run(tokens, slots, positions)
            else:
                logits = model.decode(tokens, slots, positions, bases_for(positions))
            tokens = logits.argmax(-1)
            positions.add_(1)
            tokens.cpu()

    return batch * steps / measure(loop, dev, reps, setup=setup)


def ours_ttft(model: Transformer, prompt: int, reps: int) -> float:
    """Seconds: chunked prefill of `prompt` tokens (as LLM does) + last row's logits +
    argmax + .item()."""
    dev, c = model.device, model.config
    tokens = torch.randint(0, c.vocab_size, (prompt,), device=dev)
    base = prompt_base(c, prompt)

    def run():
        hidden = None
        chunk = prefill_chunk(model.device)
        for start in range(0, prompt, chunk):
            hidden = model.prefill(tokens[start : start + chunk], 0, start, base)
        model.logits(hidden[-1:]).argmax(-1).item()

    return measure(run, dev, reps)


def ours_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits of every position of one prompt (slot 0)."""
    base = prompt_base(model.config, tokens.shape[0])
    chunk = prefill_chunk(model.device)
    out = [model.logits(model.prefill(tokens[s : s + chunk], 0, s, base)) for s in range(0, tokens.shape[0], chunk)]
    return torch.cat(out)


# ---- HF transformers ---------------------------------------------------------------------


def hf_config(config: ModelConfig):
    """(LlamaConfig, rope description): dynamic NTK when the installed version takes it."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    factor = config.rope_scaling.factor if config.rope_scaling else None
    attempts = []
    if factor is not None:
        attempts += [
            (
                "dynamic",
                dict(
                    rope_theta=config.rope_theta,
                    rope_scaling={"rope_type": "dynamic", "type": "dynamic", "factor": factor},
                ),
            ),
            (
                "dynamic",
                dict(rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": config.rope_theta}),
            ),
        ]
    attempts.append(("plain", dict(rope_theta=config.rope_theta)))
    last = None
    for rope, extra in attempts:
        try:
            hfc = LlamaConfig(**kw, **extra)
            break
        except Exception as e:  # the installed version refuses this spelling
            last = e
    else:
        raise last
    hfc._attn_implementation = "sdpa"
    return hfc, rope


def build_hf(weights: Weights):
    """LlamaForCausalLM whose parameters are our tensors (q/k/v split out of the grouped
    wqkv: the only copies). Returns (model, LlamaConfig, rope description)."""
    import transformers
    from transformers import LlamaForCausalLM

    c = weights.config
    dev = weights.tok_embeddings.device
    hfc, rope = hf_config(c)
    # Built on the meta device: no 15 GB of host-side random init that we would replace anyway.
    with torch.device("meta"):
        try:
            model = LlamaForCausalLM(hfc)
        except TypeError:
            model = LlamaForCausalLM._from_config(hfc, attn_implementation="sdpa")

    def param(t):
        return torch.nn.Parameter(t, requires_grad=False)

    m = model.model
    m.embed_tokens.weight = param(weights.tok_embeddings)
    m.norm.weight = param(weights.norm)
    model.lm_head.weight = param(weights.output)
    f = c.intermediate_size
    for hl, lw in zip(m.layers, weights.layers):
        q, k, v = split_wqkv(lw.wqkv, c)
        a = hl.self_attn
        a.q_proj.weight, a.k_proj.weight, a.v_proj.weight = param(q), param(k), param(v)
        a.o_proj.weight = param(lw.wo)
        hl.mlp.gate_proj.weight = param(lw.w13[:f])
        hl.mlp.up_proj.weight = param(lw.w13[f:])
        hl.mlp.down_proj.weight = param(lw.w2)
        hl.input_layernorm.weight = param(lw.attention_norm)
        hl.post_attention_layernorm.weight = param(lw.ffn_norm)
    # Rotary modules hold computed buffers (inv_freq): rebuild them on the device.
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            try:
                new = type(mod)(config=hfc, device=dev)
            except TypeError:  # transformers 5 takes no device argument: build it under one
                with torch.device(dev):
                    new = type(mod)(config=hfc)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            rope_type = getattr(new, "rope_type", None)
            if rope_type is not None and rope_type != "dynamic":
                rope = f"plain ({rope_type})"
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"HF model tensors left on meta: {left[:3]}")
    try:
        model.config._attn_implementation = "sdpa"
    except Exception:
        pass
    model.eval()
    return model, hfc, rope, transformers.__version__


def hf_static_cache(hfc, batch: int, max_len: int, device, dtype):
    from transformers import StaticCache

    attempts = [
        dict(config=hfc, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype),
        dict(config=hfc, batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype),
        dict(config=hfc, max_cache_len=max_len),
    ]
    last = None
    for kw in attempts:
        try:
            return StaticCache(**kw)
        except TypeError as e:
            last = e
    raise last


def hf_cache_tensors(cache) -> Optional[list]:
    layers = getattr(cache, "layers", None)
    if layers and all(getattr(l, "keys", None) is not None for l in layers):
        return [l.keys for l in layers] + [l.values for l in layers]
    if getattr(cache, "key_cache", None):
        return list(cache.key_cache) + list(cache.value_cache)
    return None


def hf_forward(model, tokens, cache, cache_position, **kw):
    b = tokens.shape[0]
    return model(
        input_ids=tokens,
        past_key_values=cache,
        cache_position=cache_position,
        position_ids=cache_position[None].expand(b, -1),
        use_cache=True,
        **kw,
    )


def hf_prepared_cache(model, hfc, batch: int, context: int, max_len: int, device, chunk: int = 2048):
    """A StaticCache whose first `context` positions hold random keys/values: written
    directly when the version exposes its tensors (after one step that allocates them),
    else by a real prefill of random tokens through the base model (no lm_head), in chunks."""
    cache = hf_static_cache(hfc, batch, max_len, device, torch.float16)
    tok = torch.randint(0, hfc.vocab_size, (batch, 1), device=device)
    hf_forward(model, tok, cache, torch.zeros(1, dtype=torch.long, device=device))
    tensors = hf_cache_tensors(cache)
    if tensors:
        fill_cache(tensors)
        return cache, "written"
    for s in range(0, context, chunk):
        n = min(chunk, context - s)
        ids = torch.randint(0, hfc.vocab_size, (batch, n), device=device)
        hf_forward(model.model, ids, cache, torch.arange(s, s + n, device=device))
    return cache, "prefilled"


def hf_decode_rate(model, cache, batch: int, context: int, steps: int, reps: int, device) -> float:
    cp = torch.full((1,), context, dtype=torch.long, device=device)
    first = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def setup():
        cp.fill_(context)

    def loop():
        tokens = first
        for _ in range(steps):
            out = hf_forward(model, tokens, cache, cp)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            cp.add_(1)
            tokens.cpu()

    return batch * steps / measure(loop, device, reps, setup=setup)


def hf_last_logits(model, tokens):
    """Forward of a prompt [1, T] as generate() prefills it by default (a fresh DynamicCache),
    keeping only the last row's logits when the version can."""
    for kw in ({"logits_to_keep": 1}, {"num_logits_to_keep": 1}, {}):
        try:
            return model(input_ids=tokens, use_cache=True, **kw).logits[:, -1]
        except TypeError:
            continue
    raise RuntimeError("unreachable")


def hf_ttft(model, hfc, prompt: int, reps: int, device) -> float:
    """HF's prefill through its default DynamicCache: a StaticCache prefill of 2048 tokens
    failed inside cuDNN's SDPA on the H100 (2026-11-26)."""
    tokens = torch.randint(0, hfc.vocab_size, (1, prompt), device=device)

    def run():
        hf_last_logits(model, tokens).argmax(-1).item()

    return measure(run, device, reps)


# ---- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.start = time.perf_counter()
        self.deadline = self.start + args.time_budget
        self.rows: Dict[tuple, Dict[str, Any]] = {}
        self.errors: List[Dict[str, str]] = []
        self.skipped: List[str] = []
        self.checks: Dict[str, Any] = {}
        self.info: Dict[str, Any] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", flush=True)

    def section(self, name: str, fn: Callable[[], Any], *, always: bool = False) -> Any:
        """Run fn; a failure prints one line and returns None. Past the time budget the
        section is skipped (unless `always`)."""
        if not always and time.perf_counter() > self.deadline:
            self.skipped.append(name)
            self.log(f"skip {name} (time budget {self.args.time_budget:.0f}s spent)")
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every section must let the run go on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self.errors.append({"section": name, "error": f"{type(e).__name__}: {first}"})
            self.log(f"FAILED {name}: {type(e).__name__}: {first}")
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:
                    pass
                torch.cuda.empty_cache()
            return None

    def record(self, metric: str, precision: str, setting: str, impl: str, value: float, unit: str, **extra) -> None:
        key = (metric, precision, setting)
        row = self.rows.setdefault(
            key,
            {"metric": metric, "precision": precision, "setting": setting, "unit": unit, **{i: None for i in IMPLS}},
        )
        row[impl] = value
        row.update(extra)
        self.log(f"{impl:<5} {precision:<4} {metric} {setting}: {value:.4g} {unit}")

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_ours(bench: Bench, w: Weights, precision: str, contexts: List[int], steps: int, reps: int) -> None:
    dev, c, args = bench.device, w.config, bench.args
    max_seq = max(contexts + [args.prompt]) + steps + 8
    model = bench.section(f"ours {precision} model", lambda: w.model(precision, 1, max_seq))
    if model is None:
        return
    bench.section(f"ours {precision} cache fill", lambda: fill_cache(model.k_cache + model.v_cache))
    graph = None
    if dev.type == "cuda":
        from ..cuda_graph import DecodeGraph

        graph = bench.section(f"ours {precision} graph capture", lambda: DecodeGraph(model, 1, bases_function(c)))
        if graph is not None:
            bench.log(
                f"ours {precision} decode graph captured, programmatic launch "
                f"{'on' if graph.programmatic_launch else 'off'}"
            )
            bench.info[f"ours_{precision}_graph_pdl"] = graph.programmatic_launch
    for ctx in contexts:
        bench.section(
            f"ours {precision} decode b1 ctx {ctx}",
            lambda: bench.record(
                "decode tok/s",
                precision,
                f"b1 ctx {ctx}",
                "ours",
                ours_decode_rate(model, 1, ctx, steps, reps, graph),
                "tok/s",
                graph=graph is not None,
            ),
        )
    if precision == "int4" and dev.type == "cuda" and graph is not None:
        # What programmatic dependent launch buys: the same step captured with it off.
        from .. import _C

        ctx = args.eager_context

        def without_pdl():
            _C.set_programmatic_launch(False)
            try:
                off = DecodeGraph(model, 1, bases_function(c))
            finally:
                _C.set_programmatic_launch(True)
            return ours_decode_rate(model, 1, ctx, steps, reps, off)

        bench.section(
            f"ours int4 decode without PDL ctx {ctx}",
            lambda: bench.record("decode tok/s (no PDL)", precision, f"b1 ctx {ctx}", "ours", without_pdl(), "tok/s"),
        )
    if precision == "fp16" and dev.type == "cuda":
        ctx = args.eager_context
        bench.section(
            f"ours fp16 eager decode ctx {ctx}",
            lambda: bench.record(
                "decode tok/s (eager)",
                precision,
                f"b1 ctx {ctx}",
                "ours",
                ours_decode_rate(model, 1, ctx, steps, reps, None),
                "tok/s",
            ),
        )
    bench.section(
        f"ours {precision} TTFT {args.prompt}",
        lambda: bench.record(
            "TTFT ms", precision, f"prompt {args.prompt}", "ours", 1e3 * ours_ttft(model, args.prompt, reps), "ms"
        ),
    )
    del graph, model
    bench.free()


def run_ours_batches(bench: Bench, w: Weights, precisions: List[str], steps: int, reps: int) -> None:
    args, dev = bench.args, bench.device
    if not args.batches:
        return
    ctx = args.batch_context
    max_seq = ctx + steps + 8
    big = bench.section("ours batch model", lambda: w.model(precisions[0], max(args.batches), max_seq))
    if big is None:
        return
    fill_cache(big.k_cache + big.v_cache)
    for precision in precisions:
        model = (
            big
            if precision == precisions[0]
            else bench.section(f"ours {precision} batch model", lambda: w.model(precision, 1, 2))
        )
        if model is None:
            continue
        if model is not big:  # share the KV cache: one 4 GB cache for both precisions
            model.k_cache, model.v_cache = big.k_cache, big.v_cache
            model.max_batch, model.max_seq_len = big.max_batch, big.max_seq_len
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        for b in args.batches:

            def one(b=b):
                graph = None
                if dev.type == "cuda":
                    from ..cuda_graph import DecodeGraph

                    graph = DecodeGraph(model, b, bases_function(w.config), pool)
                bench.record(
                    "decode tok/s",
                    precision,
                    f"b{b} ctx {ctx}",
                    "ours",
                    ours_decode_rate(model, b, ctx, steps, reps, graph),
                    "tok/s",
                )

            bench.section(f"ours {precision} decode b{b}", one)
    del big, model
    bench.free()


def run_torch(
    bench: Bench,
    w: Weights,
    precision: str,
    contexts: List[int],
    steps: int,
    reps: int,
    reference_logits: Optional[torch.Tensor],
    check_tokens: Optional[torch.Tensor],
) -> None:
    from . import torch_ref

    dev, args, c = bench.device, bench.args, w.config
    int4 = precision == "int4"
    if int4 and not torch_ref.tinygemm_available(dev):
        bench.log(f"torch int4: tinygemm is not available on {dev.type}; skipped")
        return

    def build(max_batch, max_seq, layers=None):
        if layers is None:
            return torch_ref.build_torch_model(
                c,
                w.tok_embeddings,
                w.layers_for(precision),
                w.norm,
                w.output,
                int4=int4,
                max_batch=max_batch,
                max_seq=max_seq,
                attention=args.torch_attention,
            )
        return torch_ref.TorchModel(
            c,
            w.tok_embeddings,
            layers,
            w.norm,
            w.output,
            dtype=layers_dtype,
            max_batch=max_batch,
            max_seq=max_seq,
            attention=args.torch_attention,
        )

    layers_dtype = torch.bfloat16 if int4 else torch.float16
    first = bench.section(f"torch {precision} build", lambda: build(1, args.prompt + 8))
    if first is None:
        return
    layers = first.layers  # converted once (tinygemm), shared by every cache size below
    if reference_logits is not None:

        def check():
            t = check_tokens
            logits = first.logits(first.forward(t[None], torch.arange(t.shape[0], device=dev)))[0]
            rel = _rel(logits, reference_logits[precision])
            bench.checks[f"torch_{precision}_logits_rel_vs_ours"] = rel
            bench.log(f"check: torch {precision} logits vs ours, max rel diff {rel:.3g}")

        bench.section(f"torch {precision} logits check", check)

    def decode_rate(model, b, ctx):
        fill_cache(model.k_cache + model.v_cache)
        tokens0 = torch.randint(0, c.vocab_size, (b,), device=dev)
        pos = torch.full((1,), ctx, dtype=torch.int64, device=dev)
        graph = torch_ref.TorchDecodeGraph(model, b) if dev.type == "cuda" else None

        def setup():
            pos.fill_(ctx)

        def loop():
            tokens = tokens0
            for _ in range(steps):
                logits = graph.run(tokens, pos) if graph is not None else model.decode(tokens, pos)
                tokens = logits.argmax(-1)
                pos.add_(1)
                tokens.cpu()

        return b * steps / measure(loop, dev, reps, setup=setup)

    for ctx in contexts:

        def one(ctx=ctx):
            # The cache sized to the request (gpt-fast sizes it to prompt + new tokens): the
            # masked SDPA reads the whole cache, so a 32K cache would slow short contexts.
            model = build(1, ctx + steps + 8, layers)
            try:
                bench.record(
                    "decode tok/s",
                    precision,
                    f"b1 ctx {ctx}",
                    "torch",
                    decode_rate(model, 1, ctx),
                    "tok/s",
                    torch_graph=dev.type == "cuda",
                )
            finally:
                del model
                bench.free()

        bench.section(f"torch {precision} decode b1 ctx {ctx}", one)

    def ttft():
        model = first
        tokens = torch.randint(0, c.vocab_size, (1, args.prompt), device=dev)
        pos = torch.arange(args.prompt, device=dev)

        def run():
            hidden = model.forward(tokens, pos)
            model.logits(hidden[:, -1]).argmax(-1).item()

        bench.record("TTFT ms", precision, f"prompt {args.prompt}", "torch", 1e3 * measure(run, dev, reps), "ms")

    bench.section(f"torch {precision} TTFT", ttft)
    del first
    bench.free()

    if args.batches:

        def batches():
            ctx = args.batch_context
            model = build(max(args.batches), ctx + steps + 8, layers)
            try:
                for b in args.batches:
                    bench.section(
                        f"torch {precision} decode b{b}",
                        lambda: bench.record(
                            "decode tok/s", precision, f"b{b} ctx {ctx}", "torch", decode_rate(model, b, ctx), "tok/s"
                        ),
                    )
            finally:
                del model
                bench.free()

        bench.section(f"torch {precision} batches", batches)
    del layers
    bench.free()


def run_hf(
    bench: Bench,
    w: Weights,
    contexts: List[int],
    steps: int,
    reps: int,
    reference_logits: Optional[Dict[str, torch.Tensor]],
    check_tokens: Optional[torch.Tensor],
) -> None:
    dev, args = bench.device, bench.args
    built = bench.section("hf build", lambda: build_hf(w))
    if built is None:
        return
    model, hfc, rope, version = built
    bench.info["hf_rope"] = rope
    if dev.type == "cuda":
        # cuDNN's SDPA backend failed on HF's 2048-token prefill on the H100 (2026-11-26, torch
        # 2.11) and left the CUDA context broken; flash / memory-efficient SDPA serve HF here.
        torch.backends.cuda.enable_cudnn_sdp(False)
        bench.info["hf_sdpa_cudnn"] = False
    bench.log(f"HF LlamaForCausalLM built (transformers {version}, rope {rope}, sdpa, static cache, eager)")
    if args.hf_compile:

        def compile_():
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
            bench.info["hf_compile"] = True

        bench.section("hf compile", compile_)
    if reference_logits is not None:

        def check():
            t = check_tokens[None]
            logits = model(input_ids=t, use_cache=False).logits[0].float()
            rel = _rel(logits, reference_logits["fp16"])
            bench.checks["hf_fp16_logits_rel_vs_ours"] = rel
            bench.log(f"check: HF fp16 logits vs ours, max rel diff {rel:.3g}")

        bench.section("hf logits check", check)
    hf_steps = args.hf_steps or steps
    for ctx in contexts:

        def one(ctx=ctx):
            cache, how = hf_prepared_cache(model, hfc, 1, ctx, ctx + hf_steps + 8, dev)
            try:
                bench.record(
                    "decode tok/s",
                    "fp16",
                    f"b1 ctx {ctx}",
                    "hf",
                    hf_decode_rate(model, cache, 1, ctx, hf_steps, args.hf_reps, dev),
                    "tok/s",
                    hf_cache=how,
                )
            finally:
                del cache
                bench.free()

        bench.section(f"hf decode b1 ctx {ctx}", one)
    bench.section(
        "hf TTFT",
        lambda: bench.record(
            "TTFT ms",
            "fp16",
            f"prompt {args.prompt}",
            "hf",
            1e3 * hf_ttft(model, hfc, args.prompt, args.hf_reps, dev),
            "ms",
        ),
    )
    for b in args.batches:

        def one(b=b):
            ctx = args.batch_context
            cache, how = hf_prepared_cache(model, hfc, b, ctx, ctx + hf_steps + 8, dev)
            try:
                bench.record(
                    "decode tok/s",
                    "fp16",
                    f"b{b} ctx {ctx}",
                    "hf",
                    hf_decode_rate(model, cache, b, ctx, hf_steps, args.hf_reps, dev),
                    "tok/s",
                )
            finally:
                del cache
                bench.free()

        bench.section(f"hf decode b{b}", one)
    del model, built
    bench.free()


# ---- long context: KV cache types (--kv-cache) -------------------------------------------

KV_CACHES = ("fp16", "int8", "int4")


def fill_kv_cache(model: Transformer) -> None:
    """Random rows in every cache array, without running the model (the kernels read every
    byte the same way whatever the values): a float cache N(0, 1); a quantized one random
    codes, each row's (scale, zero) drawn so that it spans about what an N(0, 1) row of
    head_dim values spans: zero in [-2, -1.5], (2^bits - 1) * scale in [3, 4]."""
    for c in model.k_cache + model.v_cache:
        if isinstance(c, ops.QuantizedKV):
            c.codes.random_(0, 256)
            c.params[..., 0].uniform_(3.0, 4.0).div_((1 << c.bits) - 1)
            c.params[..., 1].uniform_(-2.0, -1.5)
        else:
            fill_cache([c])


def prefill_ttft(model: Transformer, context: int) -> float:
    """Seconds of one real prefill of `context` random tokens into slot 0, chunk by chunk
    as LLM runs a prompt (the rotary base of the whole prompt), + the last row's logits,
    argmax and .item(); the cache then holds the prompt. One chunk runs first, untimed
    (first-call costs); progress on stderr for prompts that take seconds."""
    dev, c = model.device, model.config
    tokens = torch.randint(0, c.vocab_size, (context,), device=dev)
    base = prompt_base(c, context)
    chunk = prefill_chunk(dev)
    model.prefill(tokens[:chunk], 0, 0, base)
    progress = prefill_progress(context, dev)

    def run():
        hidden = None
        for start in range(0, context, chunk):
            hidden = model.prefill(tokens[start : start + chunk], 0, start, base)
            if progress is not None:
                progress.update(min(start + chunk, context))
        model.logits(hidden[-1:]).argmax(-1).item()

    return measure(run, dev, 1, warmup=0)


def process_rss() -> int:
    """Resident bytes of this process now (Linux: /proc/self/statm; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_step_bytes(w: Weights, precision: str, kv_cache: str, context: int, steps: int) -> float:
    """Bytes one decode step reads, averaged over `steps` steps from position `context`:
    the weights (decoder linears + head) and the cache rows up to the position, their
    (scale, zero) parameters included (a step at position p reads p + 1 rows)."""
    per_token = memory_plan.kv_bytes_per_token(memory_plan.ModelShape.from_config(w.config), kv_cache)
    return w.weight_bytes(precision) + per_token * (context + (steps + 1) / 2)


def run_kv_case(bench: Bench, w: Weights, precision: str, kv: str, ctx: int, bandwidth: Optional[float]) -> None:
    """One row: a model whose cache holds ctx + steps tokens, filled (written or prefilled),
    then batch-1 decode from position ctx; a context the memory plan refuses is recorded
    with the plan's message."""
    dev, args, c = bench.device, bench.args, w.config
    row: Dict[str, Any] = {
        "metric": "decode tok/s",
        "precision": precision,
        "kv_cache": kv,
        "context": ctx,
        "setting": f"b1 ctx {ctx}",
        "unit": "tok/s",
        "ours": None,
        "ttft_s": None,
        "fill": None,
        "refused": None,
    }
    bench.rows[(precision, kv, ctx)] = row
    bench.free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        model = w.model(precision, 1, ctx + args.steps + 8, kv_cache=kv)
    except MemoryPlanError as e:
        row["refused"] = str(e)
        bench.log(f"ours {precision:<4} {kv} cache ctx {ctx}: refused by the memory plan: {e}")
        return
    graph = None
    try:
        if args.prefill and ctx <= args.prefill:
            row["ttft_s"], row["fill"] = prefill_ttft(model, ctx), "prefilled"
            bench.log(f"ours {precision:<4} {kv} cache TTFT prompt {ctx}: {row['ttft_s']:.3f} s")
        else:
            fill_kv_cache(model)
            row["fill"] = "written"
        if dev.type == "cuda":
            from ..cuda_graph import DecodeGraph

            graph = DecodeGraph(model, 1, bases_function(c))
        row["ours"] = ours_decode_rate(model, 1, ctx, args.steps, args.reps, graph)
        row["graph"] = graph is not None
        if dev.type == "cuda":
            row["peak_memory_bytes"], row["memory_measure"] = torch.cuda.max_memory_allocated(dev), "cuda allocated"
        else:
            row["peak_memory_bytes"], row["memory_measure"] = process_rss(), "process RSS"
        plan = model.memory_plan
        step = kv_step_bytes(w, precision, kv, ctx, args.steps)
        row.update(
            weight_bytes=w.weight_bytes(precision),
            kv_bytes_per_token=memory_plan.kv_bytes_per_token(memory_plan.ModelShape.from_config(c), kv),
            bytes_per_token=step,
            cache_bytes=model.cache_bytes(),
            # What the plan predicts is allocated: the resident weights, the cache and the
            # activation workspace (its reserve is headroom, not an allocation).
            planned_bytes=w.resident_bytes() + plan.kv_cache_bytes + plan.workspace,
        )
        if bandwidth:
            row["limit"] = bandwidth / step
            row["pct_limit"] = 100 * row["ours"] / row["limit"]
        bench.log(
            f"ours {precision:<4} {kv} cache decode b1 ctx {ctx}: {row['ours']:.4g} tok/s"
            + (f" ({row['pct_limit']:.0f}% of {row['limit']:.4g})" if bandwidth else "")
            + f", peak {row['peak_memory_bytes'] / 1e9:.2f} GB ({row['memory_measure']})"
        )
    finally:
        del model, graph
        bench.free()


def _copy_bandwidth(bench: Bench, device: torch.device) -> Optional[float]:
    """The device's measured copy bandwidth (read + write, bytes/s): the ceiling each
    memory-bound row is reported against. Recorded in the JSON whatever it is."""
    bandwidth = bench.section("copy bandwidth", lambda: copy_bandwidth(device), always=True)
    if bandwidth:
        bench.log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    bench.info["copy_bandwidth"] = bandwidth
    return bandwidth


def run_kv(bench: Bench, args, device: torch.device) -> List[Dict[str, Any]]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bench.info.update(device=name, torch=torch.__version__, shapes=args.shapes, mode="kv-cache")
    print(
        f"fastinternlm e2e long-context benchmark: {name}, torch {torch.__version__}, shapes {args.shapes}, "
        f"KV caches {','.join(args.kv_cache)}, weights {','.join(args.precisions)}",
        flush=True,
    )
    torch.manual_seed(0)
    config = make_config(args.shapes)
    bandwidth = _copy_bandwidth(bench, device)
    w = bench.section("random weights", lambda: Weights(config, device), always=True)
    if w is None:
        return []
    # fp16 weights first: their linears are freed once quantized, so the int4 rows get the
    # memory a long cache needs (7B: 13 GB).
    for precision in [p for p in ("fp16", "int4") if p in args.precisions]:
        if precision == "int4":
            bench.section("int4 quantize", w.drop_fp16_linears, always=True)
            if w.int4 is None:
                break
        bench.info[f"weights_{precision}_resident_bytes"] = w.resident_bytes()
        bench.log(
            f"weights {precision}: {w.weight_bytes(precision) / 1e9:.2f} GB read per step, "
            f"{w.resident_bytes() / 1e9:.2f} GB resident"
        )
        for kv in args.kv_cache:
            for ctx in args.contexts:
                bench.section(
                    f"ours {precision} {kv} cache ctx {ctx}",
                    lambda: run_kv_case(bench, w, precision, kv, ctx, bandwidth),
                )
    bench.log(
        f"done in {time.perf_counter() - bench.start:.0f}s; {len(bench.errors)} failed, "
        f"{len(bench.skipped)} skipped sections"
    )
    return list(bench.rows.values())


def _cell(v, spec="{:.1f}") -> str:
    """A table cell: the value formatted, or "-" where there is none."""
    return "-" if v is None else spec.format(v)


def format_kv_table(rows: List[Dict[str, Any]]) -> str:
    f = _cell
    header = (
        f"{'weights':<7} {'cache':<5} {'context':>8} {'fill':<9} {'TTFT s':>8} {'tok/s':>9} {'limit':>9} "
        f"{'%limit':>6} {'MB/token':>9} {'peak GB':>8} {'plan GB':>8}"
    )
    lines = [header, "-" * len(header)]
    refused = []
    for r in rows:
        head = f"{r['precision']:<7} {r['kv_cache']:<5} {r['context']:>8} "
        if r.get("refused"):
            refused.append(f"  {r['precision']} weights, {r['kv_cache']} cache, context {r['context']}: {r['refused']}")
            lines.append(head + "refused by the memory plan (below)")
            continue
        mb, peak, planned = (r.get(k) for k in ("bytes_per_token", "peak_memory_bytes", "planned_bytes"))
        lines.append(
            head + f"{r['fill'] or '-':<9} {f(r['ttft_s'], '{:.3f}'):>8} {f(r['ours']):>9} {f(r.get('limit')):>9} "
            f"{f(r.get('pct_limit'), '{:.0f}%'):>6} {f(mb and mb / 1e6, '{:.2f}'):>9} "
            f"{f(peak and peak / 1e9, '{:.2f}'):>8} {f(planned and planned / 1e9, '{:.2f}'):>8}"
        )
    lines.append(
        "batch-1 decode; limit: tok/s if a step only read its bytes (weights + cache rows with their "
        "parameters) at the measured copy bandwidth; peak: CUDA max allocated (CPU: process RSS); plan: "
        "resident weights + cache + workspace as memory_plan.py counts them"
    )
    if refused:
        lines.append("refused:")
        lines.extend(refused)
    return "\n".join(lines)


# ---- report ------------------------------------------------------------------------------


def _batch_of(setting: str) -> Optional[int]:
    head = setting.split()[0]
    return int(head[1:]) if head.startswith("b") and head[1:].isdigit() else None


def _context_of(setting: str) -> Optional[int]:
    parts = setting.split()
    return int(parts[parts.index("ctx") + 1]) if "ctx" in parts else None


def add_limits(bench: Bench, w: Weights, bandwidth: Optional[float]) -> None:
    """Bandwidth limit of each decode row: weights read once + the KV cache at that
    context, per step, over the measured copy bandwidth; ours as % of it."""
    kv = kv_bytes_per_token(w.config)
    for row in bench.rows.values():
        b, ctx = _batch_of(row["setting"]), _context_of(row["setting"])
        if not row["metric"].startswith("decode") or b is None or ctx is None:
            continue
        try:
            wbytes = w.weight_bytes(row["precision"])
        except Exception:
            continue
        step_bytes = wbytes + b * kv * ctx
        row["bytes_per_step"] = step_bytes
        if bandwidth:
            row["limit"] = b * bandwidth / step_bytes
            if row.get("ours"):
                row["ours_pct_limit"] = 100 * row["ours"] / row["limit"]


def speed_ratio(row: Dict[str, Any], other: str) -> Optional[float]:
    """How many times faster ours is: ours/other for rates, other/ours for times."""
    a, b = row.get("ours"), row.get(other)
    if not a or not b:
        return None
    return b / a if row["unit"] == "ms" else a / b


def format_table(rows: List[Dict[str, Any]]) -> str:
    f = _cell
    header = (
        f"{'metric':<22} {'prec':<5} {'setting':<18} {'ours':>9} {'HF':>9} {'torch':>9} "
        f"{'ours/HF':>8} {'ours/torch':>10} {'limit':>8} {'%limit':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['metric']:<22} {r['precision']:<5} {r['setting']:<18} {f(r['ours']):>9} {f(r['hf']):>9} "
            f"{f(r['torch']):>9} {f(speed_ratio(r, 'hf'), '{:.2f}x'):>8} "
            f"{f(speed_ratio(r, 'torch'), '{:.2f}x'):>10} {f(r.get('limit')):>8} "
            f"{f(r.get('ours_pct_limit'), '{:.0f}%'):>7}"
        )
    lines.append(
        "ratios are speed-ups of ours (>1: ours faster; for TTFT: baseline ms / ours ms); limit: "
        "tok/s if every step only read weights + KV cache at the measured copy bandwidth"
    )
    return "\n".join(lines)


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _kv_caches(text: str) -> List[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in KV_CACHES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"KV cache types must be among {', '.join(KV_CACHES)}, got {text!r}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shapes", choices=sorted(SHAPES), default="7b")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--contexts",
        type=_ints,
        nargs="+",
        default=None,
        help="batch-1 decode contexts (space or comma separated; with --kv-cache default "
        + ", ".join(f"{k}: {','.join(map(str, v['kv_contexts']))}" for k, v in SHAPES.items())
        + ")",
    )
    p.add_argument(
        "--kv-cache",
        type=_kv_caches,
        nargs="+",
        default=None,
        help=f"long-context mode: these cache types ({', '.join(KV_CACHES)}; comma separated) x --contexts x "
        "--precisions (weights), ours only",
    )
    p.add_argument(
        "--prefill",
        type=int,
        nargs="?",
        const=-1,
        default=0,
        metavar="N",
        help="with --kv-cache: fill the cache of contexts up to N tokens (every context without N) by a real "
        "chunked prefill, timed as time to first token, instead of writing it directly",
    )
    p.add_argument("--batches", type=int, nargs="*", default=None, help="decode throughput batch sizes")
    p.add_argument("--batch-context", type=int, default=None, help="context of the batched decode rows")
    p.add_argument("--prompt", type=int, default=None, help="TTFT prompt length")
    p.add_argument("--eager-context", type=int, default=None, help="context of ours' eager decode row")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed loop")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median) after one warm-up")
    p.add_argument("--hf-steps", type=int, default=None, help="decode steps per HF loop (default --steps)")
    p.add_argument("--hf-reps", type=int, default=2, help="timed repetitions for HF (eager is slow)")
    p.add_argument("--precisions", nargs="+", choices=["fp16", "int4"], default=["fp16", "int4"])
    p.add_argument(
        "--torch-attention",
        choices=["auto", "sdpa", "grouped"],
        default="auto",
        help="torch baseline attention: SDPA with enable_gqa, or the G query heads of each KV "
        "head folded into query rows (no K/V repeat, whichever SDPA backend runs); auto: "
        "the faster of the two for one decode step at the largest context (CUDA; sdpa on "
        "the CPU)",
    )
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--hf-compile", action="store_true", help="torch.compile HF's forward (slow to compile)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=200.0,
        help="seconds after which no new section starts (the summary is still printed)",
    )
    p.add_argument("--json", default=None, help="also write everything to this file")
    p.add_argument(
        "--small-m-variant",
        type=int,
        default=None,
        help="CUDA: run our int4 GEMV (M <= 16) with this tuning variant, selected through the "
        "benchmarking hook fastinternlm._C._set_small_m_variant (see bench.int4_gemm_sweep)",
    )
    args = p.parse_args(argv)
    s = SHAPES[args.shapes]
    if args.contexts is not None:
        args.contexts = [c for group in args.contexts for c in group]
    if args.kv_cache is not None:
        args.kv_cache = list(dict.fromkeys(k for group in args.kv_cache for k in group))
        if args.contexts is None:
            args.contexts = list(s["kv_contexts"])
        if args.prefill == -1:
            args.prefill = max(args.contexts)
    elif args.prefill:
        p.error("--prefill applies to the long-context mode (--kv-cache)")
    for key in ("contexts", "batches", "batch_context", "prompt", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, s[key])
    if args.eager_context is None:
        args.eager_context = 2048 if 2048 in args.contexts else args.contexts[0]
    if any(c < 1 for c in args.contexts) or args.steps < 1 or args.prompt < 1:
        p.error("contexts, steps and prompt must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bench = Bench(args, device)
    with torch.inference_mode():
        try:
            rows = run_kv(bench, args, device) if args.kv_cache else run(bench, args, device)
        except Exception as e:  # noqa: BLE001 - still print what was measured
            bench.errors.append({"section": "run", "error": f"{type(e).__name__}: {e}"})
            bench.log(f"FAILED run: {type(e).__name__}: {str(e)[:300]}")
            rows = list(bench.rows.values())
    print(format_kv_table(rows) if args.kv_cache else format_table(rows))
    if args.json:
        out = {
            "info": bench.info,
            "args": vars(args),
            "checks": bench.checks,
            "errors": bench.errors,
            "skipped": bench.skipped,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def run(bench: Bench, args, device: torch.device) -> List[Dict[str, Any]]:
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception as e:  # noqa: BLE001
        tf_version = f"unavailable ({type(e).__name__})"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bench.info.update(device=name, torch=torch.__version__, transformers=tf_version, shapes=args.shapes)
    print(
        f"fastinternlm e2e benchmark: {name}, torch {torch.__version__}, transformers {tf_version}, "
        f"shapes {args.shapes}",
        flush=True,
    )
    torch.manual_seed(0)
    if args.small_m_variant is not None:
        from .. import _C

        _C._set_small_m_variant(args.small_m_variant)
        bench.log(f"int4 GEMV (M <= 16) variant {args.small_m_variant} selected (benchmarking hook)")
    bench.info["small_m_variant"] = 0 if args.small_m_variant is None else args.small_m_variant
    config = make_config(args.shapes)
    bandwidth = _copy_bandwidth(bench, device) if device.type == "cuda" else None
    bench.info["copy_bandwidth"] = bandwidth

    w = bench.section("random weights", lambda: Weights(config, device), always=True)
    if w is None:
        return []
    bench.log(f"weights fp16: {w.weight_bytes('fp16') / 1e9:.2f} GB per step")
    if "int4" in args.precisions:

        def quantize():
            w.quantize()
            bench.log(f"weights int4 g{GROUP_SIZE}: {w.weight_bytes('int4') / 1e9:.2f} GB per step")

        bench.section("int4 quantize", quantize, always=True)

    # Logits of one short prompt from ours: the baselines are checked against them, so each
    # is shown to compute the same function on the same weights.
    check_tokens = torch.randint(0, config.vocab_size, (16,), device=device)
    reference = {}
    for precision in args.precisions:

        def ref(precision=precision):
            model = w.model(precision, 1, 32)
            reference[precision] = ours_logits(model, check_tokens)

        bench.section(f"ours {precision} reference logits", ref, always=True)

    if "int4" in args.precisions and w.int4_layers is not None and not args.skip_torch:

        def tinygemm_check():
            from .torch_ref import check_tinygemm, tinygemm_available

            if not tinygemm_available(device):
                bench.checks["tinygemm_verified"] = None
                bench.log("tinygemm not available here: torch int4 baseline skipped")
                return
            rel = check_tinygemm(w.int4_layers[0].w13)
            ok = rel < 3e-2
            bench.checks.update(tinygemm_rel_vs_ours=rel, tinygemm_verified=ok)
            bench.log(
                f"check: tinygemm vs our int4_gemm on layer 0 w13: rel err {rel:.3g} "
                f"({'verified' if ok else 'MISMATCH: torch int4 rows are unverified'})"
            )

        bench.section("tinygemm check", tinygemm_check, always=True)

    for precision in args.precisions:
        run_ours(bench, w, precision, args.contexts, args.steps, args.reps)
    run_ours_batches(bench, w, args.precisions, args.steps, args.reps)
    if not args.skip_torch:
        if args.torch_attention == "auto":
            args.torch_attention = "sdpa"
            if device.type == "cuda":

                def pick():
                    from .torch_ref import pick_attention

                    mode, times = pick_attention(config, device, torch.float16, max(args.contexts))
                    args.torch_attention = mode
                    bench.checks["torch_attention_us"] = {k: 1e6 * v for k, v in times.items()}
                    bench.log(
                        "torch baseline attention at ctx %d: %s -> %s"
                        % (max(args.contexts), ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in times.items()), mode)
                    )

                bench.section("torch attention choice", pick)
        bench.info["torch_attention"] = args.torch_attention
        for precision in args.precisions:
            run_torch(bench, w, precision, args.contexts, args.steps, args.reps, reference or None, check_tokens)
    if not args.skip_hf:
        run_hf(bench, w, args.contexts, args.steps, args.reps, reference if "fp16" in reference else None, check_tokens)
    if bench.checks.get("tinygemm_verified") is False:
        for row in bench.rows.values():
            if row["precision"] == "int4" and row["torch"] is not None:
                row["torch_unverified"] = True
    add_limits(bench, w, bandwidth)
    if device.type == "cuda":
        bench.info["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        bench.log(f"peak GPU memory allocated: {bench.info['peak_memory_gb']:.1f} GB")
    bench.log(
        f"done in {time.perf_counter() - bench.start:.0f}s; {len(bench.errors)} failed, "
        f"{len(bench.skipped)} skipped sections"
    )
    return list(bench.rows.values())


if __name__ == "__main__":
    sys.exit(main())
