"""attention_decode_qkv: decode attention read straight from the fused wqkv projection,
RoPE applied inside. Checked two ways: bit for bit against the unfused sequence it replaces
(split, rotary_embedding, attention_decode: each verified against float64 elsewhere), and
against a float64 reference of the whole thing."""

import math

import pytest
import torch

from conftest import assert_close, rand
from fastinternlm import ops
from test_attention import make_cache, reference, roundings, skip_cuda_float32
from test_rotary import reference as rope_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROPE_ROUNDINGS = 6  # test_rotary's budget for one rotated row (cos/sin, products, sum)


def split(qkv):
    """[B, KV, G + 2, D] -> q [B, KV * G, D], k, v [B, KV, D] (copies)."""
    b, kv, rows, d = qkv.shape
    g = rows - 2
    return qkv[:, :, :g].reshape(b, kv * g, d).clone(), qkv[:, :, g].clone(), qkv[:, :, g + 1].clone()


def case(device, dtype, group, head_dim, batch=5, kv_heads=2, num_slots=7, max_seq=300):
    qkv = rand(batch, kv_heads, group + 2, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(num_slots, kv_heads, max_seq, head_dim, dtype, device)
    slots = torch.randperm(num_slots)[:batch].to(torch.int32)
    # The first position, both sides of 64-token split boundaries, the last, random ones.
    positions = torch.tensor(
        [0, 63, 64, max_seq - 1] + torch.randint(1, max_seq, (batch - 4,)).tolist(), dtype=torch.int32
    )[:batch]
    # Per-sequence bases as dynamic NTK gives them (InternLM2.5's theta = 1e6 and up).
    bases = torch.tensor([1e6 * (1 + 0.37 * i) for i in range(batch)], dtype=torch.float32)
    return qkv, k_cache, v_cache, slots, positions, bases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_equals_unfused(device, dtype, group, head_dim):
    skip_cuda_float32(device, dtype)
    qkv, k_cache, v_cache, slots, positions, bases = case(device, dtype, group, head_dim)
    dev = lambda t: t.to(device)  # noqa: E731
    k2, v2 = k_cache.clone(), v_cache.clone()
    before = qkv.clone()
    out = ops.attention_decode_qkv(qkv, k_cache, v_cache, dev(slots), dev(positions), dev(bases))
    assert torch.equal(qkv, before), "qkv was modified"
    q, k, v = split(qkv)
    ops.rotary_embedding(q, k, dev(positions), dev(bases))
    want = ops.attention_decode(q, k, v, k2, v2, dev(slots), dev(positions))
    # The same arithmetic in the same order: identical bits, cache included.
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2), "caches differ from the unfused path"
    assert torch.equal(out, want), f"outputs differ: max {(out.float() - want.float()).abs().max():.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_against_float64(device, dtype, group, head_dim):
    skip_cuda_float32(device, dtype)
    qkv, k_cache, v_cache, slots, positions, bases = case(device, dtype, group, head_dim)
    cache_k0, cache_v0 = k_cache.cpu().double(), v_cache.cpu().double()
    out = ops.attention_decode_qkv(qkv, k_cache, v_cache, slots.to(device), positions.to(device), bases.to(device))
    q, k, v = (t.cpu() for t in split(qkv))
    batch, q_heads, d = q.shape
    # RoPE in float64, per sequence at its position with its base.
    q64 = torch.stack([rope_reference(q[b : b + 1], positions[b : b + 1], bases[b : b + 1])[0] for b in range(batch)])
    k64 = torch.stack([rope_reference(k[b : b + 1], positions[b : b + 1], bases[b : b + 1])[0] for b in range(batch)])
    # The cache: the rotated k and the plain v at each sequence's position, nothing else touched.
    ek, ev = cache_k0.clone(), cache_v0.clone()
    for b in range(batch):
        ek[slots[b], :, positions[b]] = k64[b]
        ev[slots[b], :, positions[b]] = v[b].double()
    assert_close(k_cache, ek, dtype, ROPE_ROUNDINGS, name="k_cache")
    assert torch.equal(v_cache.cpu().double(), ev), "v_cache differs from the expected contents"
    scale = 1.0 / math.sqrt(d)
    expected, smax = reference(q64, ek, ev, slots.tolist(), positions.tolist(), scale)
    # Beyond attention's own budget: q and the new k carry ROPE_ROUNDINGS roundings each, so
    # a score moves by at most 2 * ROPE_ROUNDINGS * u * sum_i |q_i k_i| * scale, and a
    # softmax weight by twice that (its score and the maximum).
    group_of = q_heads // k_cache.shape[1]
    abs_dot = 0.0
    for b in range(batch):
        keys = ek[slots[b], :, : positions[b] + 1].repeat_interleave(group_of, 0)  # [H, L, D]
        abs_dot = max(abs_dot, float(torch.einsum("hd,hld->hl", q64[b].abs(), keys.abs()).max()) * scale)
    budget = roundings(dtype, int(positions.max()) + 1, d, smax) + 4 * ROPE_ROUNDINGS * abs_dot
    assert_close(out, expected, dtype, budget)


def test_fused_refusals(device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    qkv, k_cache, v_cache, slots, positions, bases = case(device, dtype, 2, 64)
    slots, positions, bases = slots.to(device), positions.to(device), bases.to(device)
    with pytest.raises(TypeError, match=r"bases must have dtype float32, got float64"):
        ops.attention_decode_qkv(qkv, k_cache, v_cache, slots, positions, bases.double())
    with pytest.raises(ValueError, match=r"bases must have shape \(5,\), got \(4,\)"):
        ops.attention_decode_qkv(qkv, k_cache, v_cache, slots, positions, bases[:4])
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, kv_heads, G \+ 2, head_dim\) with G >= 1"):
        ops.attention_decode_qkv(qkv[:, :, :2].contiguous(), k_cache, v_cache, slots, positions, bases)
    with pytest.raises(ValueError, match=r"qkv must have shape \(\*, 2, \*, 64\), got \(5, 1, 4, 64\)"):
        ops.attention_decode_qkv(qkv[:, :1].contiguous(), k_cache, v_cache, slots, positions, bases)
    with pytest.raises(ValueError, match="qkv must be contiguous"):
        ops.attention_decode_qkv(qkv.transpose(0, 1), k_cache, v_cache, slots, positions, bases)
    with pytest.raises(ValueError, match=r"bases must be on \S+ like qkv, got meta"):
        ops.attention_decode_qkv(qkv, k_cache, v_cache, slots, positions, torch.empty(5, device="meta"))
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"positions must be in \[0, 300\), got 300 at index 1"):
            ops.attention_decode_qkv(
                qkv, k_cache, v_cache, slots, torch.tensor([0, 300, 1, 2, 3], dtype=torch.int32), bases
            )
