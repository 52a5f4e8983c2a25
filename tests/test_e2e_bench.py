"""`python -m fastinternlm.bench e2e` on the tiny shapes: the whole run (ours, HF and the
plain-torch baseline) produces finite positive numbers, and the baselines compute the same
function as ours on the same weights (so their speeds are comparable)."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import UNIT_ROUNDOFF
from fastinternlm import ops
from fastinternlm.bench import e2e, torch_ref

# Both implementations round activations to float16 at different points: per layer about
# nine roundings (norm, qkv, rope, attention, wo, norm, w13, silu*mul, w2), each a relative
# error of u that the residual stream carries on; two layers plus the final norm and head
# give ~20 roundings, measured against the largest logit.
ROUNDINGS = 20


def _tol(dtype=torch.float16) -> float:
    return ROUNDINGS * UNIT_ROUNDOFF[dtype]


def test_cli_tiny_runs_and_baselines_agree(device, tmp_path, capsys):
    pytest.importorskip("transformers")  # the HF baseline
    out = tmp_path / "e2e.json"
    rc = e2e.main(
        [
            "--shapes",
            "tiny",
            "--device",
            str(device),
            "--steps",
            "2",
            "--reps",
            "1",
            "--hf-reps",
            "1",
            "--batches",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ours/HF" in printed and "ours/torch" in printed
    data = json.loads(out.read_text())
    assert data["errors"] == [] and data["skipped"] == []
    rows = {(r["metric"], r["precision"], r["setting"]): r for r in data["rows"]}
    shapes = e2e.SHAPES["tiny"]
    wanted = [("decode tok/s", "fp16", f"b1 ctx {c}") for c in shapes["contexts"]]
    wanted += [
        ("TTFT ms", "fp16", f"prompt {shapes['prompt']}"),
        ("decode tok/s", "fp16", f"b2 ctx {shapes['batch_context']}"),
    ]
    for key in wanted:
        for impl in ("ours", "hf", "torch"):
            value = rows[key][impl]
            assert value is not None and math.isfinite(value) and value > 0, (key, impl, value)
    for c in shapes["contexts"]:
        value = rows[("decode tok/s", "int4", f"b1 ctx {c}")]["ours"]
        assert value is not None and math.isfinite(value) and value > 0
    checks = data["checks"]
    assert checks["torch_fp16_logits_rel_vs_ours"] <= _tol()
    assert checks["hf_fp16_logits_rel_vs_ours"] <= _tol()


@torch.inference_mode()
def test_grouped_attention_prefill_matches_sdpa(device):
    """The grouped fold (query rows per KV head) is the same causal GQA over a prompt."""
    config = e2e.make_config("tiny")
    w = e2e.Weights(config, device, seed=int(torch.randint(0, 2**31, ())))
    tokens = torch.randint(0, config.vocab_size, (2, 37), device=device)
    pos = torch.arange(5, 42, device=device)
    out = {}
    for attention in ("sdpa", "grouped"):
        ref = torch_ref.build_torch_model(
            config,
            w.tok_embeddings,
            w.layers,
            w.norm,
            w.output,
            int4=False,
            max_batch=2,
            max_seq=64,
            attention=attention,
        )
        for t in ref.k_cache + ref.v_cache:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(7)).to(t))
        out[attention] = ref.logits(ref.forward(tokens, pos))
    assert e2e._rel(out["grouped"], out["sdpa"]) <= _tol()


def _decode_pair(device, precision, attention="sdpa"):
    """Ours (eager) and the torch reference on the same weights and the same random KV
    cache, one decode step at a position past max_position_embeddings (dynamic NTK on)."""
    config = e2e.make_config("tiny")
    w = e2e.Weights(config, device, seed=int(torch.randint(0, 2**31, ())))
    position = config.max_position_embeddings + 23
    max_seq = position + 8
    ours = w.model(precision, 1, max_seq)
    ref = torch_ref.build_torch_model(
        config,
        w.tok_embeddings,
        w.layers_for(precision),
        w.norm,
        w.output,
        int4=precision == "int4",
        max_batch=1,
        max_seq=max_seq,
        attention=attention,
    )
    for mine, theirs in zip(ours.k_cache + ours.v_cache, ref.k_cache + ref.v_cache):
        mine.normal_()
        theirs.copy_(mine)  # the same layout: [slots, kv_heads, max_seq, head_dim]
    tokens = torch.randint(0, config.vocab_size, (1,), device=device)
    positions = torch.tensor([position], dtype=torch.int32, device=device)
    slots = torch.zeros(1, dtype=torch.int32, device=device)
    ours_logits = ours.decode(tokens, slots, positions, e2e.bases_function(config)(positions))
    ref_logits = ref.decode(tokens, positions.long())
    return config, ref, tokens, positions, ours_logits, ref_logits


@pytest.mark.parametrize("attention", ["sdpa", "grouped"])
@torch.inference_mode()
def test_torch_reference_decode_matches_ours_with_ntk(device, attention):
    config, ref, tokens, positions, ours_logits, ref_logits = _decode_pair(device, "fp16", attention)
    assert e2e._rel(ref_logits, ours_logits) <= _tol()
    # The comparison sees the rotary base: the same step with the unscaled base differs.
    ref.cos, ref.sin = torch_ref.rope_tables(dataclasses.replace(config, rope_scaling=None), ref.max_seq, device)
    assert e2e._rel(ref.decode(tokens, positions.long()), ours_logits) > 4 * _tol()


@torch.inference_mode()
def test_torch_reference_int4_decode_matches_ours(device):
    if not torch_ref.tinygemm_available(device):
        pytest.skip("no tinygemm int4 kernel in this torch build")
    *_, ours_logits, ref_logits = _decode_pair(device, "int4")
    # tinygemm runs in bfloat16 (activations, scales, zero points): bfloat16 roundings.
    assert e2e._rel(ref_logits, ours_logits) <= _tol(torch.bfloat16)


def test_unpack_int4_is_our_nibble_order(device):
    w = torch.randn(24, 256, device=device, dtype=torch.float16)
    qw = ops.quantize_int4(w, 128)
    q = torch_ref.unpack_int4(qw)
    assert q.shape == (24, 256) and int(q.min()) >= 0 and int(q.max()) <= 15
    s = qw.scales.double().repeat_interleave(128, dim=1)
    m = qw.offsets.double().repeat_interleave(128, dim=1)
    expected = ops.dequantize_int4(qw, torch.float32).double()
    # w = q * s + m in float32, rounded once: within one float32 rounding of the float64 value.
    assert torch.allclose(q.double() * s + m, expected, rtol=2 * UNIT_ROUNDOFF[torch.float32], atol=0)


def test_tinygemm_matches_our_int4_gemm(device):
    if not torch_ref.tinygemm_available(device):
        pytest.skip("no tinygemm int4 kernel in this torch build")
    qw = ops.quantize_int4(torch.randn(48, 384, device=device, dtype=torch.float16) * 0.02, 128)
    # bfloat16 activations, scales and zero points against ours in float16: a few bfloat16 roundings.
    assert torch_ref.check_tinygemm(qw) <= 4 * UNIT_ROUNDOFF[torch.bfloat16]


def test_speed_ratio_reads_times_inversely():
    assert e2e.speed_ratio({"unit": "tok/s", "ours": 200.0, "hf": 50.0}, "hf") == 4.0
    assert e2e.speed_ratio({"unit": "ms", "ours": 50.0, "hf": 200.0}, "hf") == 4.0
    assert e2e.speed_ratio({"unit": "ms", "ours": 50.0, "hf": None}, "hf") is None


def test_limits_count_weights_and_kv_cache():
    config = e2e.make_config("tiny")
    w = e2e.Weights(config, torch.device("cpu"))
    bench = type("B", (), {})()
    bench.rows = {
        ("decode tok/s", "fp16", "b2 ctx 100"): {
            "metric": "decode tok/s",
            "precision": "fp16",
            "setting": "b2 ctx 100",
            "unit": "tok/s",
            "ours": 10.0,
        }
    }
    e2e.add_limits(bench, w, bandwidth=1e9)
    row = bench.rows[("decode tok/s", "fp16", "b2 ctx 100")]
    c = config
    weights = 2 * (
        c.vocab_size * c.hidden_size
        + c.num_layers
        * (c.qkv_rows * c.hidden_size + c.hidden_size * c.q_size + 3 * c.intermediate_size * c.hidden_size)
    )
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2 * 100 * 2
    assert row["bytes_per_step"] == weights + kv
    assert math.isclose(row["limit"], 2 * 1e9 / (weights + kv))
    assert math.isclose(row["ours_pct_limit"], 100 * 10.0 / row["limit"])


@torch.inference_mode()
def test_pick_attention_times_both_modes(device):
    mode, times = torch_ref.pick_attention(e2e.make_config("tiny"), device, torch.float16, 100, calls=2)
    assert mode in torch_ref.ATTENTION_MODES and set(times) == set(torch_ref.ATTENTION_MODES)
    assert all(math.isfinite(t) and t > 0 for t in times.values()) and times[mode] == min(times.values())


# ---- the long-context mode (--kv-cache) -----------------------------------------------------


def _tiny_weight_bytes(c, precision: str) -> int:
    """Decoder linears + output head, by hand: fp16 values, or int4 g128 (half a byte per
    value, a float16 scale and offset per 128 inputs)."""
    linears = [
        (c.qkv_rows, c.hidden_size),
        (c.hidden_size, c.q_size),
        (2 * c.intermediate_size, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
    ]
    if precision == "int4":
        per_layer = sum(r * k // 2 + 2 * 2 * r * (k // 128) for r, k in linears)
    else:
        per_layer = sum(2 * r * k for r, k in linears)
    return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size


def _tiny_kv_per_token(c, kv: str) -> int:
    # Format v3 (attention.h) for float16 activations, the bench's: a float16 (scale, zero)
    # pair, 4 bytes, per row for int8 and per 16 channels for int4.
    row = {"fp16": 2 * c.head_dim, "int8": c.head_dim + 4, "int4": c.head_dim // 2 + c.head_dim // 16 * 4}[kv]
    return c.num_layers * 2 * c.num_kv_heads * row


def test_kv_cache_mode_tiny(device, tmp_path, capsys):
    from fastinternlm import memory_plan

    config = e2e.make_config("tiny")
    steps, prefill = 2, 21
    # A context whose smallest cache (int4) alone is twice the free memory: the plan must
    # refuse it for every cache type before anything is allocated.
    unfit = 2 * memory_plan.free_memory(device) // _tiny_kv_per_token(config, "int4") + 2
    assert unfit < memory_plan.MAX_SEQ_LIMIT
    fits = [prefill, 77]
    out = tmp_path / "kv.json"
    rc = e2e.main(
        ["--shapes", "tiny", "--device", str(device), "--kv-cache", "fp16,int8", "int4"]
        + ["--contexts", ",".join(map(str, fits)), str(unfit), "--precisions", "fp16", "int4"]
        + ["--steps", str(steps), "--reps", "1", "--prefill", str(prefill), "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "%limit" in printed and "refused by the memory plan (below)" in printed
    data = json.loads(out.read_text())
    assert data["errors"] == [] and data["skipped"] == []
    bandwidth = data["info"]["copy_bandwidth"]
    assert math.isfinite(bandwidth) and bandwidth > 0
    rows = {(r["precision"], r["kv_cache"], r["context"]): r for r in data["rows"]}
    assert set(rows) == {(p, k, c) for p in ("fp16", "int4") for k in e2e.KV_CACHES for c in fits + [unfit]}
    for (precision, kv, ctx), r in rows.items():
        if ctx == unfit:
            assert r["ours"] is None and r["refused"].startswith("the model does not fit: weights ")
            assert f"({kv}, 1 x {unfit + steps + 8} tokens" in r["refused"] and "What would fit:" in r["refused"]
            continue
        assert r["refused"] is None
        for key in ("ours", "limit", "pct_limit", "peak_memory_bytes", "planned_bytes"):
            assert math.isfinite(r[key]) and r[key] > 0, (precision, kv, ctx, key, r[key])
        per_token = _tiny_kv_per_token(config, kv)
        # The cache holds the context and the decode steps, parameters included.
        assert r["cache_bytes"] == per_token * (ctx + steps + 8)
        assert r["peak_memory_bytes"] >= r["cache_bytes"] and r["planned_bytes"] >= r["cache_bytes"]
        # A step at position p reads p + 1 rows: ctx + (steps + 1) / 2 on average.
        expected = _tiny_weight_bytes(config, precision) + per_token * (ctx + (steps + 1) / 2)
        assert r["bytes_per_token"] == pytest.approx(expected, rel=1e-12)
        assert r["limit"] == pytest.approx(bandwidth / expected, rel=1e-12)
        assert r["pct_limit"] == pytest.approx(100 * r["ours"] / r["limit"], rel=1e-12)
        if ctx <= prefill:
            assert r["fill"] == "prefilled" and math.isfinite(r["ttft_s"]) and r["ttft_s"] > 0
        else:
            assert r["fill"] == "written" and r["ttft_s"] is None


@pytest.mark.parametrize("kv", ["int8", "int4"])
@torch.inference_mode()
def test_written_quantized_cache_spans_a_normal_row(device, kv):
    config = e2e.make_config("tiny")
    model = e2e.build_model(config, e2e.random_weights(config, device), max_batch=2, max_seq_len=37, kv_cache=kv)
    e2e.fill_kv_cache(model)
    for c in model.k_cache + model.v_cache:
        values = c.dequantize(torch.float64)
        # zero in [-2, -1.5] and (2^bits - 1) * scale in [3, 4]: every value in [-2, 2.5].
        assert float(values.min()) >= -2 and float(values.max()) <= 2.5
        assert float(values.std()) > 0.5  # random codes over the whole range, not a constant


def test_kv_mode_arguments():
    args = e2e.parse_args(["--shapes", "tiny", "--kv-cache", "int8,int4", "fp16", "--prefill"])
    assert args.kv_cache == ["int8", "int4", "fp16"] and args.contexts == e2e.SHAPES["tiny"]["kv_contexts"]
    assert args.prefill == max(args.contexts)
    with pytest.raises(SystemExit):
        e2e.parse_args(["--kv-cache", "int2"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--prefill", "64"])  # without --kv-cache
