"""InternLM2's SentencePiece tokenizer with its added special tokens, and a streaming
decoder.

Special tokens. InternLM2's `tokenizer.model` holds placeholder pieces at the ids of
`<|im_start|>` (92543), `<|im_end|>` (92542) and the other chat tokens, so SentencePiece
alone never produces them. The strings come from `tokenizer_config.json`'s
`added_tokens_decoder` ({id: {"content": ..., "special": ...}}), as in the published
checkpoints; without that table the ids fall back to the SentencePiece unk/bos/eos pieces
plus, for a 92544-piece vocabulary, InternLM2's known chat tokens. Test models with a
small vocabulary define their own ids the same way (their last six pieces).

Encoding splits the text on the added-token strings (longest first), emits their ids and
SentencePiece-encodes the text between them, each stretch separately, exactly what the
Hugging Face tokenizer of the remote code does; a BOS is prepended when
`tokenizer_config.json` says `add_bos_token` (default true, as in InternLM2Tokenizer).

Decoding is the inverse: added tokens are segment boundaries; each stretch of ordinary
ids between them is decoded by SentencePiece on its own (so a stretch's leading "▁" is
dropped when the model adds a dummy prefix, mirroring the encoder), and the added tokens'
strings are inserted unless `skip_special_tokens` drops those marked special.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import sentencepiece as spm

# The chat tokens of InternLM2 / 2.5, used when tokenizer_config.json has no table.
INTERNLM2_SPECIAL_TOKENS = {
    "<|plugin|>": 92538,
    "<|interpreter|>": 92539,
    "<|action_end|>": 92540,
    "<|action_start|>": 92541,
    "<|im_end|>": 92542,
    "<|im_start|>": 92543,
}
_INTERNLM2_VOCAB = 92544


@runtime_checkable
class StreamDecoderProtocol(Protocol):
    """Ids arriving one at a time -> text deltas that never split a UTF-8 character."""

    def push(self, token_id: int) -> str: ...

    def push_many(self, ids: Iterable[int]) -> str: ...

    def flush(self) -> str: ...


@runtime_checkable
class TokenizerProtocol(Protocol):
    """What the runtime (llm.py, chat.py, chat_template.py) uses of a tokenizer; Tokenizer
    (SentencePiece) and gguf_tokenizer.GGUFTokenizer both provide it."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    added_tokens: Dict[int, "AddedToken"]  # id -> added (control or user-defined) token

    def token_to_id(self, token: str) -> int: ...

    def is_added(self, token_id: int) -> bool: ...

    def is_special(self, token_id: int) -> bool: ...

    def encode(
        self,
        text: str,
        *,
        add_bos: Optional[bool] = None,
        add_eos: Optional[bool] = None,
        allow_special_tokens: bool = True,
        plain_spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[int]: ...

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str: ...

    def stream(self, *, skip_special_tokens: bool = False) -> StreamDecoderProtocol: ...


def split_added_tokens(text: str, split, by_content: Dict[str, int], encode_text, plain=None) -> List[int]:
    """Ids of `text` where the added-token strings matched by the regex `split` become their
    ids and only the text between them goes through `encode_text` (split None: all of it).
    `plain(start, end, content)`, when given, keeps a match as text: it then stays part of
    the stretch around it (see plain_tokens)."""
    if split is None:
        return encode_text(text) if text else []
    ids: List[int] = []
    start = 0
    for m in split.finditer(text):
        if plain is not None and plain(m.start(), m.end(), m.group()):
            continue
        if m.start() > start:
            ids.extend(encode_text(text[start : m.start()]))
        ids.append(by_content[m.group()])
        start = m.end()
    if start < len(text):
        ids.extend(encode_text(text[start:]))
    return ids


def plain_tokens(
    added_tokens: Dict[int, "AddedToken"],
    by_content: Dict[str, int],
    allow_special_tokens: bool,
    plain_spans: Optional[Sequence[Tuple[int, int]]],
):
    """The `plain` test of split_added_tokens for encode's switches: with
    allow_special_tokens=False every special token's string is text; plain_spans (character
    ranges [start, end), e.g. the caller's content inside a chat prompt) makes a special
    token's string text where it overlaps one. Non-special added tokens are ordinary
    vocabulary entries and are always matched. None when nothing is kept as text."""
    if allow_special_tokens and not plain_spans:
        return None
    spans = [] if plain_spans is None else sorted((int(a), int(b)) for a, b in plain_spans)

    def plain(start: int, end: int, content: str) -> bool:
        if not added_tokens[by_content[content]].special:
            return False
        if not allow_special_tokens:
            return True
        return any(a < end and start < b for a, b in spans)

    return plain


def check_text(text, name: str = "text") -> str:
    """text, if it is a str that UTF-8 can encode: a lone surrogate (from bytes decoded with
    errors='surrogateescape', or a broken JSON escape) is refused with its position."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} contains a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
            f"(of {len(text)}): it is not valid Unicode and has no UTF-8 encoding"
        ) from None
    return text


def check_token_ids(ids: Sequence[int], vocab_size: int) -> List[int]:
    """ids as Python ints, each in [0, vocab_size), else a ValueError naming the first bad one."""
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
        out.append(i)
    return out


class AddedToken:
    __slots__ = ("id", "content", "special")

    def __init__(self, id: int, content: str, special: bool):
        self.id, self.content, self.special = id, content, special

    def __repr__(self) -> str:
        return f"AddedToken(id={self.id}, content={self.content!r}, special={self.special})"


class AddedTokenLookups:
    """is_added / is_special over `self.added_tokens` (id -> AddedToken): the same for
    every tokenizer (SentencePiece, tokenizer.json, GGUF)."""

    added_tokens: Dict[int, AddedToken]

    def is_added(self, token_id: int) -> bool:
        return token_id in self.added_tokens

    def is_special(self, token_id: int) -> bool:
        t = self.added_tokens.get(token_id)
        return t is not None and t.special


class Tokenizer(AddedTokenLookups):
    """SentencePiece plus added tokens. `model_file`: a tokenizer.model;
    `tokenizer_config`: the parsed tokenizer_config.json (or None)."""

    def __init__(self, model_file: "os.PathLike[str] | str", tokenizer_config: Optional[dict] = None):
        self.sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
        config = tokenizer_config or {}
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        add_bos = config.get("add_bos_token", True)
        add_eos = config.get("add_eos_token", False)
        if not isinstance(add_bos, bool) or not isinstance(add_eos, bool):
            raise ValueError(
                f"tokenizer_config.json: add_bos_token and add_eos_token must be true or false, "
                f"got {add_bos!r} and {add_eos!r}"
            )
        self.add_bos_token: bool = add_bos
        self.add_eos_token: bool = add_eos
        self.added_tokens: Dict[int, AddedToken] = self._added_tokens(config)
        self._by_content: Dict[str, int] = {t.content: i for i, t in self.added_tokens.items()}
        # Longest first, so a token that is a prefix of another never wins the match.
        contents = sorted(self._by_content, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, contents))) if contents else None

    def _added_tokens(self, config: dict) -> Dict[int, AddedToken]:
        table = config.get("added_tokens_decoder")
        out: Dict[int, AddedToken] = {}
        if table is None:
            for i in (self.unk_id, self.bos_id, self.eos_id):
                if i >= 0:
                    out[i] = AddedToken(i, self.sp.id_to_piece(i), True)
            if self.vocab_size >= _INTERNLM2_VOCAB:
                for content, i in INTERNLM2_SPECIAL_TOKENS.items():
                    out[i] = AddedToken(i, content, True)
            return out
        if not isinstance(table, dict):
            raise ValueError(f"tokenizer_config.json: added_tokens_decoder must be an object, got {table!r}")
        for key, entry in table.items():
            try:
                i = int(key)
            except ValueError:
                raise ValueError(f"tokenizer_config.json: added_tokens_decoder key {key!r} is not a token id") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"tokenizer_config.json: added token id {i} is outside the tokenizer.model vocabulary "
                    f"[0, {self.vocab_size})"
                )
            content = entry.get("content") if isinstance(entry, dict) else None
            if not isinstance(content, str) or not content:
                raise ValueError(f"tokenizer_config.json: added_tokens_decoder[{key!r}] needs a non-empty content")
            out[i] = AddedToken(i, content, bool(entry.get("special", False)))
        return out

    @classmethod
    def from_pretrained(cls, path: "os.PathLike[str] | str") -> "Tokenizer":
        return load_tokenizer(path)

    # ---- ids of named tokens -------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of an added token ("<|im_end|>") or of one SentencePiece piece."""
        if token in self._by_content:
            return self._by_content[token]
        i = self.sp.piece_to_id(token)
        if i == self.unk_id and token != self.sp.id_to_piece(self.unk_id):
            raise KeyError(f"{token!r} is neither an added token nor a piece of the vocabulary")
        return i

    # ---- encode ------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        *,
        add_bos: Optional[bool] = None,
        add_eos: Optional[bool] = None,
        allow_special_tokens: bool = True,
        plain_spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[int]:
        """Ids of `text`. add_bos/add_eos default to tokenizer_config.json's flags.
        allow_special_tokens=False encodes the strings of special tokens as plain text (for
        untrusted text that must not inject `<|im_end|>`); plain_spans does so only inside
        the given [start, end) character ranges (chat prompts: the caller's content)."""
        check_text(text)
        add_bos = self.add_bos_token if add_bos is None else add_bos
        add_eos = self.add_eos_token if add_eos is None else add_eos
        ids: List[int] = [self.bos_id] if add_bos else []
        plain = plain_tokens(self.added_tokens, self._by_content, allow_special_tokens, plain_spans)
        ids += split_added_tokens(text, self._split, self._by_content, self.sp.encode, plain)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- decode ------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        return check_token_ids(ids, self.vocab_size)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor of ints)."""
        parts: List[str] = []
        run: List[int] = []
        for i in self._check_ids(list(ids)):
            token = self.added_tokens.get(i)
            if token is None:
                run.append(i)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if not (skip_special_tokens and token.special):
                parts.append(token.content)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def stream(self, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas.

    Guarantees: a delta never ends inside a UTF-8 character (byte-fallback pieces are held
    until the character is complete), and the concatenation of every delta, including the
    final `flush()`, equals `tokenizer.decode(all ids)` with the same skip_special_tokens.

    How: each stretch of ordinary ids is decoded through a short window run[p:] and the
    delta is decode(run[p:]) minus decode(run[p:r]), r being where the text emitted so far
    ends. SentencePiece drops the "▁" of the first piece it decodes (dummy prefix) and of
    a piece that follows only control pieces; both windows start at the same piece, so
    that drop cancels, but only if the window starts at an ordinary piece whose "▁" the
    full decode would also have kept or dropped identically. So p only ever sits at the
    run's start or at an ordinary (not byte, control or unknown) piece, which also makes it
    a character boundary. Cost per id: the few ids since the last ordinary piece."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._run: List[int] = []
        self._p = 0  # window start
        self._r = 0  # ids of the run whose text has been emitted
        self._prefix = ""  # decode(run[p:r])
        self._last_plain = -1  # index of the last ordinary piece in the run

    def _plain(self, token_id: int) -> bool:
        sp = self.tokenizer.sp
        return not (
            sp.is_byte(token_id) or sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id)
        )

    def _emit_run(self, final: bool) -> str:
        sp = self.tokenizer.sp
        full = sp.decode(self._run[self._p :])
        if not final and full.endswith("\ufffd"):
            return ""  # possibly an incomplete UTF-8 character: wait for its next byte
        if not full.startswith(self._prefix):
            raise AssertionError(
                f"SentencePiece decoded a window inconsistently: {self._prefix!r} is not a prefix of {full!r}"
            )
        delta = full[len(self._prefix) :]
        self._r = len(self._run)
        if self._last_plain > self._p and self._last_plain < self._r:
            self._p = self._last_plain
            self._prefix = sp.decode(self._run[self._p : self._r])
        else:
            self._prefix = full
        return delta

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", never a broken character)."""
        (token_id,) = self.tokenizer._check_ids([token_id])
        token = self.tokenizer.added_tokens.get(token_id)
        if token is not None:
            out = self._emit_run(final=True) if self._r < len(self._run) else ""
            self._reset()
            if not (self.skip_special_tokens and token.special):
                out += token.content
            return out
        if self._plain(token_id):
            self._last_plain = len(self._run)
        self._run.append(token_id)
        return self._emit_run(final=False)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: the text still held back (an unfinished character decodes to
        U+FFFD, as in `decode`). The decoder then starts afresh."""
        out = self._emit_run(final=True) if self._r < len(self._run) else ""
        self._reset()
        return out


def load_tokenizer(path: "os.PathLike[str] | str") -> Tokenizer:
    """`path/tokenizer.model` (SentencePiece, as InternLM2 ships) with
    `path/tokenizer_config.json` when present. (A checkpoint folder with only
    tokenizer.json is read by weights/hf.py's read_tokenizer, through hf_tokenizer.py.)"""
    path = os.fspath(path)
    model_file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"no tokenizer.model in {path}")
    config_file = os.path.join(path, "tokenizer_config.json")
    config = None
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    return Tokenizer(model_file, config)


__all__ = [
    "INTERNLM2_SPECIAL_TOKENS",
    "AddedToken",
    "AddedTokenLookups",
    "StreamDecoder",
    "StreamDecoderProtocol",
    "Tokenizer",
    "TokenizerProtocol",
    "check_text",
    "load_tokenizer",
]
