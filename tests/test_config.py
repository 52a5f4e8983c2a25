"""ModelConfig parsing and validation. Pure host-side parsing: no tensors, so these tests
take no device parameter."""

import copy
import json

import pytest
import torch

from fastinternlm.config import INTERNLM2, LLAMA, ConfigError, ModelConfig, RopeScaling
from fastinternlm.weights.arch import expected_tensors, ignorable_tensor
from fastinternlm.weights.hf import load_config

# internlm2_5-7b-chat as published (facts note).
INTERNLM2_5_7B = {
    "architectures": ["InternLM2ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 92544,
}

LLAMA_TIED = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "head_dim": 128,
    "intermediate_size": 2000,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 1,
    "vocab_size": 1000,
    "rope_scaling": {"rope_type": "dynamic", "factor": 4},
    "tie_word_embeddings": True,
    "dtype": "float16",
    "eos_token_id": [2, 7],
}


def test_internlm2_5_7b():
    c = ModelConfig.from_dict(INTERNLM2_5_7B, {"eos_token_id": [2, 92542]})
    assert c.architecture == INTERNLM2
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (92544, 4096, 32)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 8, 128, 4)
    assert c.intermediate_size == 14336
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 1e6 and isinstance(c.rope_theta, float)
    assert c.rope_scaling == RopeScaling("dynamic", 2.0)
    assert c.max_position_embeddings == 32768 and c.tie_word_embeddings is False
    assert c.bos_token_id == 1 and c.eos_token_ids == (2, 92542)
    assert c.torch_dtype == torch.bfloat16
    assert c.qkv_rows == (32 + 2 * 8) * 128


def test_internlm2_5_7b_expected_tensors():
    c = ModelConfig.from_dict(INTERNLM2_5_7B)
    shapes = expected_tensors(c)
    assert len(shapes) == 3 + 7 * 32
    assert shapes["model.layers.31.attention.wqkv.weight"] == (6144, 4096)
    assert shapes["model.layers.0.feed_forward.w2.weight"] == (4096, 14336)
    assert shapes["output.weight"] == (92544, 4096)
    count = {n: 1 for n in shapes}
    for n, s in shapes.items():
        for d in s:
            count[n] *= d
    linear = sum(v for n, v in count.items() if ".layers." in n and n.endswith("weight") and "norm" not in n)
    # Parameter counts from the facts note.
    assert linear == 6_979_321_856
    assert count["model.tok_embeddings.weight"] == count["output.weight"] == 379_060_224


def test_eos_without_generation_config():
    c = ModelConfig.from_dict(INTERNLM2_5_7B)
    assert c.eos_token_ids == (2,)
    c = ModelConfig.from_dict(INTERNLM2_5_7B, {"eos_token_id": 92542})
    assert c.eos_token_ids == (92542,)


