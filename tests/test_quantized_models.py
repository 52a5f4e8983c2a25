"""int4 models: quantization while loading (`fastinternlm.load(..., quant="int4")`), its
accuracy per group size on tiny InternLM2 checkpoints, and the `fastinternlm quantize`
round trip (quantize -> load gives the very same model as quantizing at load)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import UNIT_ROUNDOFF
import fastinternlm
from fastinternlm.config import ConfigError
from fastinternlm.ops import Int4Weight, quantize_int4
from fastinternlm.weights import files as files_module
from fastinternlm.weights import hf as hf_module
from fastinternlm.weights.files import CheckpointError
from fastinternlm.weights.hf import load_checkpoint
from fastinternlm.weights.layout import concat_rows
from fastinternlm.weights.quantize import quantize_checkpoint
from model_fixtures import (
    TinyCheckpoint,
    hf_llama_reference,
    read_checkpoint,
    reference_forward,
    write_tiny_internlm2,
    write_tiny_llama,
)

FFN = 256  # a multiple of 128, so w2's input splits into whole groups of every size
GROUP_SIZES = [32, 64, 128]
# model.Layer's linears -> the checkpoint linears whose rows they stack.
LAYER_NAMES = {
    "wqkv": ("attention.wqkv",),
    "wo": ("attention.wo",),
    "w13": ("feed_forward.w1", "feed_forward.w3"),
    "w2": ("feed_forward.w2",),
}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    # float32 storage: the int4 weights are quantized from exactly these values.
    return write_tiny_internlm2(tmp_path_factory.mktemp("fp32"), dtype=torch.float32, ffn=FFN, seed=7)


def act_dtype(device):
    return torch.float32 if device.type == "cpu" else torch.float16


def load(path, device, **kw):
    kw.setdefault("dtype", act_dtype(device))
    return fastinternlm.load(path, device=device, max_seq_len=96, progress=False, **kw)


def random_ids(ck, n):
    return torch.randint(3, ck.tokenizer.vocab_size - 6, (n,)).tolist()


def nibbles(qw: Int4Weight) -> torch.Tensor:
    """Packed format v1 read back independently: nibble i of word j of row r is W[r, 8j + i]."""
    words = qw.qweight.cpu().to(torch.int64)
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for i in range(8):
        out[:, i::8] = (words >> (4 * i)) & 15
    return out


def dequant64(qw: Int4Weight) -> torch.Tensor:
    """q * s + m in float64 (exact)."""
    g = qw.group_size
    return nibbles(qw).double() * qw.scales.cpu().double().repeat_interleave(
        g, 1
    ) + qw.offsets.cpu().double().repeat_interleave(g, 1)


def same_int4(a: Int4Weight, b: Int4Weight) -> bool:
    return (
        a.group_size == b.group_size
        and torch.equal(a.qweight.cpu(), b.qweight.cpu())
        and torch.equal(a.scales.cpu(), b.scales.cpu())
        and torch.equal(a.offsets.cpu(), b.offsets.cpu())
    )


def dense_checkpoint(ck: TinyCheckpoint, weights) -> TinyCheckpoint:
    """The float64 stand-in of loaded weights (int4 linears dequantized here), in
    InternLM2 naming, for reference_forward and hf_llama_reference."""
    t = {"model.tok_embeddings.weight": weights.tok_embeddings, "model.norm.weight": weights.norm}
    t["output.weight"] = weights.output
    for i, layer in enumerate(weights.layers):
        t[f"model.layers.{i}.attention_norm.weight"] = layer.attention_norm
        t[f"model.layers.{i}.ffn_norm.weight"] = layer.ffn_norm
        for field, names in LAYER_NAMES.items():
            w = getattr(layer, field)
            w = dequant64(w) if isinstance(w, Int4Weight) else w.cpu().double()
            for name, rows in zip(names, w.chunk(len(names))):
                t[f"model.layers.{i}.{name}.weight"] = rows
    t = {n: dequant64(v) if isinstance(v, Int4Weight) else v.cpu().double() for n, v in t.items()}
    return TinyCheckpoint(ck.path, ck.config, t, t, ck.tokenizer)


def assert_logits_like_hf(ours, dense_ck, ids, dtype):
    """Our logits against the float64 forward of the same weights: no more than twice the
    error HF transformers makes in the same dtype (test_model's oracle), plus one
    rounding of the logits as a floor."""
    ref = reference_forward(dense_ck, ids)
    with torch.no_grad():
        hf = hf_llama_reference(dense_ck, dtype)(torch.tensor([ids])).logits[0].double()
    err = (ours.double().cpu() - ref).abs().max().item()
    err_hf = (hf - ref).abs().max().item()
    floor = UNIT_ROUNDOFF[dtype] * ref.abs().mean().item()
    assert err <= 2 * err_hf + floor, f"int4 {err:.3e} vs HF {err_hf:.3e} (floor {floor:.1e})"


# ---- what quant="int4" builds ---------------------------------------------------------------


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quant_at_load_weights(device, ck, group_size):
    """Every decoder linear is the Int4Weight of its checkpoint values; embeddings, norms
    and the head stay dense in the activation dtype; gate and up are stacked by rows."""
    dtype = act_dtype(device)
    _, weights = load_checkpoint(ck.path, device, dtype, progress=False, quant="int4", group_size=group_size)
    src = ck.internlm2_tensors
    for i, layer in enumerate(weights.layers):
        for field, names in LAYER_NAMES.items():
            w = getattr(layer, field)
            assert isinstance(w, Int4Weight) and w.device == device and w.group_size == group_size
            expected = concat_rows(
                *(quantize_int4(src[f"model.layers.{i}.{name}.weight"].to(device), group_size) for name in names)
            )
            assert same_int4(w, expected), (i, field)
        for norm in ("attention_norm", "ffn_norm"):
            t = getattr(layer, norm)
            assert t.dtype == dtype and torch.equal(t.cpu(), src[f"model.layers.{i}.{norm}.weight"].to(dtype))
    for field, name in (
        ("tok_embeddings", "model.tok_embeddings.weight"),
        ("norm", "model.norm.weight"),
        ("output", "output.weight"),
    ):
        t = getattr(weights, field)
        assert isinstance(t, torch.Tensor) and t.dtype == dtype and torch.equal(t.cpu(), src[name].to(dtype))
    llm = load(ck.path, device, quant="int4", group_size=group_size)
    for layer, lw in zip(llm.model.layers, weights.layers):
        assert isinstance(layer.w13, Int4Weight)
        assert same_int4(layer.w13, lw.w13)


def test_quant_at_load_llama_equals_internlm2(device, tmp_path):
    """Llama's q/k/v are quantized one by one and their rows placed into the fused wqkv:
    the same Int4Weight as quantizing InternLM2's fused wqkv (groups run along inputs)."""
    a = write_tiny_llama(tmp_path / "llama", dtype=torch.bfloat16, ffn=FFN, seed=2, shards=3)
    b = write_tiny_internlm2(tmp_path / "internlm2", dtype=torch.bfloat16, ffn=FFN, seed=2)
    _, wa = load_checkpoint(a.path, device, torch.bfloat16, progress=False, quant="int4", group_size=64)
    _, wb = load_checkpoint(b.path, device, torch.bfloat16, progress=False, quant="int4", group_size=64)
    for la, lb in zip(wa.layers, wb.layers):
        for field in LAYER_NAMES:
            assert same_int4(getattr(la, field), getattr(lb, field)), field


@pytest.mark.parametrize("tied", [False, True])
def test_quant_head(device, tmp_path, tied):
    c = write_tiny_llama(tmp_path, dtype=torch.float32, ffn=FFN, seed=4, tie_word_embeddings=tied)
    dtype = act_dtype(device)
    _, w = load_checkpoint(c.path, device, dtype, progress=False, quant="int4", group_size=32, quant_head=True)
    head = c.tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert isinstance(w.output, Int4Weight) and same_int4(w.output, quantize_int4(head.to(device), 32))
    assert isinstance(w.tok_embeddings, torch.Tensor)
    assert torch.equal(w.tok_embeddings.cpu(), c.tensors["model.embed_tokens.weight"].to(dtype))
    _, w = load_checkpoint(c.path, device, dtype, progress=False, quant="int4", group_size=32)
    assert isinstance(w.output, torch.Tensor) and (w.output is w.tok_embeddings) == tied
    llm = load(c.path, device, quant="int4", group_size=32, quant_head=True)
    ids = random_ids(c, 9)
    assert llm.logits(ids).shape == (9, c.config["vocab_size"])


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_model_computes_its_weights(device, ck, group_size):
    """The int4 path's logits are the logits of the model whose weights are the
    dequantized int4 weights (as exactly as HF computes that model in the same dtype)."""
    dtype = act_dtype(device)
    llm = load(ck.path, device, quant="int4", group_size=group_size, quant_head=True)
    _, weights = load_checkpoint(
        ck.path, "cpu", torch.float32, progress=False, quant="int4", group_size=group_size, quant_head=True
    )
    ids = random_ids(ck, 40)
    assert_logits_like_hf(llm.logits(ids), dense_checkpoint(ck, weights), ids, dtype)


def test_int4_greedy_tokens_equal_hf_on_dequantized_weights(ck):
    llm = load(ck.path, torch.device("cpu"), quant="int4", group_size=64)
    _, weights = load_checkpoint(ck.path, "cpu", torch.float32, progress=False, quant="int4", group_size=64)
    hf = hf_llama_reference(dense_checkpoint(ck, weights), torch.float32)
    prompt = random_ids(ck, 20)
    ours = llm.generate(prompt, max_new_tokens=24)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=sorted(llm.stop_ids),
            pad_token_id=2,
        )
    assert ours.token_ids == out[0, len(prompt) :].tolist()


