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

from .tokenizer import Tokenizer

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


def build_chat_prompt(query: str, history: Sequence[Tuple[str, str]] = (),
                      system: Optional[str] = None) -> str:
    """The prompt text of `model.chat(tokenizer, query, history, meta_instruction=system)`,
    without the BOS (the tokenizer adds it)."""
    _check_text("query", query)
    meta = DEFAULT_META_INSTRUCTION if system is None else system
    _check_text("system", meta)
    prompt = f"{IM_START}system\n{meta}{IM_END}\n" if meta else ""
    for n, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"history[{n}] must be a (query, response) pair, got {turn!r}")
        _check_text(f"history[{n}][0]", turn[0])
        _check_text(f"history[{n}][1]", turn[1])
        prompt += f"{IM_START}user\n{turn[0]}{IM_END}\n{IM_START}assistant\n{turn[1]}{IM_END}\n"
    prompt += f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return prompt


def messages_to_prompt(messages: Sequence[Mapping[str, str]], system: Optional[str] = None) -> str:
    """OpenAI-style [{"role", "content"}] -> the same prompt text. An optional first
    message with role "system" replaces `system`; then user and assistant messages, the
    last one from the user (a turn is then opened for the assistant). Consecutive turns of
    the same role are rendered as they come (ChatML allows it); a (user, assistant)*
    user list renders exactly as build_chat_prompt with the equivalent history."""
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
    prompt = f"{IM_START}system\n{meta}{IM_END}\n" if meta else ""
    for role, content in parsed:
        prompt += f"{IM_START}{role}\n{content}{IM_END}\n"
    return prompt + f"{IM_START}assistant\n"


def encode_chat(tokenizer: Tokenizer, query_or_messages, history: Sequence[Tuple[str, str]] = (),
                system: Optional[str] = None) -> List[int]:
    """Prompt ids: BOS (per add_bos_token, like the remote code, which writes the BOS
    string itself when the tokenizer does not add one) + the prompt. Accepts a query
    string (with `history`) or an OpenAI-style message list (then `history` must be empty)."""
    if isinstance(query_or_messages, str):
        prompt = build_chat_prompt(query_or_messages, history, system)
    else:
        if history:
            raise ValueError("history must be empty when a message list is given")
        prompt = messages_to_prompt(query_or_messages, system)
    ids = tokenizer.encode(prompt, add_bos=False)
    return [tokenizer.bos_id] + ids


def chat_stop_ids(tokenizer: Tokenizer) -> Set[int]:
    """{EOS, <|im_end|>}: {2, 92542} for InternLM2."""
    return {tokenizer.eos_id, tokenizer.token_to_id(IM_END)}


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


__all__ = [
    "DEFAULT_META_INSTRUCTION",
    "build_chat_prompt",
    "chat_stop_ids",
    "encode_chat",
    "messages_to_prompt",
]
