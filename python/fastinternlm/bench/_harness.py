"""Timing harness shared by the kernel benchmarks.

Each kernel family has a module here (named like its C++ files) with
`cases(device, dtype) -> list[Case]`: InternLM2.5-7B shapes on CUDA, smaller ones on the
CPU. A case pairs our op with the torch way of doing the same thing, and the harness times
both in the same run: CUDA events around many calls after a warm-up, the median of several
repetitions; on the CPU, perf_counter the same way. Inputs are random (never zeros)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch


@dataclass
class Case:
    op: str  # kernel family, e.g. "rms_norm"
    shape: str  # human-readable shape, e.g. "rows=1 hidden=4096"
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str  # e.g. "torch eager", "F.scaled_dot_product_attention"
    bytes: int = 0  # fewest bytes one call must move (inputs read once, outputs written once)
    flops: int = 0  # floating-point operations of one call


@dataclass
class Result:
    case: Case
    ours_s: float
    baseline_s: float

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.ours_s

    def rate(self, seconds: float) -> str:
        if self.case.flops and self.case.flops >= 4 * self.case.bytes:
            return f"{self.case.flops / seconds / 1e12:8.2f} TFLOP/s"
        if self.case.bytes:
            return f"{self.case.bytes / seconds / 1e9:8.1f} GB/s"
        return ""


def _calibrate(fn: Callable[[], object], sync: Callable[[], None], min_time: float, repeats: int) -> int:
    """Calls per repetition so that one repetition takes about min_time / repeats."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        if time.perf_counter() - start >= min_time / repeats or calls >= 1 << 16:
            return calls
        calls *= 2


def _graph_of(fn: Callable[[], object], calls: int, device: torch.device) -> Optional["torch.cuda.CUDAGraph"]:
    """`calls` back-to-back calls of fn captured as one CUDA graph, or None where fn cannot
    be captured (it syncs with the host, or allocates in a way capture refuses)."""
    try:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        return graph
    except Exception:  # noqa: BLE001 - any capture failure means: time it eagerly
        torch.cuda.synchronize(device)
        return None


def time_fn(
    fn: Callable[[], object], device: torch.device, min_time: float = 0.2, repeats: int = 5, graph: bool = False
) -> float:
    """Median seconds per call. graph=True (CUDA): the calls of one repetition are captured
    as a CUDA graph and replayed, so the figure is GPU time without Python's per-call host
    cost (how the decode step runs); falls back to eager calls where capture fails."""
    fn()  # warm-up: first-call costs (allocation, lazy init) stay out of the numbers
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    calls = _calibrate(fn, sync, min_time, repeats)
    run = None
    if graph and device.type == "cuda":
        # Eager calibration overestimates small calls (host-bound); a graph runs them faster,
        # so cap the count to keep the capture small.
        captured = _graph_of(fn, min(calls, 256), device)
        if captured is not None:
            calls = min(calls, 256)
            run = captured.replay
    if run is None:

        def run():
            for _ in range(calls):
                fn()

    run()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / calls)
        else:
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def run_cases(cases: List[Case], device: torch.device, min_time: float = 0.2, graph: bool = False) -> List[Result]:
    return [
        Result(c, time_fn(c.ours, device, min_time, graph=graph), time_fn(c.baseline, device, min_time, graph=graph))
        for c in cases
    ]


def format_table(
    results: List[Result], copy_bandwidth: Optional[float] = None, matmul_rate: Optional[float] = None
) -> str:
    """One row per case; `% peak` is our rate over the card's measured ceiling for that kind
    of case: GB/s over the copy bandwidth (memory-bound cases), TFLOP/s over the dense
    matmul rate (compute-bound ones, marked `F`)."""
    header = (
        f"{'op':<18} {'shape':<40} {'ours':>10} {'rate':>16} {'% peak':>7} {'baseline':>10} {'speedup':>8}  baseline op"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        share = ""
        compute_bound = r.case.flops and r.case.flops >= 4 * r.case.bytes
        if compute_bound and matmul_rate:
            share = f"{100 * r.case.flops / r.ours_s / matmul_rate:5.0f}%F"
        elif copy_bandwidth and r.case.bytes and not compute_bound:
            share = f"{100 * r.case.bytes / r.ours_s / copy_bandwidth:6.0f}%"
        lines.append(
            f"{r.case.op:<18} {r.case.shape:<40} {r.ours_s * 1e6:8.1f}us {r.rate(r.ours_s):>16} {share:>7} "
            f"{r.baseline_s * 1e6:8.1f}us {r.speedup:7.2f}x  {r.case.baseline_name}"
        )
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1, setup: Optional[Callable[[], Any]] = None
) -> float:
    """Median seconds of fn() over `reps` runs after `warmup` runs; setup() before each run,
    outside the timed region. CUDA events on CUDA, perf_counter on the CPU."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    sync(device)
    samples = []
    for _ in range(max(1, reps)):
        if setup:
            setup()
        sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (256 MiB, far over L2)."""
    src = torch.randn(64 << 20, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large dense matmul (8192^3) through torch (cuBLAS): the ceiling for the
    compute-bound kernels (prefill attention, the int4 GEMM at prefill sizes)."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    seconds = time_fn(lambda: torch.matmul(a, b), device)
    return 2 * 8192**3 / seconds