def test_int4_error_table(device, ck, capsys):
    """int4 vs the same checkpoint in the activation dtype, per group size. Bound: each
    weight's rounding error is within s/2; taken as independent and uniform it has RMS
    s/sqrt(12), so each quantized linear's output moves by about rho = RMS(s/sqrt(12)) /
    RMS(w) relative, and the 4 quantized linears per layer on the path of a logit add in
    quadrature: relative RMS logit error <= sqrt(4 * layers) * rho (first order). Finer
    groups have smaller steps: the error must fall with the group size."""
    dtype = act_dtype(device)
    layers = ck.config["num_hidden_layers"]
    ids = random_ids(ck, 48)
    fp = load(ck.path, device).logits(ids).double().cpu()
    rows, errors = [], []
    for g in GROUP_SIZES:
        llm = load(ck.path, device, quant="int4", group_size=g)
        q = llm.logits(ids).double().cpu()
        rel = ((q - fp).pow(2).mean() / fp.pow(2).mean()).sqrt().item()
        step = sum(
            (w.scales.double().pow(2) / 12).sum().item() * g
            for layer in llm.model.layers
            for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)
        )
        size = sum(
            dequant64(w).pow(2).sum().item()
            for layer in llm.model.layers
            for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)
        )
        rho = math.sqrt(step / size)
        top1 = (q.argmax(-1) == fp.argmax(-1)).double().mean().item()
        rows.append(
            f"| {g} | {rel:.4f} | {(q - fp).abs().max().item():.4f} | {fp.abs().mean().item():.4f} | "
            f"{top1:.1%} | {rho:.4f} | {math.sqrt(4 * layers) * rho:.4f} |"
        )
        errors.append(rel)
        assert rel <= math.sqrt(4 * layers) * rho, (g, rel, rho)
    with capsys.disabled():
        print(f"\nint4 vs {str(dtype).replace('torch.', '')} on {device.type}, {len(ids)} tokens")
        print("| group size | rel. RMS logit error | max abs error | mean abs logit | top-1 agreement | rho | bound |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    assert errors[0] < errors[1] < errors[2]


def test_quant_at_load_is_streamed(ck, monkeypatch):
    """Each linear is quantized right after it is read, before the next tensor is read,
    so one dense tensor at most is alive on the device besides the quantized model."""
    events = []
    real_read, real_quantize = files_module.read_tensor, hf_module.quantize_int4

    def read(handle, name):
        events.append(("read", name))
        return real_read(handle, name)

    def quantize(w, group_size):
        events.append(("quantize", tuple(w.shape)))
        return real_quantize(w, group_size)

    monkeypatch.setattr(files_module, "read_tensor", read)
    monkeypatch.setattr(hf_module, "quantize_int4", quantize)
    load_checkpoint(ck.path, "cpu", torch.float32, progress=False, quant="int4", group_size=128)
    linears = [
        n for n in ck.tensors if n.startswith("model.layers.") and ".norm" not in n and not n.endswith("norm.weight")
    ]
    assert len([e for e in events if e[0] == "quantize"]) == len(linears) == 5 * ck.config["num_hidden_layers"]
    for i, (kind, what) in enumerate(events):
        if kind == "read" and what in linears:
            assert events[i + 1] == ("quantize", tuple(ck.tensors[what].shape)), what


def test_progress_bar_names_int4(ck, capsys):
    load_checkpoint(ck.path, "cpu", progress=True, quant="int4", group_size=64)
    err = capsys.readouterr().err
    assert f"Loading {ck.path.name} (int4, group_size 64)" in err and "100%" in err


# ---- arguments, checked before any work --------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(files_module, "read_tensor", refuse)
    monkeypatch.setattr(hf_module, "load_tokenizer", refuse)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"quant": "int8"}, ValueError, "quant must be None or 'int4', got 'int8'"),
        ({"quant": "int4", "group_size": 100}, ValueError, r"group_size must be one of \(32, 64, 128\), got 100"),
        ({"quant": "int4", "group_size": "128"}, TypeError, "group_size must be an int, got str"),
        ({"quant": "int4", "group_size": True}, TypeError, "group_size must be an int, got bool"),
        ({"quant": "int4", "quant_head": 1}, TypeError, "quant_head must be True or False, got 1"),
        ({"group_size": 64}, ValueError, "group_size and quant_head apply to quant='int4' only"),
        ({"quant_head": True}, ValueError, "group_size and quant_head apply to quant='int4' only"),
    ],
)
def test_bad_quant_arguments(ck, no_work, kwargs, error, message):
    with pytest.raises(error, match=message):
        fastinternlm.load(ck.path, device="cpu", progress=False, **kwargs)


