"""memory_plan.py against sizes computed by hand for InternLM2.5-7B's shapes
(/work/shared/notes/internlm2-facts.md: hidden 4096, 32 layers, 32 heads, 8 KV heads,
head_dim 128, ffn 14336, vocab 92544; 6,979,321,856 linear parameters and 379,060,224 in
each of the embeddings and the output head)."""

import subprocess
import sys

import pytest
import torch

from fastinternlm import memory_plan as mp
from fastinternlm.memory_plan import GiB, MemoryPlanError, ModelShape

SHAPE_7B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=92544)
LINEAR_7B = 6_979_321_856
EMBED_7B = 379_060_224
NORMS_7B = 32 * 2 * 4096 + 4096  # two per layer and the final one


def test_weight_bytes_7b_by_hand():
    assert mp.weight_bytes(SHAPE_7B, "bf16") == 2 * (LINEAR_7B + 2 * EMBED_7B + NORMS_7B) == 15_475_417_088
    # int4 with groups of 128: half a byte per weight and a float16 scale and offset per 128
    # weights (4 bytes / 128 = 1/32 byte per weight); embeddings, head and norms in bf16.
    int4 = LINEAR_7B // 2 + LINEAR_7B // 32 + 2 * (2 * EMBED_7B + NORMS_7B)
    assert mp.weight_bytes(SHAPE_7B, "bf16", quant="int4") == int4 == 5_224_538_112
    # The head quantized too.
    head = EMBED_7B // 2 + EMBED_7B // 32
    assert mp.weight_bytes(SHAPE_7B, "bf16", quant="int4", quant_head=True) == int4 - 2 * EMBED_7B + head


