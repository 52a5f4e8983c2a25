"""The CPU paths' thread count and instruction-set tier never change results.

Every output element is computed by one thread with the same float32 operations in the
same order, and the AVX2/FMA tier and the generic one perform the same roundings, so the
outputs must be bit-for-bit equal, not merely close. The one documented exception
(csrc/cpu_tiers.h): int4_gemm accumulates with fused multiply-adds where the instruction
set has them, and the generic tier on x86 has none. The sizes are large enough that the
ops really split their work (above the inline threshold of csrc/parallel.h)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import UNIT_ROUNDOFF, rand
from fastinternlm import cpu, ops
from fastinternlm.ops.int4_gemm import Int4Weight

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def cpu_only(device):
    if device.type != "cpu":
        pytest.skip("the thread count and instruction-set tier are settings of the CPU path")
    yield
    cpu.set_num_threads(0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality also covers -0.0 vs 0.0 and NaN payloads."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def random_weight(n, k, group_size):
    qweight = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32)
    scales = (torch.rand(n, k // group_size, dtype=torch.float64) * 0.05 + 0.005).half()
    offsets = (torch.randn(n, k // group_size, dtype=torch.float64) * 0.2 - 0.2).half()
    return Int4Weight.from_tensors(qweight, scales, offsets, group_size)


def run_ops(dtype, int4_error_bounds=None):
    """Every CPU op that splits its work, on fresh random inputs; returns their outputs.
    int4_error_bounds, a dict, receives for each int4_gemm output the bound any float32
    accumulation order meets: gamma_{k+1} * |x| @ |W|^T (see test_int4_gemm.py)."""
    out = {}
    for m, (n, k, g) in [(1, (301, 1024, 32)), (3, (301, 576, 32)), (37, (203, 640, 128))]:
        w = random_weight(n, k, g)
        x = rand(m, k, dtype=dtype)
        out[f"int4_gemm m={m}"] = ops.int4_gemm(x, w)
        if int4_error_bounds is not None:
            u32 = UNIT_ROUNDOFF[torch.float32]
            gamma = (k + 1) * u32 / (1 - (k + 1) * u32)
            w64 = ops.dequantize_int4(w, torch.float32).double()
            int4_error_bounds[f"int4_gemm m={m}"] = gamma * (x.double().abs() @ w64.abs().T)
    out["dequantize_int4"] = ops.dequantize_int4(random_weight(300, 256, 64), dtype)
    qw = ops.quantize_int4(rand(300, 256, dtype=dtype, scale=0.05), 64)
    out["quantize_int4"] = torch.cat([qw.qweight.view(torch.int16).flatten(), qw.scales.view(torch.int16).flatten(),
                                      qw.offsets.view(torch.int16).flatten()])
    for head_dim in [64, 128]:
        tokens, start, q_heads, kv_heads = 70, 13, 9, 3
        k_cache = rand(2, kv_heads, 96, head_dim, dtype=dtype)
        v_cache = rand(2, kv_heads, 96, head_dim, dtype=dtype)
        q = rand(tokens, q_heads, head_dim, dtype=dtype)
        k = rand(tokens, kv_heads, head_dim, dtype=dtype)
        v = rand(tokens, kv_heads, head_dim, dtype=dtype)
        out[f"attention_prefill d={head_dim}"] = ops.attention_prefill(q, k, v, k_cache, v_cache, 1, start)
        k_cache = rand(3, kv_heads, 700, head_dim, dtype=dtype)
        v_cache = rand(3, kv_heads, 700, head_dim, dtype=dtype)
        q = rand(2, q_heads, head_dim, dtype=dtype)
        k = rand(2, kv_heads, head_dim, dtype=dtype)
        v = rand(2, kv_heads, head_dim, dtype=dtype)
        slots = torch.tensor([2, 0], dtype=torch.int32)
        positions = torch.tensor([650, 97], dtype=torch.int32)
        out[f"attention_decode d={head_dim}"] = ops.attention_decode(q, k, v, k_cache, v_cache, slots, positions)
    x = rand(300, 576, dtype=dtype, scale=3.0)
    w = rand(576, dtype=dtype)
    out["rms_norm"] = ops.rms_norm(x, w, 1e-5)
    residual = rand(300, 576, dtype=dtype)
    out["add_rms_norm"] = ops.add_rms_norm(x, residual, w, 1e-5)
    out["add_rms_norm residual"] = residual
    out["silu_and_mul"] = ops.silu_and_mul(rand(300, 2 * 1536, dtype=dtype))
    q = rand(300, 9, 64, dtype=dtype)
    k = rand(300, 3, 64, dtype=dtype)
    ops.rotary_embedding(q, k, torch.randint(0, 30000, (300,)), 100000.0)
    out["rotary_embedding"] = torch.cat([q.flatten(), k.flatten()])
    return out


def test_num_threads_setting(device, cpu_only):
    cpu.set_num_threads(3)
    assert cpu.get_num_threads() == 3
    cpu.set_num_threads(1)
    assert cpu.get_num_threads() == 1
    cpu.set_num_threads(0)  # back to the default: at least one thread
    assert cpu.get_num_threads() >= 1
    assert cpu.cpu_isa() in ("x86-64-v3", "generic")
    with pytest.raises(ValueError, match=r"num_threads must be in \[0, 1024\].*got -1"):
        cpu.set_num_threads(-1)
    with pytest.raises(ValueError, match="got 5000"):
        cpu.set_num_threads(5000)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        cpu.set_num_threads(2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_thread_count(device, cpu_only, dtype, seed):
    results = {}
    for threads in [1, 2, 3]:
        cpu.set_num_threads(threads)
        torch.manual_seed(seed)  # the same inputs for every thread count
        results[threads] = run_ops(dtype)
    for threads in [2, 3]:
        for name, expected in results[1].items():
            assert torch.equal(bits(results[threads][name]), bits(expected)), (
                f"{name} ({dtype}) differs between 1 and {threads} threads")


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cpu_threads import run_ops
from fastinternlm import cpu
torch.manual_seed({seed})
torch.save({{"isa": cpu.cpu_isa(), "threads": cpu.get_num_threads(), "out": run_ops({dtype})}}, {path!r})
"""


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_cpu_tier_or_env_threads(device, cpu_only, dtype, seed, tmp_path):
    # A child process with the generic tier forced and two threads from the environment
    # (both are read once per process) against this process's default tier, one thread.
    path = tmp_path / "generic.pt"
    env = dict(os.environ, FASTINTERNLM_CPU_ISA="generic", FASTINTERNLM_NUM_THREADS="2")
    code = CHILD.format(tests=str(ROOT / "tests"), seed=seed, dtype=f"torch.{str(dtype).split('.')[-1]}",
                        path=str(path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    child = torch.load(path)
    assert child["isa"] == "generic" and child["threads"] == 2
    cpu.set_num_threads(1)
    torch.manual_seed(seed)
    bounds = {}
    ours = run_ops(dtype, bounds)
    generic_has_fma = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")
    for name, expected in ours.items():
        theirs = child["out"][name]
        if name in bounds and cpu.cpu_isa() != "generic" and not generic_has_fma:
            # A rounded product and sum instead of an FMA per term: both accumulations lie
            # within the bound B of the exact value, then each rounds once to dtype, so
            # they differ by at most 2 B + u (|a| + |b|) <= 2 B (1 + u) + u (2 |a| + 2 B).
            e = expected.double()
            u = UNIT_ROUNDOFF[dtype]
            tol = 2 * bounds[name] * (1 + 2 * u) + 2 * u * e.abs()
            if dtype == torch.float16:
                tol = tol + 2.0**-24  # both may round an underflowing result
            assert bool(((theirs.double() - e).abs() <= tol).all()), f"{name} ({dtype})"
            continue
        assert torch.equal(bits(theirs), bits(expected)), (
            f"{name} ({dtype}) differs between the {cpu.cpu_isa()} tier and the generic one")