def test_group_size_must_divide_inputs(tmp_path, monkeypatch):
    """The tiny fixture's default ffn 236 is no multiple of 32: named before any tensor is read."""
    c = write_tiny_internlm2(tmp_path, ffn=236)
    monkeypatch.setattr(files_module, "read_tensor", lambda h, n: pytest.fail(f"{n} was read"))
    with pytest.raises(
        ValueError,
        match=r"int4 quantization with group_size=32 needs each quantized linear's input "
        r"size to be a multiple of 32, but intermediate_size = 236 \(the input size "
        r"of model\.layers\.0\.feed_forward\.w2",
    ):
        fastinternlm.load(c.path, device="cpu", quant="int4", group_size=32, progress=False)
    c = write_tiny_internlm2(tmp_path / "b", ffn=FFN, heads=3, kv_heads=1)  # hidden 192: not a multiple of 128
    with pytest.raises(ValueError, match="but hidden_size = 192 .the input size of model.layers.0.attention.wqkv"):
        load_checkpoint(c.path, quant="int4", group_size=128, progress=False)
    with pytest.raises(ValueError, match="but hidden_size = 192"):
        quantize_checkpoint(c.path, tmp_path / "out", group_size=128, progress=False)


# ---- the quantize command ----------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastinternlm", "quantize", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "arch,dtype,fmt,group_size,quant_head,tied",
    [
        ("internlm2", torch.bfloat16, "safetensors", 128, False, False),
        ("internlm2", torch.float32, "bin", 32, True, False),
        ("llama", torch.float16, "bin", 64, True, True),
        ("llama", torch.bfloat16, "safetensors", 128, False, True),
    ],
)
def test_quantize_cli_round_trip(device, tmp_path, arch, dtype, fmt, group_size, quant_head, tied):
    if arch == "internlm2":
        src = write_tiny_internlm2(tmp_path / "in", dtype=dtype, ffn=FFN, seed=9, fmt=fmt, shards=2)
    else:
        src = write_tiny_llama(
            tmp_path / "in", dtype=dtype, ffn=FFN, seed=9, fmt=fmt, shards=3, tie_word_embeddings=tied
        )
    out = tmp_path / "out"
    args = [src.path, out, "--group-size", group_size, "--device", device.type]
    run = run_cli(*args, *(["--quant-head"] if quant_head else []))
    assert run.returncode == 0, run.stderr
    # config.json: the input's, plus our quantization_config.
    config = json.loads((out / "config.json").read_text())
    assert config.pop("quantization_config") == {
        "quant_method": "fastinternlm-int4",
        "format_version": 1,
        "group_size": group_size,
        "quant_head": quant_head,
    }
    assert config == src.config
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src.path / name).read_bytes(), name
    # Tensors: each quantized linear's four parts; everything else the input's bytes.
    _, stored = read_checkpoint(out)
    for name, t in src.tensors.items():
        module = name[: -len(".weight")]
        is_head = module in ("output", "lm_head")
        if name.startswith("model.layers.") and not name.endswith("norm.weight") or (is_head and quant_head):
            assert name not in stored
            assert stored[module + ".qweight"].dtype == torch.int32
            assert stored[module + ".scales"].dtype == stored[module + ".offsets"].dtype == torch.float16
            assert stored[module + ".int4_format"].tolist() == [1, t.shape[0], t.shape[1], group_size]
        else:
            assert stored[name].dtype == t.dtype and torch.equal(stored[name], t), name
    if tied and quant_head:
        assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    # Loading it gives the model quantization at load builds, bit for bit.
    a = load(out, device)
    b = load(src.path, device, quant="int4", group_size=group_size, quant_head=quant_head)
    for la, lb in zip(a.model.layers, b.model.layers):
        for field in ("wqkv", "wo", "w13", "w2"):
            assert same_int4(getattr(la, field), getattr(lb, field)), field
    assert isinstance(a.model.output, Int4Weight) == quant_head
    ids = random_ids(src, 30)
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert a.generate(ids, max_new_tokens=8).token_ids == b.generate(ids, max_new_tokens=8).token_ids


