"""Tiny checkpoints, a tiny tokenizer and independent references for the model tests.

Everything here is written without the runtime's code (no fastinternlm import except in
`hf_llama_reference` when handed the runtime's own weights), so a bug in the loader, the
wqkv layout or the tokenizer cannot hide behind the same bug in its oracle.

Tiny tokenizer scheme. A real InternLM2 vocabulary (92544 pieces) is too big to train in
a test, so the tiny SentencePiece BPE model (byte fallback, unk=0, bos=1, eos=2 like
InternLM2) gets six placeholder CONTROL pieces appended at its end, the way InternLM2's
tokenizer.model holds `[UNUSED_TOKEN_n]` pieces at 92538..92543. tokenizer_config.json's
`added_tokens_decoder` maps those ids to `<|plugin|>`, `<|interpreter|>`,
`<|action_end|>`, `<|action_start|>`, `<|im_end|>`, `<|im_start|>` in InternLM2's order
(so `<|im_start|>` is the last id, `<|im_end|>` the one before), and the tiny models'
generation_config.json has eos [2, id of <|im_end|>]. The model vocabulary defaults to
the tokenizer's size.

Tiny models. Random weights drawn in float64 from a seeded generator in InternLM2's
naming and layout; `write_tiny_llama` with the same sizes and seed writes the same model
with wqkv split into q/k/v by the documented row formula, so both architectures must load
to identical weights.

Use from a test module:  from model_fixtures import tiny_internlm2, write_tiny_internlm2
(importing a fixture into the test module registers it with pytest)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import math
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import pytest
import torch

# ---- tokenizer ---------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")

_ENGLISH = """The quick brown fox jumps over the lazy dog near the river bank.
A language model predicts the next token from the tokens that came before it.
You are an AI assistant whose name is InternLM.
It is designed to be helpful, honest, and harmless.
Please answer the question below in one short paragraph.
The weather today is sunny with a light breeze from the west.
She bought three apples, two oranges and a loaf of bread at the market.
Numbers such as 42, 1024 and 3.14159 appear in many technical documents.
user
assistant
system
Can you explain how attention works in a transformer?
Each query head attends to the keys of its key value group.
The cache stores keys and values so that decoding does not repeat work.
Hello world! How are you doing this fine morning?
def main():
    print("hello")
    return 0
Long contexts need a larger rotary base to keep the angles meaningful.
The tokenizer splits text into pieces and falls back to bytes for rare characters.
Good morning, good afternoon and good evening to everyone here.
Shanghai AI Laboratory released a series of open models.
The library, the station and the museum are all within walking distance.
If the input is empty, the function returns an empty list.
Write a short poem about the sea, the wind and the stars."""

_CHINESE = """书生·浦语是一个对话语言模型。
它由上海人工智能实验室开发，旨在提供有帮助、诚实且无害的回答。
你好，世界！今天天气很好，我们去公园散步吧。
请用中文回答下面的问题。
语言模型根据前面的词预测下一个词。
我喜欢喝茶，也喜欢看书和听音乐。
这个城市的夜景非常美丽，灯火通明。
学习新的知识需要耐心和坚持。
他在图书馆里读了一下午的历史书。
春天来了，花开了，鸟儿在树上唱歌。"""


def _corpus() -> List[str]:
    lines = _ENGLISH.split("\n") + _CHINESE.split("\n")
    # Multi-line samples put "\n" (and indentation) into the learned pieces, as chat text has.
    joined = ["\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    return (lines + joined) * 4


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _control_piece(text: str) -> bytes:
    """One ModelProto.pieces entry (field 1: piece, 2: score, 3: type CONTROL=3), serialised
    by hand: protobuf is not installed, and appending a repeated field's entry to a
    serialised message is valid protobuf (entries are concatenated in order)."""
    raw = text.encode()
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(3)
    return b"\x0a" + _varint(len(body)) + body


@functools.lru_cache(maxsize=None)
def _tokenizer_model(add_dummy_prefix: bool, vocab_size: int, pad_to: Optional[int]) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Below 1 so the rarest characters are left to byte fallback.
        character_coverage=0.995,
        num_threads=1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    base = spm.SentencePieceProcessor(model_proto=out.getvalue()).get_piece_size()
    total = base + len(SPECIAL_TOKENS) if pad_to is None else pad_to
    if total < base + len(SPECIAL_TOKENS):
        raise ValueError(f"pad_to={pad_to} leaves no room for the special tokens after {base} trained pieces")
    placeholders = b"".join(_control_piece(f"[UNUSED_TOKEN_{i}]") for i in range(base, total))
    return out.getvalue() + placeholders


@dataclasses.dataclass
class TinyTokenizer:
    path: Path
    vocab_size: int
    special_ids: Dict[str, int]  # "<|im_start|>" -> id
    add_dummy_prefix: bool

    @property
    def im_start(self) -> int:
        return self.special_ids["<|im_start|>"]

    @property
    def im_end(self) -> int:
        return self.special_ids["<|im_end|>"]


def train_tiny_tokenizer(
    directory: Union[str, Path],
    *,
    add_dummy_prefix: bool = True,
    vocab_size: int = 640,
    pad_to: Optional[int] = None,
    add_bos_token: bool = True,
    added_tokens_decoder: bool = True,
) -> TinyTokenizer:
    """Writes tokenizer.model and tokenizer_config.json into `directory` (trained once per
    process and option set, well under a second). vocab_size is the training target (the
    trained size may be smaller); `pad_to=92544` pads with placeholder control pieces so
    the special tokens land on InternLM2's real ids 92538..92543."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _tokenizer_model(add_dummy_prefix, vocab_size, pad_to)
    (directory / "tokenizer.model").write_bytes(model)
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    special_ids = {t: size - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}

    def entry(content):
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    if added_tokens_decoder:
        table = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
        table.update({str(i): entry(t) for t, i in special_ids.items()})
        config["added_tokens_decoder"] = table
        config["additional_special_tokens"] = list(SPECIAL_TOKENS[::-1])
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return TinyTokenizer(directory, size, special_ids, add_dummy_prefix)


