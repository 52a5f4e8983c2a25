"""A model's own chat template (the Jinja `tokenizer.chat_template` of a GGUF file), used
by LLM.chat / stream_chat / message prompts instead of InternLM2's format.

Rendering follows what Hugging Face's `apply_chat_template` gives a template, so a
template written for it renders the same here: a sandboxed Jinja environment (the
template comes from a downloaded file and must not reach Python objects) with
trim_blocks and lstrip_blocks, the loop-control extension, `raise_exception(msg)`,
`strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII characters, and the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and `unk_token`,
`pad_token` when the tokenizer has them). The rendered text is tokenized with special
tokens parsed and no BOS added (the template writes the BOS when the model wants one), as
`apply_chat_template(..., tokenize=True)` does.

Jinja2 is a dependency of torch already; it is named in pyproject.toml because this
module imports it directly.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .tokenizer import check_text

ROLES = ("system", "user", "assistant", "tool")
# Supplementary Private Use Area-A: stand-ins for special-token strings while rendering.
_SENTINEL_FIRST, _SENTINEL_LAST = 0xF0000, 0xFFFFD


class ChatTemplateError(ValueError):
    """The template failed to compile or to render (a raise_exception from the template too)."""


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


class ChatTemplate:
    def __init__(self, source: str, tokenizer):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template must be a non-empty string")
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None
        self.source = source
        self.tokenizer = tokenizer

    def _special(self) -> Dict[str, str]:
        t = self.tokenizer
        out = {}
        for name, i in (("bos_token", t.bos_id), ("eos_token", t.eos_id), ("unk_token", getattr(t, "unk_id", None))):
            if i is not None and i >= 0:
                out[name] = t.id_to_token(i) if hasattr(t, "id_to_token") else t.decode([i])
        out.setdefault("bos_token", "")
        out.setdefault("eos_token", "")
        return out

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for OpenAI-style messages."""
        import jinja2

        checked = _check_messages(messages)
        variables = self._special()
        variables.update(extra)
        try:
            return self._template.render(messages=checked, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None

    def render_with_spans(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> Tuple[str, List[Tuple[int, int]]]:
        """(prompt text, [start, end) ranges where special-token strings taken from the
        messages' content landed). The template cannot be asked where it put the content,
        so each such string is swapped for a private-use character before rendering (one
        per occurrence, from plane 15, which no template transforms) and swapped back
        after, wherever the template put it."""
        checked = _check_messages(messages)
        pattern = getattr(self.tokenizer, "_split", None)
        if pattern is None:
            return self.render(checked, add_generation_prompt, **extra), []
        every = self.source + "".join(m["content"] for m in checked)
        if any(_SENTINEL_FIRST <= ord(c) <= _SENTINEL_LAST for c in every):
            raise ChatTemplateError(
                f"cannot keep special tokens as text in content that holds characters "
                f"U+{_SENTINEL_FIRST:X}..U+{_SENTINEL_LAST:X} (private use, plane 15)"
            )
        originals: List[str] = []

        def swap(m) -> str:
            if len(originals) > _SENTINEL_LAST - _SENTINEL_FIRST:
                raise ChatTemplateError("too many special-token strings in the content to keep as text")
            originals.append(m.group())
            return chr(_SENTINEL_FIRST + len(originals) - 1)

        masked = [dict(m, content=pattern.sub(swap, m["content"])) for m in checked]
        text = self.render(masked, add_generation_prompt, **extra)
        if not originals:
            return text, []
        parts: List[str] = []
        spans: List[Tuple[int, int]] = []
        length = 0
        for c in text:
            if _SENTINEL_FIRST <= ord(c) <= _SENTINEL_LAST:
                original = originals[ord(c) - _SENTINEL_FIRST]
                spans.append((length, length + len(original)))
                parts.append(original)
                length += len(original)
            else:
                parts.append(c)
                length += 1
        return "".join(parts), spans

    def encode(
        self,
        query_or_messages,
        history: Sequence[Tuple[str, str]] = (),
        system: Optional[str] = None,
        *,
        allow_special_tokens: bool = True,
    ) -> List[int]:
        """Prompt ids, with the arguments of chat.encode_chat: a query string with its
        (query, response) history and an optional system prompt, or a message list (then
        history must be empty). system=None adds no system message (the template's
        default, if it has one, applies); a string adds one with that content.
        allow_special_tokens=False: special-token strings in the content are encoded as
        plain text (the template's own are not affected), as in chat.encode_chat."""
        if isinstance(query_or_messages, str):
            messages: List[Dict[str, str]] = []
            if system is not None:
                messages.append({"role": "system", "content": system})
            for n, turn in enumerate(history):
                if not isinstance(turn, (tuple, list)) or len(turn) != 2:
                    raise ValueError(f"history[{n}] must be a (query, response) pair, got {turn!r}")
                messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
            messages.append({"role": "user", "content": query_or_messages})
        else:
            if history:
                raise ValueError("history must be empty when a message list is given")
            messages = list(query_or_messages)
            if system is not None and not (
                messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system"
            ):
                messages.insert(0, {"role": "system", "content": system})
        if allow_special_tokens:
            return self.tokenizer.encode(self.render(messages), add_bos=False)
        text, spans = self.render_with_spans(messages)
        return self.tokenizer.encode(text, add_bos=False, plain_spans=spans)


def _check_messages(messages) -> List[Dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} mappings")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{n}] must be a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{n}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        check_text(m["content"], f"messages[{n}].content")
        out.append(dict(m))
    return out


__all__ = ["ChatTemplate", "ChatTemplateError"]
