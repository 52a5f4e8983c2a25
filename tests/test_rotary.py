import math

import pytest
import torch

from conftest import assert_close, rand
from fastinternlm import ops

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference(x, positions, bases):
    """Half-split rotation in float64. The angle itself is formed in float32 as HF does
    (angle = float(pos) * inv_freq, both float32): at 32K positions float32 rounding moves
    the angle by ~1e-3 rad, and that is the behaviour we promise to match, so the
    reference shares it: inv_freq = 1 / base^(2i/D) in float32 with the power correctly
    rounded. Everything after the angle is float64."""
    tokens, _, dim = x.shape
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (bases.float().double()[:, None] ** exponent[None, :]).float()  # [T, D/2]
    angle = positions.float()[:, None] * inv_freq  # float32, as HF
    cos, sin = angle.double().cos()[:, None, :], angle.double().sin()[:, None, :]
    x64 = x.double()
    x1, x2 = x64[..., : dim // 2], x64[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens,q_heads,kv_heads", [(1, 32, 8), (37, 6, 2), (5, 3, 3)])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rotary(device, dtype, head_dim, tokens, q_heads, kv_heads, pos_dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    q = rand(tokens, q_heads, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 40000, (tokens,), dtype=pos_dtype)
    base = 1e6
    q_ref = reference(q.cpu(), positions, torch.full((tokens,), base))
    k_ref = reference(k.cpu(), positions, torch.full((tokens,), base))
    ops.rotary_embedding(q, k, positions.to(device), base)
    # HF's chain in the activation dtype: cos and sin rounded (2), each product rounded and
    # the sum rounded (3); in float32 the cos/sin roundings become libm's < 1 ulp errors.
    assert_close(q, q_ref, dtype, roundings=6, name="q")
    assert_close(k, k_ref, dtype, roundings=6, name="k")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotary_per_token_base(device, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    tokens, head_dim = 23, 128
    q = rand(tokens, 4, head_dim, dtype=dtype, device=device)
    k = rand(tokens, 2, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 300000, (tokens,), dtype=torch.int64)
    # One NTK base per token, as a batch of sequences of different lengths would carry.
    bases = torch.tensor(
        [ops.ntk_base(5e7, 2.5, 262144, int(p) + 1 + 100000 * (i % 3), head_dim) for i, p in enumerate(positions)],
        dtype=torch.float32,
    )
    q_ref, k_ref = reference(q.cpu(), positions, bases), reference(k.cpu(), positions, bases)
    ops.rotary_embedding(q, k, positions.to(device), bases.to(device))
    assert_close(q, q_ref, dtype, roundings=6, name="q")
    assert_close(k, k_ref, dtype, roundings=6, name="k")


def test_rotary_matches_hf_apply_rotary(device):
    """Same numbers as transformers' own Llama rotary path (cos/sin cast to the dtype).
    base 10000 and D=64: here torch's float32 pow is correctly rounded for every
    frequency (for a few other bases it is 1 ulp off in one or two frequencies, which at
    thousands of positions moves an angle by ~1e-4 rad: HF's error, not ours)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tokens, heads, kv_heads, head_dim, base = 19, 6, 2, 64, 10000.0
    q = rand(tokens, heads, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 5000, (tokens,))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponent)
    freqs = (inv_freq[:, None] @ positions[None, :].float()).t()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
    # HF layout is [batch, heads, tokens, D].
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    ops.rotary_embedding(q, k, positions.to(device), base)
    # Both sides run the same rounding chain, so in float16 they agree to the bit unless
    # two libraries' float32 sin/cos differ in the last place (then one rounding apart).
    # In float32 the chain's 3 roundings happen on both sides, plus 1 ulp of sin/cos each.
    if dtype == torch.float32:
        assert_close(q, q_hf[0].transpose(0, 1), dtype, roundings=8, name="q")
        assert_close(k, k_hf[0].transpose(0, 1), dtype, roundings=8, name="k")
    else:
        assert_close(q, q_hf[0].transpose(0, 1), dtype, roundings=1, name="q")
        assert_close(k, k_hf[0].transpose(0, 1), dtype, roundings=1, name="k")


def test_ntk_base_formula():
    theta, factor, max_pos, dim = 1e6, 2.0, 32768, 128
    assert ops.ntk_base(theta, factor, max_pos, 1000, dim) == theta
    assert ops.ntk_base(theta, factor, max_pos, max_pos, dim) == theta
    for length in [32769, 65536, 200000, 1048576]:
        expected = theta * (factor * length / max_pos - (factor - 1)) ** (dim / (dim - 2))
        assert math.isclose(ops.ntk_base(theta, factor, max_pos, length, dim), expected, rel_tol=1e-12)
    # The facts note's worked examples for InternLM2.5-7B-Chat.
    assert math.isclose(ops.ntk_base(theta, factor, max_pos, 65536, dim), 3.05e6, rel_tol=0.01)
    assert math.isclose(ops.ntk_base(theta, factor, max_pos, 200000, dim), 1.16e7, rel_tol=0.01)


@pytest.mark.parametrize("length", [100, 4096, 9000, 70000])
def test_ntk_base_matches_transformers(length):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    if not hasattr(rope_utils, "_compute_dynamic_ntk_parameters"):
        pytest.skip("this transformers has no dynamic-NTK helper")
    from transformers import LlamaConfig

    max_pos, dim, theta, factor = 4096, 128, 1e6, 2.0
    config = LlamaConfig(
        hidden_size=dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling={"rope_type": "dynamic", "factor": factor},
    )
    inv_freq_hf, _ = rope_utils._compute_dynamic_ntk_parameters(config, "cpu", seq_len=length)
    base = ops.ntk_base(theta, factor, max_pos, max(length, 1), dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    torch.testing.assert_close(inv_freq, inv_freq_hf, rtol=4 * 2.0**-24, atol=0)


def test_rotary_bad_input(device):
    q = rand(3, 4, 64, dtype=torch.float16, device=device)
    k = rand(3, 2, 64, dtype=torch.float16, device=device)
    pos = torch.arange(3, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="q must have dtype"):
        ops.rotary_embedding(q.to(torch.int16), k, pos, 1e4)
    with pytest.raises(TypeError, match="k must have dtype float16"):
        ops.rotary_embedding(q, k.to(torch.bfloat16), pos, 1e4)
    with pytest.raises(TypeError, match="positions must have dtype int32 or int64"):
        ops.rotary_embedding(q, k, pos.float(), 1e4)
    with pytest.raises(ValueError, match=r"k must have shape \(3, \*, 64\)"):
        ops.rotary_embedding(q, rand(3, 2, 32, dtype=torch.float16, device=device), pos, 1e4)
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\)"):
        ops.rotary_embedding(q, k, pos[:2], 1e4)
    with pytest.raises(ValueError, match="q must be contiguous"):
        ops.rotary_embedding(rand(4, 3, 64, dtype=torch.float16, device=device).transpose(0, 1), k, pos, 1e4)
    with pytest.raises(ValueError, match="base must be a finite number > 0"):
        ops.rotary_embedding(q, k, pos, -1.0)
    with pytest.raises(TypeError, match="base must have dtype float32"):
        ops.rotary_embedding(q, k, pos, torch.ones(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rotary_embedding(
            rand(3, 4, 63, dtype=torch.float16, device=device),
            rand(3, 2, 63, dtype=torch.float16, device=device),
            pos,
            1e4,
        )
    with pytest.raises(ValueError, match=f"positions must be on {device.type}"):
        ops.rotary_embedding(q, k, torch.empty(3, dtype=torch.int32, device="meta"), 1e4)
    with pytest.raises(ValueError, match="factor must be a finite number >= 1"):
        ops.ntk_base(1e6, 0.5, 100, 200, 128)
    with pytest.raises(ValueError, match="length must be positive"):
        ops.ntk_base(1e6, 2.0, 100, 0, 128)