def test_llama_tied_explicit_head_dim():
    c = ModelConfig.from_dict(LLAMA_TIED)
    assert c.architecture == LLAMA
    # head_dim is given explicitly and differs from hidden / heads (192).
    assert c.head_dim == 128 and c.q_size == 512 and c.kv_size == 128 and c.group_size == 4
    assert c.tie_word_embeddings is True and c.torch_dtype == torch.float16
    assert c.rope_scaling == RopeScaling("dynamic", 4.0)
    assert c.eos_token_ids == (2, 7)
    # HF's defaults for what the config leaves out.
    assert c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0 and c.max_position_embeddings == 2048
    shapes = expected_tensors(c)
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.2.self_attn.q_proj.weight"] == (512, 768)
    assert shapes["model.layers.2.self_attn.k_proj.weight"] == (128, 768)
    assert shapes["model.layers.2.self_attn.o_proj.weight"] == (768, 512)
    assert ignorable_tensor(c, "lm_head.weight")
    assert ignorable_tensor(c, "model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not ignorable_tensor(c, "model.layers.0.self_attn.q_proj.weight")


def test_kv_heads_default_to_heads_and_model_type_fallback():
    d = dict(LLAMA_TIED)
    del d["num_key_value_heads"], d["architectures"]
    c = ModelConfig.from_dict(d)
    assert c.architecture == LLAMA and c.num_kv_heads == c.num_heads == 4


@pytest.mark.parametrize("scaling", [None, {"type": "default"}, {"rope_type": "default", "factor": 1.0}])
def test_no_rope_scaling(scaling):
    d = dict(INTERNLM2_5_7B, rope_scaling=scaling)
    assert ModelConfig.from_dict(d).rope_scaling is None


def test_rope_scaling_both_keys_agree():
    d = dict(INTERNLM2_5_7B, rope_scaling={"type": "dynamic", "rope_type": "dynamic", "factor": 2.5})
    assert ModelConfig.from_dict(d).rope_scaling == RopeScaling("dynamic", 2.5)


def _with(base, **changes):
    d = copy.deepcopy(base)
    for k, v in changes.items():
        if v is _DELETE:
            del d[k]
        else:
            d[k] = v
    return d


_DELETE = object()

BAD_CONFIGS = [
    (dict(vocab_size=_DELETE), "vocab_size is missing"),
    (dict(hidden_size=_DELETE), "hidden_size is missing"),
    (dict(num_hidden_layers=_DELETE), "num_hidden_layers is missing"),
    (dict(intermediate_size=_DELETE), "intermediate_size is missing"),
    (dict(hidden_size="4096"), "hidden_size must be an integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be an integer"),
    (dict(num_attention_heads=32.0), "num_attention_heads must be an integer"),
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    (dict(num_key_value_heads=-8), "num_key_value_heads must be >= 1"),
    (dict(num_key_value_heads=6), r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(6\)"),
    (dict(hidden_size=4100), r"hidden_size \(4100\) must be a multiple of num_attention_heads \(32\)"),
    (dict(hidden_size=3072), r"head_dim 96 \(hidden_size 3072 / num_attention_heads 32\) is not supported"),
    (dict(hidden_size=8192), "head_dim 256 .* support head_dim 64 and 128"),
    (dict(architectures=["InternLMForCausalLM"]), r"architectures \['InternLMForCausalLM'\] is not supported"),
    (
        dict(architectures=["MistralForCausalLM"]),
        "MistralForCausalLM.*supported: InternLM2ForCausalLM, LlamaForCausalLM",
    ),
    (dict(architectures=[INTERNLM2, LLAMA]), "exactly one"),
    (dict(architectures=[3]), "architectures must be a list of names"),
    (dict(architectures=_DELETE, model_type="qwen2"), "model_type 'qwen2'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling type 'linear' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic"}), "rope_scaling.factor must be a number >= 1, got missing"),
    (dict(rope_scaling={"type": "dynamic", "factor": 0.5}), "rope_scaling.factor must be a number >= 1, got 0.5"),
    (dict(rope_scaling={"type": "dynamic", "factor": "2"}), "rope_scaling.factor must be a number"),
    (dict(rope_scaling={"factor": 2.0}), "rope_scaling needs one kind"),
    (dict(rope_scaling={"type": "dynamic", "rope_type": "linear", "factor": 2.0}), "rope_scaling needs one kind"),
    (dict(rope_scaling="dynamic"), "rope_scaling must be an object or null"),
    (dict(hidden_act="gelu"), "hidden_act must be 'silu', got 'gelu'"),
    (dict(bias=True), "bias=true is not supported"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be a number"),
    (dict(rope_theta=0), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be >= 1"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(torch_dtype="int8"), "torch_dtype must be one of"),
    (dict(eos_token_id=92544), r"eos_token_id must be token ids in \[0, 92544\)"),
    (dict(bos_token_id=-1), "bos_token_id must be token ids"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS)
def test_bad_internlm2_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_with(INTERNLM2_5_7B, **changes))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(attention_bias=True), "attention_bias=true is not supported"),
        (dict(mlp_bias=True), "mlp_bias=true is not supported"),
        (dict(head_dim=80), "head_dim 80 is not supported"),
        (dict(head_dim="128"), "head_dim must be an integer"),
    ],
)
def test_bad_llama_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_with(LLAMA_TIED, **changes))


def test_bad_generation_config():
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id must be token ids"):
        ModelConfig.from_dict(INTERNLM2_5_7B, {"eos_token_id": [2, "im_end"]})


def test_load_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(INTERNLM2_5_7B))
    assert load_config(tmp_path).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 92542]}))
    assert load_config(tmp_path).eos_token_ids == (2, 92542)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(tmp_path)
