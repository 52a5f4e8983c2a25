"""The model with an int8 / int4 KV cache (Transformer(kv_cache=...), llm.load(kv_cache=...)),
and the 1M-context model's rope configuration.

Logits with a quantized cache are compared with the float64 forward whose keys and values go
through the same format (quantize, dequantize, in float64): the float32 model differs from it
by its own float32 roundings, and where a value sits within a rounding of a half-step
boundary its code may differ by one. Both are small next to what the format itself changes
(the distance between that forward and the unquantized one), which the test measures and
uses as the scale of its bound; a wrong code, zero or scale would show at that scale."""

import math

import pytest
import torch

import fastinternlm
from fastinternlm import ops
from model_fixtures import reference_forward, write_tiny_internlm2

MAX_POS = 64


def format_round_trip(bits):
    """The format (attention.h, v3, float32 parameters: these models run in float32) in
    float64 on rows [..., D]: a (scale, zero) pair per row for int8, per 16 channels for
    int4."""
    qmax = 2**bits - 1

    def f(x):
        d = x.shape[-1]
        g = d if bits == 8 else 16
        xg = x.reshape(*x.shape[:-1], d // g, g)
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        scale = (hi - lo) / qmax
        q = torch.where(scale > 0, torch.round((xg - lo) / torch.where(scale > 0, scale, 1)), 0).clamp(0, qmax)
        return (q * scale + lo).reshape(x.shape)

    return f


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("model"), dtype=torch.float32, seed=11)


def load(ckpt, **kw):
    kw.setdefault("max_seq_len", 128)
    kw.setdefault("dtype", torch.float32)
    return fastinternlm.load(ckpt.path, device="cpu", progress=False, **kw)


def prompt(ckpt, n):
    return torch.randint(3, ckpt.tokenizer.vocab_size - 6, (n,)).tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_logits_prefill_and_decode(ckpt, bits):
    llm = load(ckpt, kv_cache=f"int{bits}")
    assert isinstance(llm.model.k_cache[0], ops.QuantizedKV) and llm.model.kv_cache == f"int{bits}"
    ids = prompt(ckpt, 53)  # below max_position_embeddings: one base for every position
    n0 = 31
    ref_fp = reference_forward(ckpt, ids)
    ref_q = reference_forward(ckpt, ids, kv_transform=format_round_trip(bits))
    effect = (ref_q - ref_fp).abs().max().item()
    # The float32 model's own error with a float cache, the floor of the comparison.
    plain = load(ckpt)
    floor = 2 * (plain.logits(ids).double() - ref_fp).abs().max().item() + 1e-6 * ref_fp.abs().mean().item()

    # Prefill of the whole sequence.
    ours = llm.logits(ids).double()
    err = (ours - ref_q).abs().max().item()
    assert err <= 0.25 * effect + floor, f"int{bits}: prefill error {err:.3e}, format effect {effect:.3e}"

    # Prefill of a prompt, then decode steps (the fused decode path writes each new key and
    # value quantized).
    m = llm.model
    base = torch.full((1,), ckpt.config["rope_theta"], dtype=torch.float32)
    with torch.inference_mode():
        m.prefill(torch.tensor(ids[:n0]), 0, 0, ckpt.config["rope_theta"])
        steps = [
            m.decode(
                torch.tensor([ids[p]]), torch.zeros(1, dtype=torch.int32), torch.tensor([p], dtype=torch.int32), base
            )[0]
            for p in range(n0, len(ids))
        ]
    ours = torch.stack(steps).double()
    err = (ours - ref_q[n0:]).abs().max().item()
    assert err <= 0.25 * effect + floor, f"int{bits}: decode error {err:.3e}, format effect {effect:.3e}"
    # And the format does change the logits (the comparison above is not vacuous).
    assert effect > 10 * floor