# ---- the documented wqkv layout, written independently of the runtime ----------------------


def grouped_row(g: int, s: int, d: int, group: int, head_dim: int) -> int:
    """Row of the fused wqkv: (g*(G+2) + s)*D + d (facts note)."""
    return (g * (group + 2) + s) * head_dim + d


def split_by_formula(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """(q, k, v) rows gathered one index at a time from the row formula."""
    group = heads // kv_heads
    q_rows = [grouped_row(j // group, j % group, d, group, head_dim) for j in range(heads) for d in range(head_dim)]
    k_rows = [grouped_row(g, group, d, group, head_dim) for g in range(kv_heads) for d in range(head_dim)]
    v_rows = [grouped_row(g, group + 1, d, group, head_dim) for g in range(kv_heads) for d in range(head_dim)]
    return wqkv[q_rows].clone(), wqkv[k_rows].clone(), wqkv[v_rows].clone()


# ---- tiny checkpoints --------------------------------------------------------------------


@dataclasses.dataclass
class TinyCheckpoint:
    path: Path
    config: dict  # config.json as written
    tensors: Dict[str, torch.Tensor]  # as stored, in the checkpoint's naming and dtype
    internlm2_tensors: Dict[str, torch.Tensor]  # the same model in InternLM2 naming (fused wqkv)
    tokenizer: TinyTokenizer


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _random_internlm2(*, vocab, hidden, layers, heads, kv_heads, head_dim, ffn, tie, seed, dtype):
    gen = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        # 1/sqrt(cols) keeps activations O(1) through the layers, so no test runs on
        # saturated or vanishing values.
        return (torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(cols)).to(dtype)

    def norm(n):
        return (1.0 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)

    out = {"model.tok_embeddings.weight": torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).to(dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "attention_norm.weight"] = norm(hidden)
        out[p + "attention.wqkv.weight"] = matrix((heads + 2 * kv_heads) * head_dim, hidden)
        out[p + "attention.wo.weight"] = matrix(hidden, heads * head_dim)
        out[p + "ffn_norm.weight"] = norm(hidden)
        out[p + "feed_forward.w1.weight"] = matrix(ffn, hidden)
        out[p + "feed_forward.w3.weight"] = matrix(ffn, hidden)
        out[p + "feed_forward.w2.weight"] = matrix(hidden, ffn)
    out["model.norm.weight"] = norm(hidden)
    if not tie:
        out["output.weight"] = matrix(vocab, hidden)
    return out


def _to_llama_names(t: Dict[str, torch.Tensor], *, heads, kv_heads, head_dim) -> Dict[str, torch.Tensor]:
    layer_names = {
        "attention_norm.weight": "input_layernorm.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    out = {}
    for name, value in t.items():
        if name == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = value
        elif name == "output.weight":
            out["lm_head.weight"] = value
        elif name == "model.norm.weight":
            out[name] = value
        else:
            _, _, i, rest = name.split(".", 3)
            p = f"model.layers.{i}."
            if rest == "attention.wqkv.weight":
                q, k, v = split_by_formula(value, heads, kv_heads, head_dim)
                out[p + "self_attn.q_proj.weight"] = q
                out[p + "self_attn.k_proj.weight"] = k
                out[p + "self_attn.v_proj.weight"] = v
            else:
                out[p + layer_names[rest]] = value
    return out


def _write_weights(directory: Path, tensors: Dict[str, torch.Tensor], shards: int, fmt: str) -> None:
    """Tensor i goes to shard i % shards, so one layer's tensors (Llama's q, k and v
    included) are spread over several files."""
    names = list(tensors)
    ext = {"safetensors": "safetensors", "bin": "bin"}[fmt]
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        files = [f"{stem}.{ext}"]
    else:
        files = [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}
    for file in files:
        part = {n: tensors[n].contiguous() for n in names if weight_map[n] == file}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(directory / file), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def _write_common(directory, config, generation, tensors, internlm2, tokenizer, shards, fmt):
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_weights(directory, tensors, shards, fmt)
    return TinyCheckpoint(directory, config, tensors, internlm2, tokenizer)


def write_tiny_internlm2(
    directory: Union[str, Path],
    *,
    layers: int = 2,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    ffn: int = 236,
    vocab: Optional[int] = None,
    max_position_embeddings: int = 64,
    rope_theta: float = 10000.0,
    rope_scaling: Optional[dict] = {"type": "dynamic", "factor": 2.0},
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    fmt: str = "safetensors",
    seed: int = 0,
    add_dummy_prefix: bool = True,
) -> TinyCheckpoint:
    """An InternLM2ForCausalLM checkpoint (hidden = heads * head_dim, as InternLM2 derives
    head_dim from it), with tokenizer and generation_config.json."""
    directory = Path(directory)
    tokenizer = train_tiny_tokenizer(directory, add_dummy_prefix=add_dummy_prefix)
    vocab = tokenizer.vocab_size if vocab is None else vocab
    hidden = heads * head_dim
    tensors = _random_internlm2(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        tie=False,
        seed=seed,
        dtype=dtype,
    )
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    generation = {"bos_token_id": 1, "eos_token_id": [2, tokenizer.im_end], "pad_token_id": 2}
    return _write_common(directory, config, generation, tensors, tensors, tokenizer, shards, fmt)


def write_tiny_llama(
    directory: Union[str, Path],
    *,
    layers: int = 2,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    ffn: int = 236,
    vocab: Optional[int] = None,
    max_position_embeddings: int = 64,
    rope_theta: float = 10000.0,
    rope_scaling: Optional[dict] = {"rope_type": "dynamic", "factor": 2.0},
    tie_word_embeddings: bool = False,
    save_tied_head: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    fmt: str = "safetensors",
    seed: int = 0,
    add_dummy_prefix: bool = True,
) -> TinyCheckpoint:
    """A LlamaForCausalLM checkpoint of the same random model as write_tiny_internlm2 with
    the same sizes and seed (q/k/v split from its wqkv by the row formula). With
    tie_word_embeddings the head is omitted unless save_tied_head stores a copy."""
    directory = Path(directory)
    tokenizer = train_tiny_tokenizer(directory, add_dummy_prefix=add_dummy_prefix)
    vocab = tokenizer.vocab_size if vocab is None else vocab
    hidden = heads * head_dim
    internlm2 = _random_internlm2(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        tie=tie_word_embeddings,
        seed=seed,
        dtype=dtype,
    )
    tensors = _to_llama_names(internlm2, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    if tie_word_embeddings and save_tied_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
        "vocab_size": vocab,
    }
    generation = {"bos_token_id": 1, "eos_token_id": [2, tokenizer.im_end]}
    return _write_common(directory, config, generation, tensors, internlm2, tokenizer, shards, fmt)


def read_checkpoint(path: Union[str, Path]):
    """(config.json, every stored tensor) read directly with safetensors / torch.load."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    tensors: Dict[str, torch.Tensor] = {}
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        for f in files:
            tensors.update(load_file(f))
    else:
        for f in sorted(glob.glob(str(path / "*.bin"))):
            tensors.update(torch.load(f, weights_only=True))
    return config, tensors


# ---- references --------------------------------------------------------------------------


def _rope_dict(config: dict) -> Optional[dict]:
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind == "default" else {"rope_type": kind, "factor": float(scaling["factor"])}


def _sizes(config: dict):
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return heads, kv_heads, head_dim


def hf_llama_reference(source, dtype: torch.dtype = torch.float32, config=None):
    """transformers' LlamaForCausalLM (eager attention, dynamic rope scaling as configured)
    holding the same weights, on the CPU in `dtype`. `source`: a TinyCheckpoint, a
    checkpoint directory of either architecture (read without the runtime's loader), or
    the runtime's ModelWeights together with its ModelConfig as `config`. Fused wqkv is
    split into q/k/v by the documented row formula (split_by_formula)."""
    transformers = pytest.importorskip("transformers")  # the reference; a skip without it
    LlamaConfig = transformers.LlamaConfig
    LlamaForCausalLM = transformers.LlamaForCausalLM

    if hasattr(source, "layers") and hasattr(source, "tok_embeddings"):
        if config is None:
            raise ValueError("hf_llama_reference(weights) needs config=ModelConfig")
        cfg = {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": None
            if config.rope_scaling is None
            else {"type": config.rope_scaling.type, "factor": config.rope_scaling.factor},
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "architectures": ["InternLM2ForCausalLM"],
        }
        tensors = {"model.tok_embeddings.weight": source.tok_embeddings, "model.norm.weight": source.norm}
        if not config.tie_word_embeddings:
            tensors["output.weight"] = source.output
        for i, layer in enumerate(source.layers):
            p = f"model.layers.{i}."
            tensors.update(
                {
                    p + "attention_norm.weight": layer.attention_norm,
                    p + "attention.wqkv.weight": layer.wqkv,
                    p + "attention.wo.weight": layer.wo,
                    p + "ffn_norm.weight": layer.ffn_norm,
                    p + "feed_forward.w1.weight": layer.w13[: config.intermediate_size],
                    p + "feed_forward.w3.weight": layer.w13[config.intermediate_size :],
                    p + "feed_forward.w2.weight": layer.w2,
                }
            )
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    elif isinstance(source, TinyCheckpoint):
        cfg, tensors = source.config, source.tensors
    else:
        cfg, tensors = read_checkpoint(source)

    heads, kv_heads, head_dim = _sizes(cfg)
    if cfg["architectures"][0] == "InternLM2ForCausalLM":
        tensors = _to_llama_names(tensors, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    tie = bool(cfg.get("tie_word_embeddings", False))
    hf_config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        rope_scaling=_rope_dict(cfg),
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(hf_config)
    state = dict(tensors)
    if tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.to(dtype).eval()


def reference_forward(checkpoint: TinyCheckpoint, ids: Sequence[int], kv_transform=None) -> torch.Tensor:
    """float64 logits [len(ids), vocab] of one prefill at positions 0..len-1, computed from
    the InternLM2-layout tensors as the remote code does: wqkv viewed as [KV, G+2, D] per
    token, half-split rotary, dynamic NTK base from L = len(ids) when L exceeds
    max_position_embeddings, causal softmax attention, SwiGLU, RMSNorm (eps from config).
    kv_transform: applied to the rotated keys and the values [T, KV, D] before attention
    (what a quantized KV cache stores)."""
    cfg, t = checkpoint.config, {k: v.to(torch.float64) for k, v in checkpoint.internlm2_tensors.items()}
    heads, kv_heads, head_dim = _sizes(cfg)
    group = heads // kv_heads
    eps = cfg["rms_norm_eps"]
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(ids)

    base = float(cfg["rope_theta"])
    scaling = _rope_dict(cfg)
    limit = cfg["max_position_embeddings"]
    if scaling is not None and n > limit:
        f = scaling["factor"]
        base = base * ((f * n / limit) - (f - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):
        half = head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    mask = torch.ones(n, n, dtype=torch.bool).tril()
    x = t["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "attention_norm.weight"])
        qkv = (h @ t[p + "attention.wqkv.weight"].T).view(n, kv_heads, group + 2, head_dim)
        q = rope(qkv[:, :, :group].reshape(n, heads, head_dim))
        k = rope(qkv[:, :, group])
        v = qkv[:, :, group + 1]
        if kv_transform is not None:
            k, v = kv_transform(k), kv_transform(v)
        k = k.repeat_interleave(group, dim=1)  # query head j reads KV head j // G
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(n, heads * head_dim)
        x = x + attn @ t[p + "attention.wo.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        gate = h @ t[p + "feed_forward.w1.weight"].T
        x = (
            x
            + (torch.nn.functional.silu(gate) * (h @ t[p + "feed_forward.w3.weight"].T))
            @ t[p + "feed_forward.w2.weight"].T
        )
    x = rms(x, t["model.norm.weight"])
    head = t.get("output.weight", t["model.tok_embeddings.weight"])
    return x @ head.T


# ---- session fixtures (read-only; copy before modifying) -----------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> TinyTokenizer:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_internlm2(tmp_path_factory) -> TinyCheckpoint:
    return write_tiny_internlm2(tmp_path_factory.mktemp("tiny_internlm2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyCheckpoint:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


__all__ = [
    "SPECIAL_TOKENS",
    "TinyCheckpoint",
    "TinyTokenizer",
    "grouped_row",
    "hf_llama_reference",
    "read_checkpoint",
    "reference_forward",
    "split_by_formula",
    "tiny_internlm2",
    "tiny_llama",
    "tiny_tokenizer",
    "train_tiny_tokenizer",
    "write_tiny_internlm2",
    "write_tiny_llama",
]