def test_quantize_sharded_output(tmp_path, ck):
    out = quantize_checkpoint(
        ck.path, tmp_path / "out", group_size=64, device="cpu", progress=False, max_shard_bytes=300_000
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 2 and all((tmp_path / "out" / f).is_file() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list((tmp_path / "out").glob(".shard-*"))
    a, b = load(out, torch.device("cpu")), load(ck.path, torch.device("cpu"), quant="int4", group_size=64)
    ids = random_ids(ck, 12)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_quantize_refusals(tmp_path, ck):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ValueError, match="output directory .*busy exists and is not empty"):
        quantize_checkpoint(ck.path, tmp_path / "busy", progress=False)
    with pytest.raises(ValueError, match="the output directory must differ from the input directory"):
        quantize_checkpoint(ck.path, ck.path, progress=False)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\), got 96"):
        quantize_checkpoint(ck.path, tmp_path / "o1", group_size=96, progress=False)
    with pytest.raises(TypeError, match="quant_head must be True or False"):
        quantize_checkpoint(ck.path, tmp_path / "o1", quant_head="no", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "o1", progress=False)
    done = quantize_checkpoint(ck.path, tmp_path / "q", group_size=128, device="cpu", progress=False)
    with pytest.raises(ValueError, match="is already quantized .quantization_config.quant_method 'fastinternlm-int4'"):
        quantize_checkpoint(done, tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="is already quantized"):
        fastinternlm.load(done, device="cpu", quant="int4", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    run = run_cli(ck.path, tmp_path / "busy")
    assert run.returncode == 2 and "error: output directory" in run.stderr
    run = run_cli(ck.path, tmp_path / "o3", "--group-size", "96")
    assert run.returncode == 2 and "invalid choice: 96" in run.stderr


# ---- a quantized checkpoint is validated like any other ----------------------------------


@pytest.fixture(scope="module")
def quantized(ck, tmp_path_factory):
    return quantize_checkpoint(
        ck.path,
        tmp_path_factory.mktemp("q") / "out",
        group_size=64,
        device="cpu",
        progress=False,
        max_shard_bytes=2_000_000,
    )


def _copy_edit(src, dst, mutate=None, config_change=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if mutate is not None:
        for file in sorted(dst.glob("*.safetensors")):
            tensors = load_file(file)
            mutate(tensors)
            save_file(tensors, file)
    if config_change is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"].update(config_change)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda t: t.pop("model.layers.1.feed_forward.w3.offsets", None),
            r"missing tensor\(s\) model\.layers\.1\.feed_forward\.w3\.offsets",
        ),
        (
            lambda t: (
                t.update({"model.layers.0.attention.wo.scales": torch.ones(384, 3, dtype=torch.float16)})
                if "model.layers.0.attention.wo.scales" in t
                else None
            ),
            r"tensor model\.layers\.0\.attention\.wo\.scales has shape \(384, 3\), expected \(384, 6\)",
        ),
        (
            lambda t: (
                t.update({"model.layers.0.attention.wo.qweight": torch.zeros(384, 48, dtype=torch.int64)})
                if "model.layers.0.attention.wo.qweight" in t
                else None
            ),
            r"tensor model\.layers\.0\.attention\.wo\.qweight has dtype I64, expected int32",
        ),
        (
            lambda t: (
                t.update({"model.layers.1.attention.wqkv.weight": torch.zeros(640, 384)})
                if "model.layers.1.attention.wqkv.qweight" in t
                else None
            ),
            r"unexpected tensor\(s\) model\.layers\.1\.attention\.wqkv\.weight",
        ),
    ],
)
def test_bad_quantized_tensors_fail_before_reading(tmp_path, quantized, monkeypatch, mutate, message):
    path = _copy_edit(quantized, tmp_path / "bad", mutate)
    monkeypatch.setattr(files_module, "read_tensor", lambda h, n: pytest.fail(f"{n} was read"))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, progress=False)


