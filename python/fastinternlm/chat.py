"""The InternLM2 chat prompt, exactly as the remote code's `model.chat` builds it.

    BOS
    <|im_start|>system\\n{meta_instruction}<|im_end|>\\n          (only if meta_instruction)
    <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>\\n   (per history turn)
    <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

The string is tokenized as a whole (split on the added-token strings, SentencePiece on the
text between them), as `tokenizer([prompt])` does there. Generation stops on EOS (2) or
`<|im_end|>` (92542).

System prompt: `system=None` means InternLM's default meta instruction; `system=""`
means no system turn at all, which is what the remote code does with an empty
meta_instruction (it tests `if meta_instruction:`). The same holds for a system message
in the OpenAI-style list.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Set, Tuple

from .tokenizer import Tokenizer, check_text

DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文."
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")


class _PromptText:
    """Prompt text built piece by piece, remembering where the caller's content lies (the
    spans allow_special_tokens=False keeps as plain text)."""

    def __init__(self):
        self.parts: List[str] = []
        self.spans: List[Tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, content: bool = False) -> None:
        if content and text:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def turn(self, role: str, content: str) -> None:
        self.add(f"{IM_START}{role}\n")
        self.add(content, content=True)
        self.add(f"{IM_END}\n")

    def text(self) -> str:
        return "".join(self.parts)


def _chat_prompt(query: str, history: Sequence[Tuple[str, str]], system: Optional[str]) -> _PromptText:
    _check_text("query", query)
    meta = DEFAULT_META_INSTRUCTION if system is None else system
    _check_text("system", meta)
    prompt = _PromptText()
    if meta:
        prompt.turn("system", meta)
    for n, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"history[{n}] must be a (query, response) pair, got {turn!r}")
        _check_text(f"history[{n}][0]", turn[0])
        _check_text(f"history[{n}][1]", turn[1])
        prompt.turn("user", turn[0])
        prompt.turn("assistant", turn[1])
    prompt.turn("user", query)
    prompt.add(f"{IM_START}assistant\n")
    return prompt


def build_chat_prompt(query: str, history: Sequence[Tuple[str, str]] = (), system: Optional[str] = None) -> str:
    """The prompt text of `model.chat(tokenizer, query, history, meta_instruction=system)`,
    without the BOS (the tokenizer adds it)."""
    return _chat_prompt(query, history, system).text()


def _messages_prompt(messages: Sequence[Mapping[str, str]], system: Optional[str]) -> _PromptText:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} mappings")
    parsed: List[Tuple[str, str]] = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{n}] must be a mapping with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{n}].role must be one of {', '.join(ROLES)}, got {role!r}")
        _check_text(f"messages[{n}].content", content)
        if role == "system" and n != 0:
            raise ValueError(f"messages[{n}]: a system message may only come first")
        parsed.append((role, content))
    if parsed[0][0] == "system":
        system = parsed[0][1]
        parsed = parsed[1:]
    if not parsed or parsed[-1][0] != "user":
        raise ValueError("messages must end with a user message")
    meta = DEFAULT_META_INSTRUCTION if system is None else system
    _check_text("system", meta)
    prompt = _PromptText()
    if meta:
        prompt.turn("system", meta)
    for role, content in parsed:
        prompt.turn(role, content)
    prompt.add(f"{IM_START}assistant\n")
    return prompt


def messages_to_prompt(messages: Sequence[Mapping[str, str]], system: Optional[str] = None) -> str:
    """OpenAI-style [{"role", "content"}] -> the same prompt text. An optional first
    message with role "system" replaces `system`; then user and assistant messages, the
    last one from the user (a turn is then opened for the assistant). Consecutive turns of
    the same role are rendered as they come (ChatML allows it); a (user, assistant)*
    user list renders exactly as build_chat_prompt with the equivalent history."""
    return _messages_prompt(messages, system).text()


def encode_chat(
    tokenizer: Tokenizer,
    query_or_messages,
    history: Sequence[Tuple[str, str]] = (),
    system: Optional[str] = None,
    *,
    allow_special_tokens: bool = True,
) -> List[int]:
    """Prompt ids: BOS (per add_bos_token, like the remote code, which writes the BOS
    string itself when the tokenizer does not add one) + the prompt. Accepts a query
    string (with `history`) or an OpenAI-style message list (then `history` must be empty).

    allow_special_tokens=False: special-token strings inside the content (query, history,
    system prompt, messages) are encoded as plain text, so a user who types `<|im_end|>`
    cannot end a turn; the format's own tokens are unaffected. The default, True, parses
    them everywhere, as the remote code (and HF's apply_chat_template) does."""
    if isinstance(query_or_messages, str):
        prompt = _chat_prompt(query_or_messages, history, system)
    else:
        if history:
            raise ValueError("history must be empty when a message list is given")
        prompt = _messages_prompt(query_or_messages, system)
    ids = tokenizer.encode(prompt.text(), add_bos=False, plain_spans=None if allow_special_tokens else prompt.spans)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + ids


def chat_stop_ids(tokenizer: Tokenizer) -> Set[int]:
    """{EOS, <|im_end|>}: {2, 92542} for InternLM2."""
    return {tokenizer.eos_id, tokenizer.token_to_id(IM_END)}


def _check_text(name: str, value) -> None:
    check_text(value, name)


__all__ = [
    "DEFAULT_META_INSTRUCTION",
    "build_chat_prompt",
    "chat_stop_ids",
    "encode_chat",
    "messages_to_prompt",
]
