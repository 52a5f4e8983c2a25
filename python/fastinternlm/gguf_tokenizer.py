"""The tokenizer a GGUF file carries in its metadata, behind the interface of
tokenizer.Tokenizer (encode, decode, stream, vocab_size, bos_id, eos_id, token_to_id,
added_tokens).

Two vocabularies (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE from `tokens` + `merges`, with the pre-tokenizer that
  `tokenizer.ggml.pre` names (the regex that splits text into words before BPE). The BPE
  itself runs in the `tokenizers` library (Rust; already a dependency of transformers):
  it applies merges by rank exactly as GPT-2 defines them, is fast on long prompts, and
  its regex engine knows the Unicode classes (\\p{L}, \\p{N}) the pre-tokenizer patterns
  need, which Python's `re` does not. Only the BPE of plain text runs there; special
  tokens, decoding and streaming are done here, the same way for both vocabularies.
- "llama": SentencePiece-style pieces with scores (llama.cpp's SPM tokenizer, written
  here): the text gets a leading space when `add_space_prefix` (default true), spaces
  become "▁", and adjacent symbols merge, highest-scoring resulting piece first (leftmost
  on ties), while the merged string is a piece; a symbol that is no piece falls back to
  its UTF-8 bytes (`<0xXX>` pieces), else to the unknown piece. This is SentencePiece's
  BPE encoding, so a vocabulary exported from a SentencePiece BPE model encodes as
  SentencePiece does (the tests check it).

Token types (`tokenizer.ggml.token_type`, SentencePiece's numbering): 1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control tokens ("<|im_start|>",
"<s>") and user-defined tokens are the added tokens: encode() splits the text on their
strings (longest first) and emits their ids; the text between them is encoded on its own
(for "llama", each such stretch gets the leading space, as llama.cpp does after a special
token). Control and unknown tokens are special: decode(skip_special_tokens=True) drops
them.

Decoding turns every ordinary token into bytes (byte-level BPE: through GPT-2's
byte <-> character table; "llama": "▁" is a space and `<0xXX>` is one byte), joins them
per stretch between added tokens and decodes UTF-8 with U+FFFD for invalid bytes. For
"llama" the space prefix that encoding put at the start of a stretch is removed again, so
decode(encode(text)) == text. decode() runs the stream decoder over all ids, so streamed
deltas always concatenate to decode()'s text.
"""

from __future__ import annotations