def test_kv_per_token_7b_by_hand():
    # 32 layers x (K, V) x 8 KV heads x one row.
    rows = 32 * 2 * 8
    for dtype in ("fp16", "bf16"):
        assert mp.kv_bytes_per_token(SHAPE_7B, dtype, dtype) == rows * 128 * 2 == 128 * 1024
    assert mp.kv_bytes_per_token(SHAPE_7B, "fp32", "fp32") == rows * 128 * 4
    # Format v3: codes plus a (scale, zero) pair per row (int8) or per 16 channels (int4),
    # float32 (8 bytes) with bf16 / fp32 activations, float16 (4 bytes) with fp16 ones.
    for dtype in ("bf16", "fp32"):
        assert mp.kv_bytes_per_token(SHAPE_7B, "int8", dtype) == rows * (128 + 8) == 68 * 1024
        assert mp.kv_bytes_per_token(SHAPE_7B, "int4", dtype) == rows * (64 + 8 * 128 // 16) == 64 * 1024
        assert mp.kv_param_bytes_per_token(SHAPE_7B, "int8", dtype) == rows * 8
        assert mp.kv_param_bytes_per_token(SHAPE_7B, "int4", dtype) == rows * 64
    assert mp.kv_bytes_per_token(SHAPE_7B, "int8", "fp16") == rows * (128 + 4) == 66 * 1024
    assert mp.kv_bytes_per_token(SHAPE_7B, "int4", "fp16") == rows * (64 + 4 * 128 // 16) == 48 * 1024
    assert mp.kv_param_bytes_per_token(SHAPE_7B, "int8", "fp16") == rows * 4
    assert mp.kv_param_bytes_per_token(SHAPE_7B, "int4", "fp16") == rows * 32
    assert mp.kv_param_bytes_per_token(SHAPE_7B, "fp16", "fp16") == 0
    # The torch names work too, and the default is fp16.
    assert mp.kv_bytes_per_token(SHAPE_7B, "int4", torch.float16) == mp.kv_bytes_per_token(SHAPE_7B, "int4")
    assert mp.kv_bytes_per_token(SHAPE_7B, "int4", torch.bfloat16) == 64 * 1024
    with pytest.raises(ValueError, match="dtype must be one of"):
        mp.kv_bytes_per_token(SHAPE_7B, "int4", "fp8")
    # 1M tokens: 128 GiB, 68 / 66 GiB, 64 / 48 GiB.
    assert mp.kv_bytes_per_token(SHAPE_7B, "fp16") << 20 == 128 * GiB
    assert mp.kv_bytes_per_token(SHAPE_7B, "int8", "bf16") << 20 == 68 * GiB
    assert mp.kv_bytes_per_token(SHAPE_7B, "int8", "fp16") << 20 == 66 * GiB
    assert mp.kv_bytes_per_token(SHAPE_7B, "int4", "bf16") << 20 == 64 * GiB
    assert mp.kv_bytes_per_token(SHAPE_7B, "int4", "fp16") << 20 == 48 * GiB


def test_workspace_7b_by_hand():
    # A 2048-token chunk: 3 hidden-size tensors, the fused qkv (48 heads) and its split
    # copy, the attention output (32 heads), the w13 output and the SwiGLU output (3 ffn);
    # decode scratch for one sequence of 256 splits of (D + 2) floats per query head;
    # float32 logits twice.
    rows = 2048 * (3 * 4096 + 2 * 48 * 128 + 32 * 128 + 3 * 14336)
    expected = rows * 2 + 32 * 256 * 130 * 4 + 92544 * 4 * 2
    assert mp.workspace_bytes(SHAPE_7B, "bf16", 1, 2048) == expected
    assert 0.2 * GiB < expected < 0.4 * GiB


def test_one_million_tokens_on_one_80gb_gpu():
    usable = 79 * GiB  # an 80 GB H100 less what the driver and a context keep
    m = 1 << 20
    int4_w_int8_kv = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="int8", dtype="bf16", quant="int4")
    assert int4_w_int8_kv.kv_cache_bytes == 68 * GiB
    assert int4_w_int8_kv.total <= usable, int4_w_int8_kv.describe()
    int4_w_int4_kv = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="int4", dtype="bf16", quant="int4")
    assert int4_w_int4_kv.total <= usable, int4_w_int4_kv.describe()
    fp16 = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="bf16", dtype="bf16")
    assert fp16.total > 2 * usable - 30 * GiB  # 128 GiB of cache alone
    with pytest.raises(MemoryPlanError) as e:
        mp.check_fits(fp16, usable, "an 80 GB GPU")
    msg = str(e.value)
    # The numbers, and what would fit.
    for part in (
        "weights 14.41 GiB",
        "KV cache 128.00 GiB",
        "> 79.00 GiB free on an 80 GB GPU",
        "max_seq_len with kv_cache=int8",
        "max_seq_len with kv_cache=int4",
        "max_batch at this max_seq_len: 0",
    ):
        assert part in msg, msg
    alt = mp.alternatives(fp16, usable)
    # bf16 weights with an int4 cache: float32 parameters (half of int4's bytes) leave it
    # just short of the million on this budget, though above int8.
    assert alt["max_seq_len with kv_cache=int8"] < alt["max_seq_len with kv_cache=int4"] < m
    assert 0 < alt["max_seq_len at this max_batch"] < m
    bf16_int4 = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="int4", dtype="bf16")
    assert bf16_int4.kv_cache_bytes == 64 * GiB and bf16_int4.total > usable, bf16_int4.describe()
    # fp16 weights with an int4 cache (an issue 12 target): float16 parameters (format v3)
    # make the cache 48 GiB, and the million fits with room to spare; fp16 + int8 (66 GiB)
    # does not.
    fp16_int4 = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="int4", dtype="fp16")
    assert fp16_int4.kv_cache_bytes == 48 * GiB and fp16_int4.kv_params == 16 * GiB  # a third: 32 of 96 bytes
    assert fp16_int4.total <= usable - 10 * GiB, fp16_int4.describe()
    assert mp.largest_context(SHAPE_7B, usable, kv_cache="int4", dtype="fp16") >= m
    mp.check_fits(fp16_int4, usable, "an 80 GB GPU")
    fp16_int8 = mp.plan(SHAPE_7B, max_seq_len=m, kv_cache="int8", dtype="fp16")
    assert fp16_int8.kv_cache_bytes == 66 * GiB and fp16_int8.total > usable, fp16_int8.describe()


