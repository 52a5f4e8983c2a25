"""Checkpoint loading (both architectures, safetensors and .bin, sharded or not), the
wqkv layout, failing before any tensor data is read, and the test fixtures' references."""

import json
import math

import pytest
import torch

from conftest import UNIT_ROUNDOFF, assert_close, rand
from fastinternlm.config import ConfigError, ModelConfig
from fastinternlm.model import Layer, ModelWeights
from fastinternlm.weights import files as files_module
from fastinternlm.weights.files import CheckpointError
from fastinternlm.weights.hf import load_checkpoint
from fastinternlm.weights.layout import fuse_qkv, split_wqkv
from model_fixtures import (  # noqa: F401 (tiny_internlm2, tiny_llama: pytest fixtures)
    grouped_row,
    hf_llama_reference,
    read_checkpoint,
    reference_forward,
    split_by_formula,
    tiny_internlm2,
    tiny_llama,
    write_tiny_internlm2,
    write_tiny_llama,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]

LAYER_NAMES = {
    "attention_norm": "attention_norm.weight",
    "wqkv": "attention.wqkv.weight",
    "wo": "attention.wo.weight",
    "ffn_norm": "ffn_norm.weight",
    "w13": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
    "w2": "feed_forward.w2.weight",
}


def assert_matches_internlm2(weights: ModelWeights, internlm2: dict, dtype, device):
    """Every canonical weight equals the stored InternLM2-layout tensor after one
    conversion to `dtype` (exact: the loader converts each value once, like .to())."""

    def same(actual, name):
        # A tuple of names: their rows stacked (w13 = gate rows, then up rows).
        expected = (torch.cat([internlm2[n] for n in name]) if isinstance(name, tuple) else internlm2[name]).to(dtype)
        assert actual.dtype == dtype and actual.device.type == device.type, name
        assert actual.is_contiguous(), name
        assert torch.equal(actual.cpu(), expected), name

    same(weights.tok_embeddings, "model.tok_embeddings.weight")
    same(weights.norm, "model.norm.weight")
    if "output.weight" in internlm2:
        same(weights.output, "output.weight")
        assert weights.output is not weights.tok_embeddings
    else:
        assert weights.output is weights.tok_embeddings
    layers = {int(n.split(".")[2]) for n in internlm2 if n.startswith("model.layers.")}
    assert len(weights.layers) == len(layers)
    for i, layer in enumerate(weights.layers):
        for field, suffix in LAYER_NAMES.items():
            names = (
                tuple(f"model.layers.{i}.{s}" for s in suffix)
                if isinstance(suffix, tuple)
                else f"model.layers.{i}.{suffix}"
            )
            same(getattr(layer, field), names)


def _config(heads, kv_heads, head_dim):
    return ModelConfig.from_dict(
        {
            "architectures": ["InternLM2ForCausalLM"],
            "vocab_size": 11,
            "hidden_size": heads * head_dim,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": 7,
        }
    )


# ---- loading ------------------------------------------------------------------------------


def test_load_tiny_internlm2(device, tiny_internlm2):
    config, weights = load_checkpoint(tiny_internlm2.path, device, progress=False)
    assert config.architecture == "InternLM2ForCausalLM"
    assert config.eos_token_ids == (2, tiny_internlm2.tokenizer.im_end)
    # dtype None: the checkpoint's declared torch_dtype.
    assert_matches_internlm2(weights, tiny_internlm2.internlm2_tensors, torch.bfloat16, device)
    assert weights.nbytes() == sum(t.numel() * 2 for t in tiny_internlm2.tensors.values())
    names = [n for n, _ in weights.named_tensors()]
    assert names[0] == "tok_embeddings" and names[-1] == "output" and "layers.1.wqkv" in names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_load_formats(device, tmp_path, dtype, fmt, shards):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    ck = write_tiny_internlm2(
        tmp_path, dtype=torch.float32 if fmt == "bin" else torch.bfloat16, shards=shards, fmt=fmt, layers=3, seed=shards
    )
    config, weights = load_checkpoint(tmp_path, device, dtype, progress=False)
    assert config.num_layers == 3
    assert_matches_internlm2(weights, ck.internlm2_tensors, dtype, device)


