"""Tokenizer: added-token splitting, BOS handling, decoding with and without special tokens,
byte fallback, and the streaming decoder. Host-side text processing only, so no device
parameter. Expected ids are built in each test from a raw SentencePieceProcessor and the
fixture's known special ids, never from the tokenizer under test."""

import json
import random

import pytest
import sentencepiece as spm

from fastinternlm.tokenizer import INTERNLM2_SPECIAL_TOKENS, Tokenizer, load_tokenizer
from model_fixtures import SPECIAL_TOKENS, train_tiny_tokenizer

TEXTS = [
    "Hello world!",
    "  two leading spaces, and  double  spaces inside",
    "line one\nline two\n\n    indented code",
    "书生·浦语是上海人工智能实验室开发的语言模型。",
    "mixed 中文 and English 123 ",
    "rare characters fall back to bytes: 龘 𝄞 🙂🚀 é",
    "\n",
    " ",
]


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def tiny(request, tmp_path_factory):
    info = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), add_dummy_prefix=request.param)
    raw = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
    return info, raw, load_tokenizer(info.path)


def expected_ids(raw, special_ids, parts, bos=True):
    """parts: a list of plain strings and special-token strings, in order."""
    ids = [1] if bos else []
    for part in parts:
        ids.extend([special_ids[part]] if part in special_ids else raw.encode(part))
    return ids