def test_largest_context_is_the_largest():
    free = 40 * GiB
    for kv in ("bf16", "int8", "int4"):
        n = mp.largest_context(SHAPE_7B, free, kv_cache=kv, dtype="bf16", max_batch=3)
        assert n % 64 == 0
        assert mp.plan(SHAPE_7B, max_seq_len=n, max_batch=3, kv_cache=kv, dtype="bf16").total <= free
        assert mp.plan(SHAPE_7B, max_seq_len=n + 64, max_batch=3, kv_cache=kv, dtype="bf16").total > free
        b = mp.largest_batch(SHAPE_7B, free, max_seq_len=8191, kv_cache=kv, dtype="bf16")
        assert mp.plan(SHAPE_7B, max_seq_len=8191, max_batch=b, kv_cache=kv, dtype="bf16").total <= free
        assert mp.plan(SHAPE_7B, max_seq_len=8191, max_batch=b + 1, kv_cache=kv, dtype="bf16").total > free
    # Weights alone over the budget: nothing fits.
    assert mp.largest_context(SHAPE_7B, 10 * GiB, dtype="bf16") == 0


def test_resolve_auto_and_refusal():
    free = 30 * GiB
    p = mp.resolve(SHAPE_7B, "cpu", max_seq_len="auto", max_batch=1, kv_cache="int4", dtype=torch.bfloat16, free=free)
    assert p.max_seq_len == mp.largest_context(SHAPE_7B, free, kv_cache="int4", dtype="bf16")
    assert p.total <= free
    with pytest.raises(MemoryPlanError, match="does not fit"):
        mp.resolve(
            SHAPE_7B, "cpu", max_seq_len=p.max_seq_len * 2, max_batch=1, kv_cache="int4", dtype="bf16", free=free
        )
    # Weights already resident: only the cache, workspace and reserve count.
    q = mp.resolve(
        SHAPE_7B, "cpu", max_seq_len="auto", max_batch=1, kv_cache="int4", dtype="bf16", free=free, weights=0
    )
    assert q.weights == 0 and q.max_seq_len > p.max_seq_len
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        mp.plan(SHAPE_7B, max_seq_len=5, max_batch=0)
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        mp.plan(SHAPE_7B, max_seq_len=5, kv_cache="int2")


