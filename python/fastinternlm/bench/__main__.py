"""python -m fastinternlm.bench kernels [--device cuda|cpu] [--dtype float16|bfloat16|float32] [--ops ...]
   python -m fastinternlm.bench accuracy [--tokens N] (see accuracy.py)
   python -m fastinternlm.bench e2e [--shapes 7b|tiny] [--contexts ...] (see e2e.py)
   python -m fastinternlm.bench serve [--clients N] [--rate R] [--shapes 7b|tiny] (see serve.py)

Times every kernel family on InternLM2.5-7B shapes (smaller ones on the CPU) next to the
torch way of doing the same thing, in the same run, and prints time, GB/s or TFLOP/s and
the speed-up over the baseline. On CUDA it first measures the card's device-to-device copy
bandwidth, the ceiling for these memory-bound kernels, and reports each kernel against it."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from ._harness import copy_bandwidth, format_table, matmul_rate, run_cases

FAMILIES = ["rms_norm", "rotary", "silu_and_mul", "attention", "int4_gemm"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["e2e"]:
        from .e2e import main as e2e_main

        return e2e_main(argv[1:])
    if argv[:1] == ["serve"] and "--http" in argv:  # the same closed loop through the HTTP server
        from .serve_http import main as serve_http_main

        return serve_http_main(argv[1:])
    if argv[:1] == ["serve"]:
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["accuracy"]:
        from .accuracy import main as accuracy_main

        return accuracy_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "suite",
        choices=["kernels", "accuracy", "e2e", "serve"],
        help="kernels: per-op timings; accuracy: SmolLM2 perplexity and speed vs HF "
        "(python -m fastinternlm.bench accuracy --help); e2e: whole-model speed on "
        "7B shapes vs HF and plain torch (python -m fastinternlm.bench e2e --help); serve: "
        "the engine under concurrent load (python -m fastinternlm.bench serve --help)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="activation dtype (float32: CPU only, where small models run in it)",
    )
    parser.add_argument("--ops", nargs="*", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per case and side")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="CUDA: time eager Python calls instead of CUDA-graph replays (the default "
        "replays, so small calls show GPU time, not Python's per-call cost)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and dtype == torch.float32:
        parser.error("--dtype float32 is CPU-only (the CUDA kernels are float16/bfloat16)")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fastinternlm kernel benchmark on {name}, {args.dtype}, torch {torch.__version__}")
    ceiling = copy_bandwidth(device) if device.type == "cuda" else None
    rate = matmul_rate(device, dtype) if device.type == "cuda" else None
    if ceiling:
        print(
            f"measured copy bandwidth: {ceiling / 1e9:.0f} GB/s (read + write); "
            f"dense {args.dtype} matmul 8192^3: {rate / 1e12:.0f} TFLOP/s"
        )
    graph = device.type == "cuda" and not args.eager
    if device.type == "cuda":
        print("timing: " + ("CUDA-graph replays of back-to-back calls" if graph else "eager calls"))

    results = []
    for family in args.ops:
        module = importlib.import_module(f"fastinternlm.bench.{family}")
        results += run_cases(module.cases(device, dtype), device, args.min_time, graph=graph)
    print(format_table(results, ceiling, rate))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "dtype": args.dtype,
                    "copy_bandwidth": ceiling,
                    "matmul_rate": rate,
                    "timing": "graph" if graph else "eager",
                    "results": [
                        {
                            "op": r.case.op,
                            "shape": r.case.shape,
                            "ours_s": r.ours_s,
                            "baseline_s": r.baseline_s,
                            "baseline": r.case.baseline_name,
                            "bytes": r.case.bytes,
                            "flops": r.case.flops,
                        }
                        for r in results
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
