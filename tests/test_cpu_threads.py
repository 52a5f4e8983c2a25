"""The CPU paths' thread count and instruction-set tier never change results.

Every output element is computed by one thread with the same float32 operations in the
same order, and the tiers (AVX-512 for attention and int4_gemm's buffered path, AVX2/FMA,
generic) perform the same roundings, so the outputs must be bit-for-bit equal, not merely
close. The one documented exception
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
    qweight = torch.randint(-(2**31), 2**31, (n, k // 8), dtype=torch.int32)
    scales = (torch.rand(n, k // group_size, dtype=torch.float64) * 0.05 + 0.005).half()
    offsets = (torch.randn(n, k // group_size, dtype=torch.float64) * 0.2 - 0.2).half()
    return Int4Weight.from_tensors(qweight, scales, offsets, group_size)


def make_cases(dtype, int4_error_bounds=None):
    """Every CPU op that splits its work, on fresh random inputs: name -> a function that
    computes the output (on copies of whatever the op changes in place, so it can be
    called repeatedly and from several threads). int4_error_bounds, a dict, receives for
    each int4_gemm output the bound any float32 accumulation order meets:
    gamma_{k+1} * |x| @ |W|^T (see test_int4_gemm.py)."""
    cases = {}
    for m, (n, k, g) in [(1, (301, 1024, 32)), (3, (301, 576, 32)), (37, (203, 640, 128))]:
        w = random_weight(n, k, g)
        x = rand(m, k, dtype=dtype)
        cases[f"int4_gemm m={m}"] = lambda x=x, w=w: ops.int4_gemm(x, w)
        if int4_error_bounds is not None:
            u32 = UNIT_ROUNDOFF[torch.float32]
            gamma = (k + 1) * u32 / (1 - (k + 1) * u32)
            w64 = ops.dequantize_int4(w, torch.float32).double()
            int4_error_bounds[f"int4_gemm m={m}"] = gamma * (x.double().abs() @ w64.abs().T)
    w = random_weight(300, 256, 64)
    cases["dequantize_int4"] = lambda w=w: ops.dequantize_int4(w, dtype)
    dense = rand(300, 256, dtype=dtype, scale=0.05)

    def quantize(dense=dense):
        qw = ops.quantize_int4(dense, 64)
        return torch.cat(
            [
                qw.qweight.view(torch.int16).flatten(),
                qw.scales.view(torch.int16).flatten(),
                qw.offsets.view(torch.int16).flatten(),
            ]
        )

    cases["quantize_int4"] = quantize
    for head_dim in [64, 128]:
        tokens, start, q_heads, kv_heads = 70, 13, 9, 3
        kc = rand(2, kv_heads, 96, head_dim, dtype=dtype)
        vc = rand(2, kv_heads, 96, head_dim, dtype=dtype)
        q = rand(tokens, q_heads, head_dim, dtype=dtype)
        k = rand(tokens, kv_heads, head_dim, dtype=dtype)
        v = rand(tokens, kv_heads, head_dim, dtype=dtype)
        cases[f"attention_prefill d={head_dim}"] = lambda q=q, k=k, v=v, kc=kc, vc=vc: ops.attention_prefill(
            q, k, v, kc.clone(), vc.clone(), 1, start
        )
        kc = rand(3, kv_heads, 700, head_dim, dtype=dtype)
        vc = rand(3, kv_heads, 700, head_dim, dtype=dtype)
        q = rand(2, q_heads, head_dim, dtype=dtype)
        k = rand(2, kv_heads, head_dim, dtype=dtype)
        v = rand(2, kv_heads, head_dim, dtype=dtype)
        slots = torch.tensor([2, 0], dtype=torch.int32)
        positions = torch.tensor([650, 97], dtype=torch.int32)
        cases[f"attention_decode d={head_dim}"] = lambda q=q, k=k, v=v, kc=kc, vc=vc, s=slots, p=positions: (
            ops.attention_decode(q, k, v, kc.clone(), vc.clone(), s, p)
        )
    x = rand(300, 576, dtype=dtype, scale=3.0)
    w = rand(576, dtype=dtype)
    residual = rand(300, 576, dtype=dtype)
    cases["rms_norm"] = lambda: ops.rms_norm(x, w, 1e-5)

    def add_rms_norm():
        r = residual.clone()
        return torch.cat([ops.add_rms_norm(x, r, w, 1e-5).flatten(), r.flatten()])

    cases["add_rms_norm"] = add_rms_norm
    gate_up = rand(300, 2 * 1536, dtype=dtype)
    cases["silu_and_mul"] = lambda: ops.silu_and_mul(gate_up)
    q = rand(300, 9, 64, dtype=dtype)
    k = rand(300, 3, 64, dtype=dtype)
    positions = torch.randint(0, 30000, (300,))

    def rotary():
        q2, k2 = q.clone(), k.clone()
        ops.rotary_embedding(q2, k2, positions, 100000.0)
        return torch.cat([q2.flatten(), k2.flatten()])

    cases["rotary_embedding"] = rotary
    return cases


def run_ops(dtype, int4_error_bounds=None):
    return {name: fn() for name, fn in make_cases(dtype, int4_error_bounds).items()}


def test_num_threads_setting(device, cpu_only):
    cpu.set_num_threads(3)
    assert cpu.get_num_threads() == 3
    cpu.set_num_threads(1)
    assert cpu.get_num_threads() == 1
    cpu.set_num_threads(0)  # back to the default: at least one thread
    assert cpu.get_num_threads() >= 1
    assert cpu.cpu_isa() in ("x86-64-v4", "x86-64-v3", "generic")
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
                f"{name} ({dtype}) differs between 1 and {threads} threads"
            )


def run_child(template: str, isa: str, seed: int, dtype, tmp_path, **env) -> dict:
    """Runs `template` (CHILD or BUFFERED_CHILD) in a fresh process with the tier forced to
    `isa` (the tier and the environment's thread count are read once per process) and
    returns what it saved."""
    path = tmp_path / "child.pt"
    code = template.format(
        tests=str(ROOT / "tests"), seed=seed, dtype=f"torch.{str(dtype).split('.')[-1]}", path=str(path)
    )
    env = dict(os.environ, FASTINTERNLM_CPU_ISA=isa, **env)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    child = torch.load(path)
    assert child["isa"] == isa
    return child


def assert_same_as_tier(ours: dict, theirs: dict, bounds: dict, dtype, isa: str) -> None:
    """Every result equals the child's bit for bit, except against the generic tier on x86,
    which has no FMA: there a rounded product and sum replace an FMA per term, both
    accumulations lie within the bound B of the exact value and each rounds once to dtype,
    so they differ by at most 2 B + u (|a| + |b|) <= 2 B (1 + u) + u (2 |a| + 2 B)."""
    generic_has_fma = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")
    for name, expected in ours.items():
        got = theirs[name]
        if name in bounds and isa == "generic" and cpu.cpu_isa() != "generic" and not generic_has_fma:
            e = expected.double()
            u = UNIT_ROUNDOFF[dtype]
            tol = 2 * bounds[name] * (1 + 2 * u) + 2 * u * e.abs()
            if dtype == torch.float16:
                tol = tol + 2.0**-24  # both may round an underflowing result
            assert bool(((got.double() - e).abs() <= tol).all()), f"{name} ({dtype})"
            continue
        assert torch.equal(bits(got), bits(expected)), (
            f"{name} ({dtype}) differs between the {cpu.cpu_isa()} tier and the {isa} one"
        )


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cpu_threads import run_ops
from fastinternlm import cpu
torch.manual_seed({seed})
torch.save({{"isa": cpu.cpu_isa(), "threads": cpu.get_num_threads(), "out": run_ops({dtype})}}, {path!r})
"""


@pytest.mark.parametrize("isa", ["generic", "x86-64-v3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_cpu_tier_or_env_threads(device, cpu_only, dtype, isa, seed, tmp_path):
    # A child process with a lower tier forced (generic, or at most x86-64-v3 where this
    # process runs the AVX-512 kernels) and two threads from the environment (both are
    # read once per process) against this process's default tier, one thread.
    if isa != "generic" and cpu.cpu_isa() != "x86-64-v4":
        pytest.skip("this CPU has no AVX-512 tier to compare with x86-64-v3")
    child = run_child(CHILD, isa, seed, dtype, tmp_path, FASTINTERNLM_NUM_THREADS="2")
    assert child["threads"] == 2
    cpu.set_num_threads(1)
    torch.manual_seed(seed)
    bounds = {}
    assert_same_as_tier(run_ops(dtype, bounds), child["out"], bounds, dtype, isa)


# int4_gemm's buffered path (m >= 4 rows of x), which has its own x86-64-v4 kernels (two
# outputs' accumulators per 16-lane register, k split into blocks): odd m (a partial last
# tile of rows, and more rows than one slab), odd n (a column pair padded with zeros, a
# partial last panel), k of one, three and many groups, and k past one block of words.
BUFFERED_SHAPES = [
    # (m, n, k, group_size)
    (4, 37, 32, 32),
    (5, 19, 3 * 64, 64),
    (17, 203, 3 * 128, 128),
    (39, 45, 17 * 32, 32),
    (70, 61, 17 * 64, 64),
    (23, 29, 49 * 32, 32),
    (513, 35, 9 * 128, 128),
]


def buffered_cases(dtype, error_bounds):
    cases = {}
    for m, n, k, g in BUFFERED_SHAPES:
        w = random_weight(n, k, g)
        x = rand(m, k, dtype=dtype)
        name = f"int4_gemm m={m} n={n} k={k} g={g}"
        cases[name] = ops.int4_gemm(x, w)
        if error_bounds is not None:
            u32 = UNIT_ROUNDOFF[torch.float32]
            gamma = (k + 1) * u32 / (1 - (k + 1) * u32)
            w64 = ops.dequantize_int4(w, torch.float32).double()
            error_bounds[name] = gamma * (x.double().abs() @ w64.abs().T)
    return cases


BUFFERED_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cpu_threads import buffered_cases
from fastinternlm import cpu
torch.manual_seed({seed})
torch.save({{"isa": cpu.cpu_isa(), "out": buffered_cases({dtype}, None)}}, {path!r})
"""


@pytest.mark.parametrize("isa", ["generic", "x86-64-v3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_buffered_path_on_every_tier(device, cpu_only, dtype, isa, seed, tmp_path):
    # This process runs its best tier (x86-64-v4 where the CPU has AVX-512) against a child
    # with a lower one forced: the same bits, except the generic tier on x86, which has no
    # FMA (assert_same_as_tier gives the bound).
    if isa != "generic" and cpu.cpu_isa() != "x86-64-v4":
        pytest.skip("this CPU has no AVX-512 tier to compare with x86-64-v3")
    child = run_child(BUFFERED_CHILD, isa, seed, dtype, tmp_path)
    torch.manual_seed(seed)
    bounds = {}
    assert_same_as_tier(buffered_cases(dtype, bounds), child["out"], bounds, dtype, isa)


def test_concurrent_callers(device, cpu_only):
    # Ops release the GIL, so several Python threads can be inside the pool's entry point
    # at once (one gets the pool, the others run inline), while another thread changes
    # the thread count (an old pool lives until its last job ends).
    import threading

    cpu.set_num_threads(2)
    cases = make_cases(torch.float16)
    expected = {name: fn() for name, fn in cases.items()}
    results, errors = [None] * 3, []

    def worker(i):
        try:
            results[i] = {name: fn() for name, fn in cases.items()}
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, e))

    def churn():
        for n in [1, 3, 2, 4, 2]:
            cpu.set_num_threads(n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, got in enumerate(results):
        for name, value in expected.items():
            assert torch.equal(bits(got[name]), bits(value)), f"{name} differs in concurrent caller {i}"