def test_basic_properties(tiny):
    info, raw, tok = tiny
    assert tok.vocab_size == raw.get_piece_size() == info.vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.add_bos_token and not tok.add_eos_token
    for text, i in info.special_ids.items():
        assert tok.token_to_id(text) == i and tok.is_special(i) and tok.is_added(i)
    # The special ids sit at the end, with <|im_start|> last, as in InternLM2.
    assert info.im_start == info.vocab_size - 1 and info.im_end == info.vocab_size - 2
    assert tok.token_to_id("<s>") == 1
    with pytest.raises(KeyError, match="neither an added token nor a piece"):
        tok.token_to_id("<|not_a_token|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_plain(tiny, text):
    info, raw, tok = tiny
    assert tok.encode(text) == [1] + raw.encode(text)
    assert tok.encode(text, add_bos=False) == raw.encode(text)
    assert tok.encode(text, add_eos=True) == [1] + raw.encode(text) + [2]


def test_encode_special_tokens(tiny):
    info, raw, tok = tiny
    s = info.special_ids
    cases = [
        ["<|im_start|>", "user\nHello 世界", "<|im_end|>", "\n"],
        ["<|im_start|>", "<|im_end|>"],
        ["text before", "<|action_start|>", "<|plugin|>", '\n{"name": "search"}', "<|action_end|>"],
        ["<|interpreter|>"],
        ["a", "<|im_end|>", "<|im_end|>", "b"],
    ]
    for parts in cases:
        assert tok.encode("".join(parts)) == expected_ids(raw, s, parts), parts
    # The <s>, </s> and <unk> strings are added tokens too (as in the HF tokenizer).
    assert tok.encode("x</s>y<s>", add_bos=False) == raw.encode("x") + [2] + raw.encode("y") + [1]
    # Near misses are plain text.
    assert tok.encode("<|im_start|", add_bos=False) == raw.encode("<|im_start|")
    # allow_special_tokens=False: every token here is special, so no splitting at all.
    text = "<|im_start|>user<|im_end|>"
    assert tok.encode(text, allow_special_tokens=False) == [1] + raw.encode(text)
    assert tok.encode("") == [1]


def test_byte_fallback_is_exercised(tiny):
    info, raw, tok = tiny
    ids = tok.encode("龘🙂", add_bos=False)
    assert all(raw.is_byte(i) for i in ids if raw.id_to_piece(i) != "▁")
    assert len([i for i in ids if raw.is_byte(i)]) == 3 + 4
    assert tok.decode(ids) == "龘🙂"


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip(tiny, text):
    info, raw, tok = tiny
    parts = ["<|im_start|>", "user\n" + text, "<|im_end|>", "\n", "<|im_start|>", text]
    ids = tok.encode("".join(parts))
    assert tok.decode(ids) == "<s>" + "".join(parts)
    assert tok.decode(ids, skip_special_tokens=True) == "user\n" + text + "\n" + text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_decode_segments_separately(tiny):
    """Each stretch between added tokens is decoded on its own, so a stretch's dummy
    prefix is dropped exactly as the encoder added it."""
    info, raw, tok = tiny
    a, b = raw.encode("alpha beta"), raw.encode("gamma")
    ids = a + [info.im_end] + b + [2] + a
    assert tok.decode(ids) == raw.decode(a) + "<|im_end|>" + raw.decode(b) + "</s>" + raw.decode(a)
    assert tok.decode(ids, skip_special_tokens=True) == raw.decode(a) + raw.decode(b) + raw.decode(a)
    import torch

    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_decode_out_of_range(tiny):
    info, raw, tok = tiny
    with pytest.raises(
        ValueError, match=rf"token id {info.vocab_size} is outside the vocabulary \[0, {info.vocab_size}\)"
    ):
        tok.decode([5, info.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tok.stream().push(-1)


def test_add_bos_from_config(tmp_path):
    info = train_tiny_tokenizer(tmp_path, add_bos_token=False)
    raw = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi there") == raw.encode("hi there")
    assert tok.encode("hi there", add_bos=True) == [1] + raw.encode("hi there")


def test_no_added_tokens_table_small_vocab(tmp_path):
    """Without added_tokens_decoder and without InternLM2's vocabulary size, only the
    SentencePiece unk/bos/eos pieces are added tokens; chat strings are plain text."""
    info = train_tiny_tokenizer(tmp_path, added_tokens_decoder=False)
    raw = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert sorted(tok.added_tokens) == [0, 1, 2]
    text = "<|im_start|>hi</s>"
    assert tok.encode(text) == [1] + raw.encode("<|im_start|>hi") + [2]
    # The placeholder control piece decodes to nothing, like SentencePiece.
    assert tok.decode([info.im_start] + raw.encode("ok")) == raw.decode(raw.encode("ok"))


def test_internlm2_fallback_ids(tmp_path):
    """A 92544-piece vocabulary without added_tokens_decoder gets InternLM2's known ids."""
    info = train_tiny_tokenizer(tmp_path, pad_to=92544, added_tokens_decoder=False)
    raw = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert INTERNLM2_SPECIAL_TOKENS == {t: 92538 + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n") == (
        [1, 92543] + raw.encode("user\nhi") + [92542] + raw.encode("\n")
    )
    assert tok.token_to_id("<|im_end|>") == 92542 and tok.is_special(92540)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    info = train_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    bad = dict(config, added_tokens_decoder={str(info.vocab_size): {"content": "<x>", "special": True}})
    with pytest.raises(ValueError, match=f"added token id {info.vocab_size} is outside"):
        Tokenizer(tmp_path / "tokenizer.model", bad)
    bad = dict(config, added_tokens_decoder={"7": {"content": ""}})
    with pytest.raises(ValueError, match="needs a non-empty content"):
        Tokenizer(tmp_path / "tokenizer.model", bad)
    bad = dict(config, add_bos_token="yes")
    with pytest.raises(ValueError, match="add_bos_token and add_eos_token must be true or false"):
        Tokenizer(tmp_path / "tokenizer.model", bad)
    with pytest.raises(TypeError, match="text must be a str"):
        Tokenizer(tmp_path / "tokenizer.model", config).encode(b"bytes")


# ---- streaming -----------------------------------------------------------------------------


def stream_all(tok, ids, skip):
    decoder = tok.stream(skip_special_tokens=skip)
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_text(tiny, text, skip):
    info, raw, tok = tiny
    ids = tok.encode("<|im_start|>assistant\n" + text + "<|im_end|>" + text)
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas, rest = stream_all(tok, ids, skip)
    assert "".join(deltas) + rest == full
    assert rest == ""  # the text ends on a complete character
    emitted = ""
    for d in deltas:
        assert "\ufffd" not in d  # never a broken character
        emitted += d
        assert full.startswith(emitted)


def test_stream_holds_incomplete_characters(tiny):
    info, raw, tok = tiny
    ids = tok.encode("a🙂b龘", add_bos=False)
    decoder = tok.stream()
    deltas = [decoder.push(i) for i in ids]
    emoji = [raw.piece_to_id(f"<0x{b:02X}>") for b in "🙂".encode()]
    start = ids.index(emoji[0])
    assert ids[start : start + 4] == emoji
    assert deltas[start : start + 3] == ["", "", ""] and deltas[start + 3].endswith("🙂")
    assert "".join(deltas) == tok.decode(ids)
    # Cut in the middle of a character: held back until flush, which gives what decode gives.
    decoder = tok.stream()
    held = [decoder.push(i) for i in ids[: start + 2]]
    assert "".join(held) == tok.decode(ids[:start])
    tail = decoder.flush()
    assert "".join(held) + tail == tok.decode(ids[: start + 2]) and tail.endswith("\ufffd")
    assert decoder.flush() == ""


def test_stream_leading_space(tiny):
    """SentencePiece drops the dummy-prefix space only at the start of a stretch (and
    after control pieces): the stream must reproduce exactly that."""
    info, raw, tok = tiny
    the = raw.piece_to_id("▁the")
    assert raw.id_to_piece(the) == "▁the"
    space = raw.piece_to_id("▁")
    for ids in (
        [the, the, the],
        [space, the, space, space, the],
        [info.im_start, the, the],
        [1, the, 1, 1, the],
        [info.im_end, space, the],
    ):
        for skip in (False, True):
            deltas, rest = stream_all(tok, ids, skip)
            assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip), (ids, deltas)
    deltas, _ = stream_all(tok, [the, the], False)
    assert deltas == (["the", " the"] if info.add_dummy_prefix else [" the", " the"])


def test_stream_random_ids(tiny, seed):
    """Arbitrary id sequences (bytes that never complete, control placeholders, unk, the
    added tokens) still concatenate to decode()."""
    info, raw, tok = tiny
    rng = random.Random(seed)
    bytes_ = [i for i in range(tok.vocab_size) if raw.is_byte(i)]
    utf8_leads = [raw.piece_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xE4, 0xF0)]
    for _ in range(150):
        n = rng.randint(1, 40)
        pool = rng.choice(["any", "bytes", "mixed"])
        if pool == "any":
            ids = [rng.randrange(tok.vocab_size) for _ in range(n)]
        elif pool == "bytes":
            ids = [rng.choice(bytes_ + utf8_leads) for _ in range(n)]
        else:
            ids = [
                rng.choice(
                    [rng.randrange(tok.vocab_size), rng.choice(bytes_), 0, 1, 2, info.im_end, raw.piece_to_id("▁")]
                )
                for _ in range(n)
            ]
        for skip in (False, True):
            deltas, rest = stream_all(tok, ids, skip)
            assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
def test_stream_control_pieces_in_text(tmp_path, seed, add_dummy_prefix):
    """Without an added-token table the placeholder pieces are plain CONTROL pieces inside
    a stretch. SentencePiece drops the "▁" of a piece that follows only control pieces at
    the start of what it decodes, so a window starting at a control piece would lose a
    space the full decode keeps."""
    info = train_tiny_tokenizer(tmp_path, added_tokens_decoder=False, add_dummy_prefix=add_dummy_prefix)
    raw = spm.SentencePieceProcessor(model_file=str(info.path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    the, control = raw.piece_to_id("▁the"), info.im_start
    assert raw.is_control(control) and not tok.is_added(control)
    ids = [the, control, the]
    deltas, rest = stream_all(tok, ids, False)
    assert "".join(deltas) + rest == tok.decode(ids) == raw.decode(ids)
    rng = random.Random(seed)
    for _ in range(100):
        ids = [
            rng.choice([rng.randrange(tok.vocab_size), control, control - 1, the, raw.piece_to_id("▁")])
            for _ in range(rng.randint(1, 30))
        ]
        for skip in (False, True):
            deltas, rest = stream_all(tok, ids, skip)
            assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_window_stays_short(tiny):
    """The decoder re-decodes only the ids since the last ordinary piece, not the whole
    history: after many ordinary pieces its window is a couple of ids long."""
    info, raw, tok = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 60, add_bos=False)
    assert len(ids) > 500
    decoder = tok.stream()
    out = decoder.push_many(ids)
    assert out + decoder.flush() == tok.decode(ids)
    decoder.push_many(ids)
    assert len(decoder._run) - decoder._p <= 2
