"""Programmatic dependent launch (PDL, sm_90+): the int4 GEMV launches while the kernel
before it runs and waits for it only before reading x. It must not change a single bit of
any result. Each decode-step pair (RMSNorm, SiLU-and-mul, attention, each followed by an
int4 GEMV) runs with PDL on and off, eagerly and inside a captured CUDA graph, on fresh
random inputs; the outputs must be identical, and equal to a float64 reference within the
GEMV's own bound. On a GPU without PDL (or the CPU) both settings run the same code."""

import pytest
import torch

import fastinternlm
from conftest import rand
from fastinternlm import _C, ops
from test_int4_gemm import check_gemm, random_weight


@pytest.fixture
def pdl_restore():
    before = _C.programmatic_launch()
    yield
    _C.set_programmatic_launch(before)


def test_switch(pdl_restore):
    _C.set_programmatic_launch(False)
    assert fastinternlm.build_info()["programmatic_launch"] is False
    _C.set_programmatic_launch(True)
    assert fastinternlm.build_info()["programmatic_launch"] is True


def chains(device, dtype, m):
    """(name, fn(inputs) -> (x fed to the GEMV, GEMV output[, what follows]), weight) for each
    pair, and a maker of fresh inputs."""
    k, n = 4096 + 512, 1000 + 7  # 36 groups of 128; n ends inside a block of 16 rows
    qw = random_weight(n, k, 128, device)
    w_norm = rand(k, dtype=dtype, device=device)
    kv, g, d, ctx = 2, 4, 128, 333

    def norm_chain(t):
        x = ops.add_rms_norm(t["a"], t["res"].clone(), w_norm, 1e-5)
        return x, ops.int4_gemm(x, qw)

    def silu_chain(t):
        x = ops.silu_and_mul(t["gu"])
        return x, ops.int4_gemm(x, qw)

    qw_attn = random_weight(n, kv * g * d, 128, device)

    def attn_chain(t):
        out = ops.attention_decode(t["q"], t["k"], t["v"], t["kc"], t["vc"], t["slots"], t["pos"], check_indices=False)
        x = out.view(m, kv * g * d)
        return x, ops.int4_gemm(x, qw_attn)

    # The other direction: the attention kernel as the dependent of the wqkv GEMV.
    qw_qkv = random_weight(kv * (g + 2) * d, k, 128, device)
    bases = torch.full((m,), 1e6, dtype=torch.float32, device=device)

    def qkv_chain(t):
        qkv = ops.int4_gemm(t["a"], qw_qkv)
        out = ops.attention_decode_qkv(
            qkv.view(m, kv, g + 2, d), t["kc"], t["vc"], t["slots"], t["pos"], bases, check_indices=False
        )
        return t["a"], qkv, out

    def inputs():
        return {
            "a": rand(m, k, dtype=dtype, device=device),
            "res": rand(m, k, dtype=dtype, device=device),
            "gu": rand(m, 2 * k, dtype=dtype, device=device),
            "q": rand(m, kv * g, d, dtype=dtype, device=device),
            "k": rand(m, kv, d, dtype=dtype, device=device),
            "v": rand(m, kv, d, dtype=dtype, device=device),
            "kc": rand(m, kv, ctx, d, dtype=dtype, device=device),
            "vc": rand(m, kv, ctx, d, dtype=dtype, device=device),
            "slots": torch.arange(m, dtype=torch.int32, device=device),
            "pos": torch.full((m,), ctx - 1, dtype=torch.int32, device=device),
        }

    return [
        ("add_rms_norm", norm_chain, qw),
        ("silu_and_mul", silu_chain, qw),
        ("attention_decode", attn_chain, qw_attn),
        ("int4_gemm -> attention_decode_qkv", qkv_chain, qw_qkv),
    ], inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
def test_pdl_changes_no_bit(device, dtype, m, pdl_restore):
    if device.type != "cuda":
        pytest.skip("PDL is a CUDA feature")
    cases, inputs = chains(device, dtype, m)
    for name, fn, qw in cases:
        for _ in range(3):  # fresh inputs each round
            t = inputs()
            snapshot = {key: v.clone() for key, v in t.items()}
            _C.set_programmatic_launch(False)
            off = fn({key: v.clone() for key, v in snapshot.items()})
            _C.set_programmatic_launch(True)
            on = fn({key: v.clone() for key, v in snapshot.items()})
            torch.cuda.synchronize()
            for i, (a, b) in enumerate(zip(on, off)):
                assert torch.equal(a, b), f"{name}: output {i} changed with PDL"
            check_gemm(on[1], on[0], qw, dtype, device)

        # The same chain captured in a graph with PDL on, replayed on new inputs.
        static = inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn({key: v.clone() for key, v in static.items()})
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        work = {key: v.clone() for key, v in static.items()}
        with torch.cuda.graph(graph):
            captured = fn(work)
        for _ in range(3):
            fresh = inputs()
            for key in work:
                work[key].copy_(fresh[key])
            fresh_copy = {key: v.clone() for key, v in fresh.items()}
            graph.replay()
            _C.set_programmatic_launch(False)
            eager = fn(fresh_copy)
            _C.set_programmatic_launch(True)
            torch.cuda.synchronize()
            for i, (a, b) in enumerate(zip(captured, eager)):
                assert torch.equal(a, b), f"{name}: output {i} of the graph replay with PDL differs from eager"