def test_report_and_cli(tmp_path):
    from model_fixtures import write_tiny_internlm2

    text = mp.report(SHAPE_7B, dtype="bf16", quant="int4")
    assert "KV cache per token" in text and "1M tokens: 68.00 GiB" in text and "80 GB" in text
    # fp16 activations: float16 parameters, int8 66 GiB and int4 48 GiB per 1M tokens.
    text = mp.report(SHAPE_7B, dtype="fp16")
    assert "int8      66.0 KiB (parameters 2.0 KiB); 1M tokens: 66.00 GiB" in text, text
    assert "int4      48.0 KiB (parameters 16.0 KiB); 1M tokens: 48.00 GiB" in text, text
    ck = write_tiny_internlm2(tmp_path / "m", dtype=torch.float32, seed=3)
    out = subprocess.run(
        [sys.executable, "-m", "fastinternlm", "info", str(ck.path), "--plan"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "memory plan for" in out and "largest context per GPU" in out and "int4" in out


# ---- GGUF: the plan from the header, before any tensor data is read -------------------------


@pytest.fixture(scope="module", params=["all_q4_tied", "mixed_untied"])
def tiny_gguf(request, tmp_path_factory):
    test_gguf = pytest.importorskip("test_gguf")
    types = test_gguf.ALL_Q4_TIED if request.param == "all_q4_tied" else test_gguf.MIXED_UNTIED
    seed = int(torch.randint(0, 2**31, ()))
    return test_gguf.write_tiny_gguf(
        tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", test_gguf.TinyBPE("smollm"), types, seed=seed
    ).path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gguf_weight_bytes_from_the_header_equal_the_loaded_weights(tiny_gguf, dtype):
    from fastinternlm.weights import gguf as gguf_loader
    from fastinternlm.weights.args import check_load_args

    meta, tensors = gguf_loader._open(str(tiny_gguf), check_data=False)
    config = gguf_loader.config_from_metadata(meta, tensors, gguf_loader.GGUFTokenizer(meta))
    predicted = gguf_loader.weight_bytes(config, tensors, dtype)
    _, _, _, weights = gguf_loader.read_gguf(tiny_gguf, check_load_args("cpu", dtype, max_seq_len=64, progress=False))
    assert predicted == weights.nbytes()


def _unfit_context(shape: ModelShape, kv_cache: str, dtype: str) -> int:
    """A context whose KV cache alone is twice this machine's free memory (capped at the
    kernels' position limit, which is past any CPU's memory for these shapes)."""
    per_token = mp.kv_bytes_per_token(shape, kv_cache if kv_cache else dtype)
    n = min(mp.MAX_SEQ_LIMIT, 2 * mp.free_memory("cpu") // per_token + 2)
    assert mp.plan(shape, max_seq_len=n, kv_cache=kv_cache, dtype=dtype).total > mp.free_memory("cpu")
    return n


@pytest.mark.parametrize("kv_cache", [None, "int8", "int4"])
def test_gguf_context_that_cannot_fit_is_refused_before_tensor_data(tmp_path, monkeypatch, kv_cache):
    """The plan runs from the header: a file whose tensor data would be refused when read
    (a Q4_0 block scale too large for float16) gets the memory refusal instead, and no
    tensor is converted before it."""
    import numpy as np

    import fastinternlm
    from fastinternlm.weights import gguf as gguf_loader
    from fastinternlm.weights.args import check_load_args
    from fastinternlm.weights.gguf import GGUFError

    test_gguf = pytest.importorskip("test_gguf")
    tokenizer = test_gguf.TinyBPE("smollm")
    seed = int(torch.randint(0, 2**31, ()))
    good = test_gguf.write_tiny_gguf(tmp_path / "good.gguf", tokenizer, test_gguf.ALL_Q4_TIED, seed=seed).path
    # float32 on the CPU (GGUF's default there), as the refused load below would build them.
    args = check_load_args("cpu", None, max_seq_len=64, progress=False)
    loaded_bytes = gguf_loader.read_gguf(good, args)[3].nbytes()

    def huge_first_scale(raw):
        raw = raw.copy()
        raw[0, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)
        return raw

    bad = test_gguf.write_tiny_gguf(
        tmp_path / "bad.gguf",
        tokenizer,
        test_gguf.ALL_Q4_TIED,
        seed=seed,
        raw_override={"blk.1.attn_v.weight": huge_first_scale},
    ).path
    meta, tensors = gguf_loader._open(str(bad))
    shape = ModelShape.from_config(gguf_loader.config_from_metadata(meta, tensors, gguf_loader.GGUFTokenizer(meta)))
    n = _unfit_context(shape, kv_cache, "fp32")
    # A context that fits reaches the data, whose conversion refuses the block.
    with pytest.raises(GGUFError, match=r"blk\.1\.attn_v\.weight \(Q4_0\).*10000"):
        fastinternlm.load(bad, device="cpu", max_seq_len=64, kv_cache=kv_cache, progress=False)

    def no_reads(*args, **kwargs):
        raise AssertionError("tensor data was read before the memory plan")

    monkeypatch.setattr(gguf_loader, "int4_parts", no_reads)
    monkeypatch.setattr(gguf_loader, "dense", no_reads)
    with pytest.raises(MemoryPlanError) as e:
        fastinternlm.load(bad, device="cpu", max_seq_len=n, kv_cache=kv_cache, progress=False)
    message = str(e.value)
    # The plan's message: the weights as they would load (the header's count equals what a
    # real load of the same tensors built), the cache at this context, and what would fit.
    assert message.startswith(f"the model does not fit: weights {mp.gib(loaded_bytes)} + KV cache ")
    assert f"({kv_cache or 'fp32'}, 1 x {n} tokens" in message and "free on cpu. What would fit:" in message
    assert "max_seq_len at this max_batch" in message
