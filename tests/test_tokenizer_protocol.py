"""Both tokenizers provide the interface the runtime uses (tokenizer.TokenizerProtocol),
so llm.py, chat.py and chat_template.py need nothing else of them."""

from __future__ import annotations

from fastinternlm.gguf_tokenizer import GGUFTokenizer
from fastinternlm.tokenizer import StreamDecoderProtocol, TokenizerProtocol, load_tokenizer
from model_fixtures import tiny_internlm2  # noqa: F401


def _gguf_meta():
    import test_gguf

    tok = test_gguf.TinyBPE("smollm")
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": tok.pre,
        "tokenizer.ggml.tokens": tok.tokens,
        "tokenizer.ggml.token_type": tok.types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in tok.merges],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def test_both_tokenizers_provide_the_protocol(tiny_internlm2):
    for tokenizer in (load_tokenizer(tiny_internlm2.path), GGUFTokenizer(_gguf_meta())):
        assert isinstance(tokenizer, TokenizerProtocol), type(tokenizer).__name__
        assert isinstance(tokenizer.stream(), StreamDecoderProtocol)
        ids = tokenizer.encode("Hello <|im_end|> world")
        end = tokenizer.token_to_id("<|im_end|>")
        assert end in ids and tokenizer.is_special(end) and tokenizer.added_tokens[end].content == "<|im_end|>"


def test_the_protocol_check_has_teeth(tiny_internlm2):
    class Partial:
        vocab_size, bos_id, eos_id = 10, 1, 2

        def encode(self, text):
            return []

    assert not isinstance(Partial(), TokenizerProtocol)
