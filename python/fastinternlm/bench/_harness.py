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
from typing import Callable, List, Optional

import torch


@dataclass
class Case:
    op: str                      # kernel family, e.g. "rms_norm"
    shape: str                   # human-readable shape, e.g. "rows=1 hidden=4096"
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str           # e.g. "torch eager", "F.scaled_dot_product_attention"
    bytes: int = 0               # fewest bytes one call must move (inputs read once, outputs written once)
    flops: int = 0               # floating-point operations of one call


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


def time_fn(fn: Callable[[], object], device: torch.device, min_time: float = 0.2,
            repeats: int = 5) -> float:
    """Median seconds per call."""
    fn()  # warm-up: first-call costs (allocation, lazy init) stay out of the numbers
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    # Calibrate the number of calls per repetition to about min_time / repeats.
    calls, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / repeats or calls >= 1 << 16:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / calls)
        else:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def run_cases(cases: List[Case], device: torch.device, min_time: float = 0.2) -> List[Result]:
    return [Result(c, time_fn(c.ours, device, min_time), time_fn(c.baseline, device, min_time)) for c in cases]


def format_table(results: List[Result], copy_bandwidth: Optional[float] = None) -> str:
    """One row per case; `% copy` is our GB/s over the measured copy bandwidth."""
    header = (f"{'op':<18} {'shape':<40} {'ours':>10} {'rate':>16} {'% copy':>7} {'baseline':>10} "
              f"{'speedup':>8}  baseline op")
    lines = [header, "-" * len(header)]
    for r in results:
        share = ""
        if copy_bandwidth and r.case.bytes:
            share = f"{100 * r.case.bytes / r.ours_s / copy_bandwidth:6.0f}%"
        lines.append(
            f"{r.case.op:<18} {r.case.shape:<40} {r.ours_s * 1e6:8.1f}us {r.rate(r.ours_s):>16} {share:>7} "
            f"{r.baseline_s * 1e6:8.1f}us {r.speedup:7.2f}x  {r.case.baseline_name}")
    return "\n".join(lines)