def test_kv_cache_argument(ckpt):
    plain = load(ckpt, max_seq_len=96)
    assert plain.model.kv_cache == "fp32" and isinstance(plain.model.k_cache[0], torch.Tensor)
    c = plain.config
    rows = c.num_layers * 2 * c.num_kv_heads * 96
    assert plain.model.cache_bytes() == rows * c.head_dim * 4
    # Codes plus a (scale, zero) per row (int8) or per 16 channels (int4): 8 bytes (float32)
    # with float32 activations, 4 (float16) with float16 ones.
    for dtype, pair in ((torch.float32, 8), (torch.float16, 4)):
        for kind, row in (("int8", c.head_dim + pair), ("int4", c.head_dim // 2 + pair * (c.head_dim // 16))):
            m = load(ckpt, max_seq_len=96, kv_cache=kind, dtype=dtype).model
            assert m.cache_bytes() == rows * row
            assert m.k_cache[0].params.dtype == m.v_cache[-1].params.dtype == ops.kv_params_dtype(dtype)
    assert load(ckpt, kv_cache="fp32").model.kv_cache == "fp32"
    with pytest.raises(ValueError, match="kv_cache 'fp16' must match the activation dtype fp32"):
        load(ckpt, kv_cache="fp16")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        load(ckpt, kv_cache="int2")
    # max_seq_len="auto": the longest context the free memory allows (here: host memory).
    from fastinternlm import memory_plan

    auto = memory_plan.resolve(
        memory_plan.ModelShape.from_config(c),
        "cpu",
        max_seq_len="auto",
        max_batch=1,
        kv_cache="int4",
        dtype="fp32",
        weights=0,
        free=1 << 30,
    )
    assert auto.max_seq_len > 1000 and auto.total <= 1 << 30


@pytest.mark.parametrize("ntk_mode", ["hf", "fixed"])
def test_one_million_token_config_loads_and_runs(tmp_path, ntk_mode):
    # internlm2_5-7b-chat-1m's rope settings with tiny dimensions: short prompts run at the
    # plain base (262144 positions before NTK starts) in both modes, and the bases for a
    # million-token prompt follow the dynamic-NTK formula.
    ck = write_tiny_internlm2(
        tmp_path / "m1",
        dtype=torch.float32,
        seed=5,
        rope_theta=5e7,
        rope_scaling={"type": "dynamic", "factor": 2.5},
        max_position_embeddings=262144,
        head_dim=128,
        heads=4,
        kv_heads=1,
    )
    for kv in ("int8", None):
        llm = fastinternlm.load(
            ck.path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=64, ntk_mode=ntk_mode, kv_cache=kv
        )
        assert llm.config.rope_theta == 5e7 and llm.config.max_position_embeddings == 262144
        assert llm.config.rope_scaling.factor == 2.5
        ids = prompt(ck, 23)
        if kv is None:
            ours, ref = llm.logits(ids).double(), reference_forward(ck, ids)
            assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        out = llm.generate(ids, max_new_tokens=9)
        assert len(out.token_ids) >= 1
        n = 1 << 20
        expected = 5e7 * (2.5 * n / 262144 - 1.5) ** (128 / 126)
        assert math.isclose(llm._base(n), expected, rel_tol=1e-6)
        assert llm._base(262144) == 5e7


def test_long_prefill_reports_progress(ckpt, monkeypatch, capsys):
    from fastinternlm import sequence as sequence_module

    llm = load(ckpt, max_seq_len=200, kv_cache="int4")
    monkeypatch.setattr(sequence_module, "PREFILL_CHUNK", 37)
    ids = prompt(ckpt, 150)
    expected = llm.logits(ids)[-1]
    capsys.readouterr()
    monkeypatch.setattr(sequence_module, "PROGRESS_AFTER_S", 0.0)  # every prefill "takes seconds"
    monkeypatch.setattr(sequence_module, "PROGRESS_MIN_TOKENS", 100)
    out = llm.generate(ids, max_new_tokens=1)
    err = capsys.readouterr().err
    assert "prefill: 150/150 tokens" in err and err.endswith("\n")
    assert out.token_ids[0] == int(expected.argmax())
    llm.generate(ids[:99], max_new_tokens=1)  # shorter than PROGRESS_MIN_TOKENS: never reported
    assert "prefill" not in capsys.readouterr().err
    llm.prefill_progress = False
    llm.generate(ids, max_new_tokens=1)
    assert "prefill" not in capsys.readouterr().err


def test_accuracy_bench_kv_cache_copy(ckpt):
    # bench accuracy --kv-cache: the copy shares the weights, has its own cache of the
    # requested type, and its logits are the quantized-cache model's.
    from fastinternlm.bench.accuracy import main, with_kv_cache

    llm = load(ckpt)
    ids = prompt(ckpt, 40)
    plain = llm.logits(ids)  # as the bench does: the original's engine exists before the copy
    q = with_kv_cache(llm, "int8")
    assert q.model.kv_cache == "int8" and llm.model.kv_cache == "fp32"
    assert q.model.layers is llm.model.layers and q.model.k_cache is not llm.model.k_cache
    quantized = q.logits(ids)
    assert torch.equal(quantized, load(ckpt, kv_cache="int8").logits(ids))
    assert not torch.equal(quantized, plain)
    with pytest.raises(SystemExit):
        main(["--kv-cache", "int2"])