def test_bad_quantized_config(tmp_path, quantized):
    with pytest.raises(ConfigError, match="format_version must be 1 .the packed layout this build reads., got 2"):
        load_checkpoint(_copy_edit(quantized, tmp_path / "a", config_change={"format_version": 2}), progress=False)
    with pytest.raises(ConfigError, match=r"group_size must be one of \(32, 64, 128\), got 256"):
        load_checkpoint(_copy_edit(quantized, tmp_path / "b", config_change={"group_size": 256}), progress=False)
    # Shapes follow the declared group size: 128 instead of the 64 the tensors were made with.
    with pytest.raises(CheckpointError, match=r"scales has shape \(640, 6\), expected \(640, 3\)"):
        load_checkpoint(_copy_edit(quantized, tmp_path / "c", config_change={"group_size": 128}), progress=False)


def test_int4_format_record_is_checked(tmp_path, quantized):
    name = "model.layers.0.feed_forward.w2.int4_format"

    def mutate(t):
        if name in t:
            t[name] = torch.tensor([1, 384, 512, 64])

    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.feed_forward\.w2: int4_format records n, k = 384, "
        r"512 but the tensors hold 384, 256",
    ):
        load_checkpoint(_copy_edit(quantized, tmp_path / "a", mutate), progress=False)