import codecs
import heapq
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .tokenizer import AddedToken, AddedTokenLookups, check_text, check_token_ids, plain_tokens, split_added_tokens

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer patterns (the regexes llama.cpp applies for each `tokenizer.ggml.pre`,
# the same as the models' own tokenizer.json files). "gpt2" is GPT-2's.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# name -> (patterns applied in order, each splitting the pieces of the previous, ignore_merges)
PRE_TOKENIZERS = {
    "default": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    # Every digit alone, then GPT-2's split (SmolLM, StarCoder, Refact).
    "smollm": ([r"\p{N}", _GPT2], False),
    "starcoder": ([r"\p{N}", _GPT2], False),
    "refact": ([r"\p{N}", _GPT2], False),
    # Llama 3: a word whose whole string is a token is taken as is (ignore_merges).
    "llama-bpe": ([_LLAMA3], True),
    "llama3": ([_LLAMA3], True),
}


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's table: every byte gets a printable character; the printable ASCII and
    Latin-1 bytes map to themselves, the other 68 to U+0100 onwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing something or describes an unsupported tokenizer."""


def _need(meta: Mapping, key: str):
    if key not in meta:
        raise GGUFTokenizerError(f"GGUF metadata has no {key}")
    return meta[key]


def _id(meta: Mapping, key: str, size: int) -> Optional[int]:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise GGUFTokenizerError(f"GGUF metadata {key} must be a token id in [0, {size}), got {value!r}")
    return value


class GGUFTokenizer(AddedTokenLookups):
    """A tokenizer built from GGUF metadata (a mapping of key -> value, lists for
    arrays). See the module docstring."""

    def __init__(self, meta: Mapping):
        model = _need(meta, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise GGUFTokenizerError(
                f"GGUF tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
                f"'llama' SentencePiece-style)"
            )
        self.model = model
        tokens = list(_need(meta, "tokenizer.ggml.tokens"))
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise GGUFTokenizerError("GGUF tokenizer.ggml.tokens must be a non-empty list of strings")
        self.tokens: List[str] = tokens
        self.vocab_size: int = len(tokens)
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [NORMAL] * len(tokens)
        types = [int(t) for t in types]
        if len(types) != len(tokens):
            raise GGUFTokenizerError(
                f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        bad = [t for t in types if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)]
        if bad:
            raise GGUFTokenizerError(f"GGUF tokenizer.ggml.token_type holds unknown type {bad[0]}")
        self.token_types: List[int] = types

        self.bos_id = _id(meta, "tokenizer.ggml.bos_token_id", self.vocab_size)
        self.eos_id = _id(meta, "tokenizer.ggml.eos_token_id", self.vocab_size)
        self.unk_id = _id(meta, "tokenizer.ggml.unknown_token_id", self.vocab_size)
        self.eot_id = _id(meta, "tokenizer.ggml.eot_token_id", self.vocab_size)
        self.eom_id = _id(meta, "tokenizer.ggml.eom_token_id", self.vocab_size)
        # llama.cpp's defaults when the flags are absent: SentencePiece vocabularies add a
        # BOS and a space prefix, byte-level BPE ones neither.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        add_space = meta.get("tokenizer.ggml.add_space_prefix", model == "llama")
        for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos), ("add_space_prefix", add_space)):
            if not isinstance(value, bool):
                raise GGUFTokenizerError(f"GGUF tokenizer.ggml.{key} must be true or false, got {value!r}")
        if add_bos and self.bos_id is None:
            raise GGUFTokenizerError("GGUF tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
        if add_eos and self.eos_id is None:
            raise GGUFTokenizerError("GGUF tokenizer.ggml.add_eos_token is true but there is no eos_token_id")
        self.add_bos_token: bool = add_bos
        self.add_eos_token: bool = add_eos
        self.add_space_prefix: bool = add_space and model == "llama"

        self.added_tokens: Dict[int, AddedToken] = {}
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind in (CONTROL, USER_DEFINED, UNKNOWN) and text:
                self.added_tokens[i] = AddedToken(i, text, kind != USER_DEFINED)
        for i in (self.bos_id, self.eos_id, self.eot_id, self.eom_id):
            if i is not None and i not in self.added_tokens and tokens[i]:
                self.added_tokens[i] = AddedToken(i, tokens[i], True)
        self._by_content: Dict[str, int] = {}
        for i, t in self.added_tokens.items():
            self._by_content.setdefault(t.content, i)
        # Only control and user-defined strings are matched in text (an unknown piece's
        # text such as "<unk>" stays text, as in llama.cpp).
        matched = sorted(
            {t.content for i, t in self.added_tokens.items() if types[i] != UNKNOWN}, key=len, reverse=True
        )
        self._split = re.compile("|".join(map(re.escape, matched))) if matched else None

        self._by_text: Dict[str, int] = {}
        for i, t in enumerate(tokens):
            self._by_text.setdefault(t, i)
        if model == "gpt2":
            self._init_bpe(meta)
        else:
            self._init_spm(meta)

    # ---- vocabularies ------------------------------------------------------------------
    def _init_bpe(self, meta: Mapping) -> None:
        from tokenizers import Regex
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import models, pre_tokenizers

        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise GGUFTokenizerError(
                f"GGUF tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        self.pre_tokenizer = pre
        patterns, ignore_merges = PRE_TOKENIZERS[pre]
        merges_raw = list(_need(meta, "tokenizer.ggml.merges"))
        merges = []
        for n, m in enumerate(merges_raw):
            parts = m.split(" ") if isinstance(m, str) else []
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise GGUFTokenizerError(
                    f"GGUF tokenizer.ggml.merges[{n}] must be two tokens joined by a space, got {m!r}"
                )
            merges.append((parts[0], parts[1]))
        vocab: Dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            vocab.setdefault(t, i)
        bpe = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        # The regexes split; ByteLevel then only maps bytes to GPT-2's characters.
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._bpe = bpe
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._bytes: List[bytes] = []
        for t in self.tokens:
            # A character outside the table cannot come from the byte-level encoder; it
            # stands for its own UTF-8 (as HF's ByteLevel decoder would leave it).
            self._bytes.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in t))

    def _init_spm(self, meta: Mapping) -> None:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFTokenizerError("GGUF metadata has no tokenizer.ggml.scores (needed by a 'llama' vocabulary)")
        scores = [float(s) for s in scores]
        if len(scores) != self.vocab_size:
            raise GGUFTokenizerError(
                f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {self.vocab_size} tokens"
            )
        self.scores = scores
        self.pre_tokenizer = None
        self._pieces: Dict[str, int] = {}
        self._byte_ids: Dict[int, int] = {}
        self._bytes = []
        for i, (t, kind) in enumerate(zip(self.tokens, self.token_types)):
            if kind == NORMAL:
                self._pieces.setdefault(t, i)
            m = _BYTE_PIECE.fullmatch(t) if kind == BYTE else None
            if m:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
                self._bytes.append(bytes([int(m.group(1), 16)]))
            else:
                self._bytes.append(t.replace("\u2581", " ").encode())

    # ---- ids of named tokens -------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of an added token ("<|im_end|>") or of one vocabulary entry."""
        if token in self._by_content:
            return self._by_content[token]
        if token in self._by_text:
            return self._by_text[token]
        raise KeyError(f"{token!r} is neither an added token nor a token of the vocabulary")

    def id_to_token(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        return self.tokens[token_id]

    # ---- encode ------------------------------------------------------------------------
    def _encode_text(self, text: str) -> List[int]:
        """Ids of one stretch of text holding no added token."""
        if self.model == "gpt2":
            return self._bpe.encode(text, add_special_tokens=False).ids if text else []
        if self.add_space_prefix:
            text = " " + text
        return self._spm(text)

    def _spm(self, text: str) -> List[int]:
        if not text:
            return []
        symbols = list(text.replace(" ", "\u2581"))
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap: list = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < 0:
                return
            merged = symbols[left] + symbols[right]
            i = self._pieces.get(merged)
            if i is not None:
                # Highest score first, then leftmost; the strings let a stale entry be
                # recognised after either symbol has changed.
                heapq.heappush(heap, (-self.scores[i], left, symbols[left], symbols[right]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, a, b = heapq.heappop(heap)
            right = nxt[left]
            if not alive[left] or right < 0 or symbols[left] != a or symbols[right] != b:
                continue
            symbols[left] = a + b
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            if prev[left] >= 0:
                push(prev[left])
            push(left)
        out: List[int] = []
        i = 0
        while i >= 0:
            piece = symbols[i]
            token = self._pieces.get(piece)
            if token is not None:
                out.append(token)
            else:
                for byte in piece.replace("\u2581", " ").encode():
                    if byte in self._byte_ids:
                        out.append(self._byte_ids[byte])
                    elif self.unk_id is not None:
                        out.append(self.unk_id)
                        break  # one unknown piece per symbol, as SentencePiece does
                    else:
                        raise ValueError(
                            f"text piece {piece!r} is not in the vocabulary, which has neither "
                            f"byte pieces nor an unknown piece"
                        )
            i = nxt[i]
        return out

    def encode(
        self,
        text: str,
        *,
        add_bos: Optional[bool] = None,
        add_eos: Optional[bool] = None,
        allow_special_tokens: bool = True,
        plain_spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[int]:
        """Ids of `text`. add_bos/add_eos default to the GGUF's add_bos_token /
        add_eos_token. allow_special_tokens=False encodes the strings of special tokens as
        plain text (for untrusted text that must not inject `<|im_end|>`); plain_spans does
        so only inside the given [start, end) character ranges (chat prompts: the content)."""
        check_text(text)
        add_bos = self.add_bos_token if add_bos is None else add_bos
        add_eos = self.add_eos_token if add_eos is None else add_eos
        if add_bos and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token")
        if add_eos and self.eos_id is None:
            raise ValueError("this tokenizer has no EOS token")
        ids: List[int] = [self.bos_id] if add_bos else []
        plain = plain_tokens(self.added_tokens, self._by_content, allow_special_tokens, plain_spans)
        ids += split_added_tokens(text, self._split, self._by_content, self._encode_text, plain)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- decode ------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        return check_token_ids(ids, self.vocab_size)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor of ints)."""
        ids = self._check_ids(list(ids))
        stream = self.stream(skip_special_tokens=skip_special_tokens)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream(self, *, skip_special_tokens: bool = False) -> "GGUFStreamDecoder":
        return GGUFStreamDecoder(self, skip_special_tokens=skip_special_tokens)


class GGUFStreamDecoder:
    """Ids arriving one at a time -> text deltas that never end inside a UTF-8 character
    (an incremental UTF-8 decoder holds an unfinished one back); the deltas plus flush()
    are decode(ids) exactly, since decode() is this same code."""

    def __init__(self, tokenizer: GGUFTokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stretch_start = True  # no byte of this stretch seen yet (the space prefix is pending)

    def _end_stretch(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._reset()
        return out

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", never a broken character)."""
        t = self.tokenizer
        (token_id,) = t._check_ids([token_id])
        added = t.added_tokens.get(token_id)
        if added is not None:
            out = self._end_stretch()
            if not (self.skip_special_tokens and added.special):
                out += added.content
            return out
        data = t._bytes[token_id]
        if self._stretch_start and data:
            if t.add_space_prefix and data[:1] == b" ":
                data = data[1:]
            self._stretch_start = False
        return self._utf8.decode(data)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: the text still held back (an unfinished character decodes to
        U+FFFD, as in decode). The decoder then starts afresh."""
        return self._end_stretch()


__all__ = ["GGUFStreamDecoder", "GGUFTokenizer", "GGUFTokenizerError", "PRE_TOKENIZERS", "bytes_to_unicode"]
