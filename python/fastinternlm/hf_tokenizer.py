"""A checkpoint's `tokenizer.json` (the Hugging Face `tokenizers` format that most
Llama-architecture models ship without a SentencePiece `tokenizer.model`) behind the
interface of tokenizer.Tokenizer: encode / decode / stream, added and special tokens,
token_to_id, is_special, vocab_size, bos_id / eos_id.

What matches transformers' PreTrainedTokenizerFast on the same files:
- encode(text) is `tokenizer(text)["input_ids"]`: the library's normaliser, pre-tokeniser,
  model and added-token matching, and its post-processor's BOS/EOS (add_bos / add_eos
  None). add_bos=True / False forces the BOS on or off instead.
- decode(ids) is `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`:
  the library's decoder chain. The clean-up of spaces before punctuation that
  tokenizer_config.json may ask transformers for is not applied (a streamed text could not
  take back a space it has already shown).
- BOS, EOS and UNK are tokenizer_config.json's `bos_token` / `eos_token` / `unk_token`
  (a string or an {"content": ...} entry), else special_tokens_map.json's.

The allow_special_tokens / plain_spans switches of encode keep special-token strings as
text: the text is cut at the special tokens still matched and each stretch is encoded
with the library's encode_special_tokens (which treats special strings as text), honouring
the cut tokens' lstrip / rstrip as the library does.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import read_json
from .tokenizer import AddedToken, AddedTokenLookups, check_text, check_token_ids, plain_tokens


class HFTokenizerError(ValueError):
    """tokenizer.json or its companion files cannot be used."""


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json's bos_token etc.: a string, an AddedToken dict or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(AddedTokenLookups):
    """`tokenizer_file`: a tokenizer.json; `tokenizer_config`: the parsed
    tokenizer_config.json (or None); `special_tokens_map`: the parsed
    special_tokens_map.json (or None)."""

    def __init__(
        self,
        tokenizer_file: "os.PathLike[str] | str",
        tokenizer_config: Optional[dict] = None,
        special_tokens_map: Optional[dict] = None,
    ):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = os.fspath(tokenizer_file)
        try:
            self._tk = RustTokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise HFTokenizerError(f"{self.path} is not a tokenizer the tokenizers library can read: {e}") from None
        self._plain_tk = None  # a copy that encodes special-token strings as text, made when first needed
        config = dict(special_tokens_map or {})
        config.update({k: v for k, v in (tokenizer_config or {}).items() if v is not None})
        self.chat_template: Optional[str] = (tokenizer_config or {}).get("chat_template")
        if not isinstance(self.chat_template, str):
            self.chat_template = None  # a list of named templates is not supported

        self.added_tokens: Dict[int, AddedToken] = {}
        self._flags: Dict[int, Tuple[bool, bool]] = {}  # id -> (lstrip, rstrip)
        for i, t in sorted(self._tk.get_added_tokens_decoder().items()):
            self.added_tokens[i] = AddedToken(i, t.content, bool(t.special))
            self._flags[i] = (bool(t.lstrip), bool(t.rstrip))
        self._by_content: Dict[str, int] = {t.content: i for i, t in self.added_tokens.items()}
        # Longest first, so a token that is a prefix of another never wins the match.
        contents = sorted(self._by_content, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, contents))) if contents else None
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0

        def named(key: str) -> Optional[int]:
            text = _token_text(config.get(key))
            if text is None:
                return None
            i = self._tk.token_to_id(text)
            if i is None:
                raise HFTokenizerError(f"tokenizer_config.json: {key} {text!r} is not a token of {self.path}")
            return i

        self.bos_id: Optional[int] = named("bos_token")
        self.eos_id: Optional[int] = named("eos_token")
        self.unk_id: Optional[int] = named("unk_token")
        # What the post-processor wraps around a text (transformers' add_special_tokens=True).
        probe = "a"
        plain = self._tk.encode(probe, add_special_tokens=False).ids
        full = self._tk.encode(probe, add_special_tokens=True).ids
        at = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), None)
        if at is None:
            raise HFTokenizerError(
                f"{self.path}: the post-processor changes the text's own ids, which is not supported"
            )
        self._prefix, self._suffix = full[:at], full[at + len(plain) :]
        self.add_bos_token: bool = bool(self._prefix)
        self.add_eos_token: bool = bool(self._suffix)

    @classmethod
    def from_dir(cls, path: "os.PathLike[str] | str", tokenizer_config: Optional[dict] = None) -> "HFTokenizer":
        path = os.fspath(path)
        if tokenizer_config is None:
            tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
        return cls(
            os.path.join(path, "tokenizer.json"),
            tokenizer_config,
            _read_json(os.path.join(path, "special_tokens_map.json")),
        )

    # ---- ids of named tokens -------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of an added token ("<|im_end|>") or of one vocabulary entry."""
        i = self._tk.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is neither an added token nor a token of the vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        token = self._tk.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} has no entry in {self.path}")
        return token

    # ---- encode ------------------------------------------------------------------------
    def _plain_tokenizer(self):
        if self._plain_tk is None:
            from tokenizers import Tokenizer as RustTokenizer

            self._plain_tk = RustTokenizer.from_file(self.path)
            self._plain_tk.encode_special_tokens = True
        return self._plain_tk

    def _encode_cut(self, text: str, plain) -> List[int]:
        """The text cut at the special tokens that stay tokens; the stretches between are
        encoded with special strings as text (non-special added tokens still match)."""
        pieces: List[object] = []  # str stretches and int token ids
        start = 0
        for m in self._split.finditer(text):
            i = self._by_content[m.group()]
            if not self.added_tokens[i].special or plain(m.start(), m.end(), m.group()):
                continue  # text: the library matches non-special ones itself
            pieces += [text[start : m.start()], i]
            start = m.end()
        pieces.append(text[start:])
        # lstrip / rstrip: the token swallows the whitespace on that side.
        for k, piece in enumerate(pieces):
            if isinstance(piece, int):
                lstrip, rstrip = self._flags[piece]
                if lstrip and k > 0:
                    pieces[k - 1] = pieces[k - 1].rstrip()
                if rstrip and k + 1 < len(pieces):
                    pieces[k + 1] = pieces[k + 1].lstrip()
        tk = self._plain_tokenizer()
        ids: List[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids += tk.encode(piece, add_special_tokens=False).ids
        return ids

    def encode(
        self,
        text: str,
        *,
        add_bos: Optional[bool] = None,
        add_eos: Optional[bool] = None,
        allow_special_tokens: bool = True,
        plain_spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[int]:
        """Ids of `text`. add_bos/add_eos None: what the tokenizer's post-processor adds
        (as transformers' tokenizer(text)); True/False: the BOS/EOS or nothing.
        allow_special_tokens=False encodes the strings of special tokens as plain text;
        plain_spans does so only inside the given [start, end) character ranges."""
        check_text(text)
        plain = plain_tokens(self.added_tokens, self._by_content, allow_special_tokens, plain_spans)
        if plain is None or self._split is None:
            ids = self._tk.encode(text, add_special_tokens=False).ids if text else []
        else:
            ids = self._encode_cut(text, plain)
        if add_bos is None:
            head = list(self._prefix)
        elif add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token (no bos_token in tokenizer_config.json)")
            head = [self.bos_id]
        else:
            head = []
        if add_eos is None:
            tail = list(self._suffix)
        elif add_eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token (no eos_token in tokenizer_config.json)")
            tail = [self.eos_id]
        else:
            tail = []
        return head + ids + tail

    # ---- decode ------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        return check_token_ids(ids, self.vocab_size)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor of ints)."""
        return self._tk.decode(self._check_ids(list(ids)), skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = False) -> "HFStreamDecoder":
        return HFStreamDecoder(self, skip_special_tokens=skip_special_tokens)


class HFStreamDecoder:
    """Ids arriving one at a time -> text deltas that never end inside a UTF-8 character.

    Each push decodes a short window ids[p:] and emits what it adds to decode(ids[p:r]),
    r being where the emitted text ends. Whatever a decoder does to the first token of a
    window (Metaspace and Strip drop a leading space) then happens in both texts and
    cancels, provided the ids after r are not first in the window either: so p only ever
    sits at the stream's start or at an ordinary (not added) token that decodes to whole
    characters on its own, which also makes it a character boundary. A window whose text
    ends in U+FFFD may be a character still missing bytes: it waits for the next id
    (flush() emits it as U+FFFD, as decode does)."""

    def __init__(self, tokenizer: HFTokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._ids: List[int] = []
        self._p = 0
        self._r = 0
        self._prefix = ""  # decode(ids[p:r])
        self._last_plain = -1  # the last ordinary, self-contained token: where p may move

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer._tk.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, final: bool) -> str:
        full = self._decode(self._ids[self._p :])
        if not final and full.endswith("\ufffd"):
            return ""
        if not full.startswith(self._prefix):
            # A decoder that rewrites across the window start: widen the window to the
            # whole stream, whose text the emitted text is a prefix of.
            self._p = 0
            self._prefix = self._decode(self._ids[: self._r])
            full = self._decode(self._ids)
            if not full.startswith(self._prefix):
                raise AssertionError(f"the tokenizer decoded {self._prefix!r}, then {full!r} for more ids")
        delta = full[len(self._prefix) :]
        self._r = len(self._ids)
        if self._p < self._last_plain < self._r:
            self._p = self._last_plain
            self._prefix = self._decode(self._ids[self._p : self._r])
        else:
            self._prefix = full
        return delta

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", never a broken character)."""
        (token_id,) = self.tokenizer._check_ids([token_id])
        if token_id not in self.tokenizer.added_tokens and "\ufffd" not in self._decode([token_id]):
            self._last_plain = len(self._ids)
        self._ids.append(token_id)
        return self._emit(final=False)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: the text still held back. The decoder then starts afresh."""
        out = self._emit(final=True) if self._r < len(self._ids) else ""
        self._reset()
        return out


def _read_json(file: str) -> Optional[dict]:
    """config.read_json for a file that may be absent (None), with this module's error."""
    return read_json(file, HFTokenizerError) if os.path.isfile(file) else None


__all__ = ["HFStreamDecoder", "HFTokenizer", "HFTokenizerError"]