def test_load_legacy_bin(device, tmp_path):
    """Pre-zip pickles cannot be memory-mapped; they are read whole, one shard at a time."""
    ck = write_tiny_internlm2(tmp_path, fmt="bin", shards=2, seed=9)
    for file in tmp_path.glob("*.bin"):
        tensors = torch.load(file, weights_only=True)
        torch.save(tensors, file, _use_new_zipfile_serialization=False)
    _, weights = load_checkpoint(tmp_path, device, torch.float16, progress=False)
    assert_matches_internlm2(weights, ck.internlm2_tensors, torch.float16, device)


@pytest.mark.parametrize("fmt,shards", [("safetensors", 3), ("bin", 2)])
def test_load_llama_equals_internlm2(device, tmp_path, fmt, shards):
    """The Llama checkpoint of the same random model (q/k/v split by the row formula,
    spread over shards) loads to the same canonical weights."""
    ck = write_tiny_llama(tmp_path, fmt=fmt, shards=shards, seed=5, rope_scaling=None)
    config, weights = load_checkpoint(tmp_path, device, torch.float16, progress=False)
    assert config.architecture == "LlamaForCausalLM" and config.rope_scaling is None
    assert_matches_internlm2(weights, ck.internlm2_tensors, torch.float16, device)
    # And straight from the stored q/k/v rows, one row at a time by the formula.
    g_size = config.group_size
    wqkv = weights.layers[1].wqkv.cpu()
    q = ck.tensors["model.layers.1.self_attn.q_proj.weight"].to(torch.float16)
    k = ck.tensors["model.layers.1.self_attn.k_proj.weight"].to(torch.float16)
    v = ck.tensors["model.layers.1.self_attn.v_proj.weight"].to(torch.float16)
    D = config.head_dim
    for j in range(config.num_heads):
        for d in (0, 17, D - 1):
            assert torch.equal(wqkv[grouped_row(j // g_size, j % g_size, d, g_size, D)], q[j * D + d])
    for g in range(config.num_kv_heads):
        for d in (0, 33, D - 1):
            assert torch.equal(wqkv[grouped_row(g, g_size, d, g_size, D)], k[g * D + d])
            assert torch.equal(wqkv[grouped_row(g, g_size + 1, d, g_size, D)], v[g * D + d])


@pytest.mark.parametrize("save_tied_head", [False, True])
def test_load_llama_tied(device, tmp_path, save_tied_head):
    ck = write_tiny_llama(tmp_path, tie_word_embeddings=True, save_tied_head=save_tied_head, shards=1)
    config, weights = load_checkpoint(tmp_path, device, torch.bfloat16, progress=False)
    assert config.tie_word_embeddings
    assert weights.output is weights.tok_embeddings
    assert_matches_internlm2(weights, ck.internlm2_tensors, torch.bfloat16, device)
    assert "output" not in [n for n, _ in weights.named_tensors()]


def test_load_reads_shard_by_shard(device, tmp_path, monkeypatch):
    """Tensors are read one at a time, each shard's in one block (one shard open at a
    time), each exactly once."""
    write_tiny_llama(tmp_path, shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    order = []
    real = files_module.read_tensor

    def recording(handle, name):
        order.append(name)
        return real(handle, name)

    monkeypatch.setattr(files_module, "read_tensor", recording)
    load_checkpoint(tmp_path, device, torch.float16, progress=False)
    assert sorted(order) == sorted(index)
    files = [index[n] for n in order]
    blocks = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]
    assert blocks == sorted(set(files))


def test_progress_bar(tmp_path, capsys):
    write_tiny_internlm2(tmp_path, shards=1)
    load_checkpoint(tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    load_checkpoint(tmp_path, progress=True)
    captured = capsys.readouterr()
    assert f"Loading {tmp_path.name}" in captured.err and "100%" in captured.err
    assert captured.out == ""


def test_bad_load_arguments(tmp_path, tiny_internlm2):
    with pytest.raises(TypeError, match="dtype must be float16 or bfloat16 or float32"):
        load_checkpoint(tiny_internlm2.path, "cpu", torch.int8, progress=False)
    with pytest.raises(ValueError, match="device must be the CPU or a CUDA device, got meta"):
        load_checkpoint(tiny_internlm2.path, "meta", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda was requested but torch sees no CUDA device"):
            load_checkpoint(tiny_internlm2.path, "cuda", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", progress=False)
    (tmp_path / "config.json").write_text(json.dumps(tiny_internlm2.config))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_checkpoint(tmp_path, progress=False)


# ---- failing before any tensor data is read ------------------------------------------------


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(handle, name):
        raise AssertionError(f"tensor data of {name} was read before validation finished")

    monkeypatch.setattr(files_module, "read_tensor", refuse)


def _rewrite(path, fmt, mutate):
    """Applies mutate(name -> tensor dict) to every weight file in place."""
    files = sorted(path.glob("*.safetensors" if fmt == "safetensors" else "*.bin"))
    for file in files:
        if fmt == "safetensors":
            from safetensors.torch import load_file, save_file

            tensors = load_file(file)
            mutate(tensors, file.name)
            save_file(tensors, file)
        else:
            tensors = torch.load(file, weights_only=True)
            mutate(tensors, file.name)
            torch.save(tensors, file)


def _drop(name):
    def mutate(tensors, _):
        tensors.pop(name, None)

    return mutate


def _add(name, shape, dtype=torch.float16, first_file_only=True):
    def mutate(tensors, file):
        if not first_file_only or file.endswith(("00001-of-00002.safetensors", "00001-of-00002.bin")):
            tensors[name] = torch.randn(shape).to(dtype)

    return mutate


def _reshape(name, shape):
    def mutate(tensors, _):
        if name in tensors:
            tensors[name] = torch.randn(shape).to(tensors[name].dtype)

    return mutate


def _retype(name, dtype):
    def mutate(tensors, _):
        if name in tensors:
            tensors[name] = tensors[name].to(dtype)

    return mutate


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize(
    "mutation,message",
    [
        (
            _drop("model.layers.1.feed_forward.w2.weight"),
            r"missing tensor\(s\) model\.layers\.1\.feed_forward\.w2\.weight",
        ),
        (_drop("output.weight"), r"missing tensor\(s\) output\.weight"),
        (
            _add("model.layers.2.attention.wo.weight", (384, 384)),
            r"unexpected tensor\(s\) model\.layers\.2\.attention\.wo\.weight",
        ),
        (_add("lm_head.weight", (646, 384)), r"unexpected tensor\(s\) lm_head\.weight"),
        (
            _reshape("model.layers.0.attention.wqkv.weight", (384, 384)),
            r"tensor model\.layers\.0\.attention\.wqkv\.weight has shape \(384, 384\), expected \(640, 384\)",
        ),
        (_reshape("model.norm.weight", (383,)), r"tensor model\.norm\.weight has shape \(383,\), expected \(384,\)"),
        (
            _retype("model.layers.0.attention.wo.weight", torch.int32),
            r"tensor model\.layers\.0\.attention\.wo\.weight has dtype (I32|int32); only floating-point",
        ),
    ],
)
def test_bad_tensors_fail_before_reading(tmp_path, no_tensor_reads, fmt, mutation, message):
    write_tiny_internlm2(tmp_path, fmt=fmt, shards=2)
    _rewrite(tmp_path, fmt, mutation)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_several_problems_reported_together(tmp_path, no_tensor_reads):
    write_tiny_llama(tmp_path, shards=2)

    def mutate(tensors, _):
        tensors.pop("model.layers.0.self_attn.k_proj.weight", None)
        tensors.pop("model.layers.1.mlp.up_proj.weight", None)
        if "model.layers.1.self_attn.v_proj.weight" in tensors:
            tensors["model.layers.1.self_attn.v_proj.weight"] = torch.randn(64, 384).bfloat16()

    _rewrite(tmp_path, "safetensors", mutate)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, progress=False)
    text = str(info.value)
    assert "model.layers.0.self_attn.k_proj.weight" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert "model.layers.1.self_attn.v_proj.weight has shape (64, 384), expected (128, 384)" in text


def test_ignored_tensors(device, tmp_path):
    """Cached rotary inverse frequencies are skipped without being read."""
    ck = write_tiny_internlm2(tmp_path, shards=2)
    _rewrite(tmp_path, "safetensors", _add("model.layers.0.attention.rotary_emb.inv_freq", (32,), torch.float32))
    _, weights = load_checkpoint(tmp_path, device, progress=False)
    assert_matches_internlm2(weights, ck.internlm2_tensors, torch.bfloat16, device)


@pytest.mark.parametrize(
    "changes,error,message",
    [
        (
            {"architectures": ["Qwen2ForCausalLM"]},
            ConfigError,
            r"architectures \['Qwen2ForCausalLM'\] is not supported",
        ),
        (
            {"num_key_value_heads": 4},
            ConfigError,
            "num_attention_heads .6. must be a multiple of num_key_value_heads .4.",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ConfigError, "rope_scaling type 'linear'"),
        ({"num_hidden_layers": 3}, CheckpointError, r"missing tensor\(s\) model\.layers\.2\."),
        (
            {"intermediate_size": 200},
            CheckpointError,
            r"feed_forward\.w1\.weight has shape \(236, 384\), expected \(200, 384\)",
        ),
        ({"vocab_size": 700}, CheckpointError, r"tok_embeddings\.weight has shape \(646, 384\), expected \(700, 384\)"),
    ],
)
def test_bad_config_fails_before_reading(tmp_path, no_tensor_reads, changes, error, message):
    ck = write_tiny_internlm2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**ck.config, **changes}))
    with pytest.raises(error, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_broken_index_and_files(tmp_path, no_tensor_reads):
    write_tiny_internlm2(tmp_path, shards=2)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard model-00009-of-00009.safetensors, which is not in"):
        load_checkpoint(tmp_path, progress=False)
    index_file.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        load_checkpoint(tmp_path, progress=False)
    index_file.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(tmp_path, progress=False)


def test_same_tensor_in_two_shards(tmp_path, no_tensor_reads):
    write_tiny_internlm2(tmp_path, shards=2)
    _rewrite(tmp_path, "safetensors", _add("model.norm.weight", (384,), first_file_only=False))
    with pytest.raises(CheckpointError, match="tensor model.norm.weight is stored twice"):
        load_checkpoint(tmp_path, progress=False)


# ---- the wqkv layout ------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (32, 8, 128), (4, 4, 64), (5, 1, 128)])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
def test_split_fuse_wqkv(device, heads, kv_heads, head_dim, trailing):
    config = _config(heads, kv_heads, head_dim)
    rows = (heads + 2 * kv_heads) * head_dim
    wqkv = rand(rows, *trailing, device=device)
    q, k, v = split_wqkv(wqkv, config)
    assert q.shape == (heads * head_dim, *trailing) and k.shape == v.shape == (kv_heads * head_dim, *trailing)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    # The documented row formula, one index at a time (model_fixtures.split_by_formula).
    eq, ek, ev = split_by_formula(wqkv.cpu(), heads, kv_heads, head_dim)
    assert torch.equal(q.cpu(), eq) and torch.equal(k.cpu(), ek) and torch.equal(v.cpu(), ev)
    assert torch.equal(fuse_qkv(q, k, v, config), wqkv)


def test_split_fuse_bad_input():
    config = _config(6, 2, 64)
    with pytest.raises(ValueError, match=r"wqkv must have 640 rows"):
        split_wqkv(torch.randn(639, 4), config)
    q, k, v = split_wqkv(torch.randn(640, 4), config)
    with pytest.raises(ValueError, match=r"k must have shape \(128, 4\), got \(128, 5\)"):
        fuse_qkv(q, torch.randn(128, 5), v, config)
    with pytest.raises(ValueError, match=r"q must have shape \(384, 4\)"):
        fuse_qkv(q[:-1], k, v, config)
    with pytest.raises(ValueError, match="share dtype and device"):
        fuse_qkv(q, k.half(), v, config)


def test_layer_weights_fields():
    # The model code relies on these names; a rename must be deliberate.
    assert [f for f in Layer.__dataclass_fields__] == ["attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2"]


# ---- the fixtures' references ----------------------------------------------------------------


def _roundings(config: dict, tokens: int) -> float:
    """Worst-case float32 roundings along the longest dependency chain of a forward: an
    inner product of length K can carry K roundings, the norms' mean of squares `hidden`,
    plus ~16 elementwise steps (rotary, softmax, SiLU, residuals) per layer."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = (
        hidden  # attention norm
        + hidden  # wqkv
        + head_dim
        + tokens  # scores, probabilities x values
        + heads * head_dim  # wo
        + hidden
        + hidden  # ffn norm, w1 / w3
        + ffn  # w2
        + 16
    )
    return config["num_hidden_layers"] * per_layer + 2 * hidden


@pytest.mark.parametrize("tokens", [19, 90])
def test_hf_llama_reference_matches_float64(tiny_internlm2, tokens):
    """transformers' Llama built from the fused checkpoint agrees with the float64
    InternLM2-layout forward; 90 tokens exceed max_position_embeddings (64), so dynamic NTK
    is in play."""
    ck = tiny_internlm2
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, ck.config["vocab_size"], (tokens,), generator=gen).tolist()
    model = hf_llama_reference(ck, torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = reference_forward(ck, ids)
    assert_close(logits, expected, torch.float32, roundings=_roundings(ck.config, tokens))

    # The comparison can fail: without the NTK base (or with it where it does not belong)
    # the logits move far beyond the bound.
    changed = dict(ck.config, max_position_embeddings=8 if tokens <= 64 else 4096)
    other = reference_forward(type(ck)(ck.path, changed, ck.tensors, ck.internlm2_tensors, ck.tokenizer), ids)
    bound = _roundings(ck.config, tokens) * UNIT_ROUNDOFF[torch.float32] * (expected.abs() + expected.abs().mean())
    assert bool(((other - expected).abs() > bound).any())


def test_hf_llama_reference_sources(tmp_path, tiny_llama):
    """From a Llama directory (tied), and from the runtime's loaded weights: same logits
    as the float64 forward."""
    ck = write_tiny_llama(tmp_path, tie_word_embeddings=True, seed=3)
    ids = list(range(3, 40, 3))
    expected = reference_forward(ck, ids)
    roundings = _roundings(ck.config, len(ids))
    with torch.no_grad():
        from_dir = hf_llama_reference(tmp_path)(torch.tensor([ids])).logits[0]
        assert_close(from_dir, expected, torch.float32, roundings=roundings, name="from directory")
        config, weights = load_checkpoint(tmp_path, "cpu", torch.float32, progress=False)
        from_weights = hf_llama_reference(weights, torch.float32, config=config)(torch.tensor([ids])).logits[0]
        assert_close(from_weights, expected, torch.float32, roundings=roundings, name="from weights")
    # The untied fixture of the same seed family is a different model: the check has teeth.
    assert not torch.allclose(reference_forward(tiny_llama, ids), expected)


def test_read_checkpoint_roundtrip(tmp_path):
    ck = write_tiny_llama(tmp_path, fmt="bin", shards=2, dtype=torch.float16)
    config, tensors = read_checkpoint(tmp_path)
    assert config == ck.config
    assert tensors.keys() == ck.tensors.keys()
    assert all(torch.equal(tensors[n], ck.tensors[n]) for n in tensors)
    assert math.isclose(sum(t.numel() for t in tensors.values()), sum(t.numel() for t in ck.internlm2_tensors.values()))
