"""InternLM2.5 tool calls behind OpenAI's `tools` / `tool_calls` API.

Prompt (InternLM's chat format for function calls):

    BOS <|im_start|>system\\n{meta instruction}<|im_end|>\\n
    <|im_start|>system name=<|plugin|>\\n[{"name", "description", "parameters"}, ...]<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{text}<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|><|im_end|>\\n
    <|im_start|>environment name=<|plugin|>\\n{tool result}<|im_end|>\\n
    <|im_start|>assistant\\n

The model answers with optional text, then `<|action_start|><|plugin|>\\n{json}<|action_end|>`
for each call. Generation stops on `<|action_end|>` (the request passes its id as a stop
token) or on `<|im_end|>`; whether the stop token's text reaches the parser does not matter.

Parsing works on text (with special tokens kept), so it does not depend on how the text
was cut into deltas: a marker that arrives split over several deltas, or written by the
model as ordinary pieces ("<|", "action", "_start|>"), is held back until it is complete
or can no longer be one. A call whose body is not a JSON object with a string "name" is
returned as the text the model wrote (the request then finishes with "stop", as a plain
answer would), never as an error. `<|action_start|><|interpreter|>` (code for InternLM's
interpreter) is no function call and stays text too. A space between the two marker
tokens is tolerated.

Models with a chat template of their own (GGUF) keep that template; this module is for
InternLM2's format only (`supports_tools`).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .chat import DEFAULT_META_INSTRUCTION, IM_END, IM_START, messages_to_prompt

ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
INTERPRETER = "<|interpreter|>"
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class ToolCallError(ValueError):
    """`tools`, `tool_choice` or a message of a tool conversation is malformed."""


# ---- request checks ---------------------------------------------------------------------


def check_tools(tools: Optional[Sequence[Any]]) -> List[Dict[str, Any]]:
    """OpenAI `tools` -> the function list InternLM2.5 reads, [{"name", "description",
    "parameters"}] (description / parameters only when given)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ToolCallError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}")
    out, names = [], set()
    for n, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ToolCallError(f"tools[{n}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ToolCallError(f"tools[{n}].function must be an object, got {fn!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolCallError(f"tools[{n}].function.name must be a non-empty string, got {name!r}")
        if name in names:
            raise ToolCallError(f"tools[{n}].function.name {name!r} appears twice")
        names.add(name)
        entry: Dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise ToolCallError(f"tools[{n}].function.description must be a string, got {fn['description']!r}")
            entry["description"] = fn["description"]
        if fn.get("parameters") is not None:
            if not isinstance(fn["parameters"], Mapping):
                raise ToolCallError(
                    f"tools[{n}].function.parameters must be a JSON Schema object, got {fn['parameters']!r}"
                )
            entry["parameters"] = dict(fn["parameters"])
        out.append(entry)
    return out


def select_tools(functions: List[Dict[str, Any]], tool_choice: Any) -> List[Dict[str, Any]]:
    """The functions to put in the prompt for OpenAI's `tool_choice`: "none" -> none (the
    reply is plain text), "auto" / None / "required" -> all, {"type": "function",
    "function": {"name": X}} -> only X. Nothing constrains decoding, so "required" and a
    named function make a call likely, not certain."""
    if tool_choice is None or tool_choice in ("auto", "required"):
        return functions
    if tool_choice == "none":
        return []
    if (
        isinstance(tool_choice, Mapping)
        and tool_choice.get("type", "function") == "function"
        and isinstance(tool_choice.get("function"), Mapping)
    ):
        name = tool_choice["function"].get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise ToolCallError(
                f"tool_choice names function {name!r}, which is not in tools "
                f"({', '.join(f['name'] for f in functions) or 'none given'})"
            )
        return chosen
    raise ToolCallError(
        "tool_choice must be 'none', 'auto', 'required' or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
    )


def message_text(content: Any, where: str) -> str:
    """OpenAI message content: a string, null, or a list of {"type": "text", "text"} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for n, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ToolCallError(
                    f"{where}[{n}] must be a {{'type': 'text', 'text': str}} part "
                    f"(only text is supported), got {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ToolCallError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def _call_json(call: Any, where: str) -> str:
    """An assistant message's OpenAI tool call -> the JSON the model writes for it."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ToolCallError(
            f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}, got {call!r}"
        )
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolCallError(f"{where}.function.arguments is not valid JSON ({e}): {args!r}") from None
    if not isinstance(args, Mapping):
        raise ToolCallError(f"{where}.function.arguments must encode a JSON object, got {args!r}")
    return json.dumps({"name": fn["name"], "parameters": args}, ensure_ascii=False)


# ---- prompt -----------------------------------------------------------------------------


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Optional[Sequence[Any]] = None,
    tool_choice: Any = None,
    system: Optional[str] = None,
) -> str:
    """The InternLM2.5 prompt text (without the BOS) for OpenAI messages and tools.

    Messages: an optional first system (or "developer") message, then user, assistant
    (content and/or tool_calls) and tool messages; the last one is a user or tool message
    (an assistant turn is then opened). With no tools in the prompt and no tool
    conversation this is exactly chat.messages_to_prompt."""
    functions = select_tools(check_tools(tools), tool_choice)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ToolCallError("messages must be a non-empty list of {'role', 'content'} objects")
    turns: List[Tuple[str, str]] = []  # (header after <|im_start|>, body)
    meta = DEFAULT_META_INSTRUCTION if system is None else system
    plain = not functions
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ToolCallError(f"messages[{n}] must be an object with a 'role', got {m!r}")
        role = m["role"]
        if role not in MESSAGE_ROLES:
            raise ToolCallError(f"messages[{n}].role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        text = message_text(m.get("content"), f"messages[{n}].content")
        if role in ("system", "developer"):
            if n != 0:
                raise ToolCallError(f"messages[{n}]: a {role} message may only come first")
            meta = text
            continue
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
                raise ToolCallError(f"messages[{n}].tool_calls must be a list, got {calls!r}")
            text += "".join(
                f"{ACTION_START}{PLUGIN}\n{_call_json(c, f'messages[{n}].tool_calls[{k}]')}{ACTION_END}"
                for k, c in enumerate(calls)
            )
            plain = False
        if role == "tool":
            turns.append((f"environment name={PLUGIN}", text))
            plain = False
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] == "assistant":
        raise ToolCallError("messages must end with a user or tool message")
    if plain:
        # Same prompt as LLM.chat's message lists (one implementation of that format).
        simple = [{"role": "system", "content": meta}] + [{"role": r, "content": t} for r, t in turns]
        return messages_to_prompt(simple)
    prompt = f"{IM_START}system\n{meta}{IM_END}\n" if meta else ""
    if functions:
        prompt += f"{IM_START}system name={PLUGIN}\n{json.dumps(functions, ensure_ascii=False)}{IM_END}\n"
    for header, body in turns:
        prompt += f"{IM_START}{header}\n{body}{IM_END}\n"
    return prompt + f"{IM_START}assistant\n"


def encode_messages(tokenizer, messages, tools=None, tool_choice=None, system=None) -> List[int]:
    """Prompt ids: BOS + render_messages(...) with the special-token strings as their ids
    (as chat.encode_chat encodes InternLM2 prompts)."""
    return [tokenizer.bos_id] + tokenizer.encode(render_messages(messages, tools, tool_choice, system), add_bos=False)


def supports_tools(llm) -> bool:
    """Whether `llm` uses InternLM2's prompt format and has the tool-call tokens. A model
    with its own chat template (GGUF) does not: its template and its call syntax are its own."""
    by_content = getattr(llm.tokenizer, "_by_content", {})
    return llm.chat_template is None and all(t in by_content for t in (ACTION_START, ACTION_END, PLUGIN))


# ---- output -----------------------------------------------------------------------------


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's function.arguments)
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: Optional[int] = None) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def _parse_call(body: str) -> Optional[ToolCall]:
    """The text between the markers -> a call, or None when it is not a well-formed one."""
    head = body.lstrip(" ")
    if not head.startswith(PLUGIN):
        return None
    try:
        obj = json.loads(head[len(PLUGIN) :])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some fine-tunes write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Incremental parser of a reply: feed text deltas, get events ("text", str) and
    ("call", ToolCall) in order. `drop`: strings removed from the text wherever they
    appear (a stop token's text such as "<|im_end|>" when special tokens are kept).

    Text that might still become a marker or a dropped string is held back; at
    `finish()` everything held is resolved. The concatenated "text" events and the calls
    do not depend on how the reply was split into deltas."""

    def __init__(self, drop: Iterable[str] = ()):
        self.drop = tuple(d for d in drop if d)
        self._watch = (ACTION_START,) + self.drop
        self._buf = ""
        self._in_call = False
        self.calls: List[ToolCall] = []

    def _strip(self, text: str) -> str:
        for d in self.drop:
            text = text.replace(d, "")
        return text

    def _close_call(self, body: str, ended: bool) -> List[Tuple[str, Any]]:
        body = self._strip(body)
        call = _parse_call(body)
        if call is None:
            return [("text", ACTION_START + body + (ACTION_END if ended else ""))]
        self.calls.append(call)
        return [("call", call)]

    def feed(self, delta: str) -> List[Tuple[str, Any]]:
        self._buf += delta
        events: List[Tuple[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buf.find(ACTION_END)
                if end < 0:
                    break
                events += self._close_call(self._buf[:end], True)
                self._buf = self._buf[end + len(ACTION_END) :]
                self._in_call = False
                continue
            hits = [(at, w) for w in self._watch for at in [self._buf.find(w)] if at >= 0]
            if not hits:
                keep = self._partial_tail()
                if len(self._buf) > keep:
                    events.append(("text", self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                break
            at, word = min(hits, key=lambda h: (h[0], -len(h[1])))
            if at:
                events.append(("text", self._buf[:at]))
            self._buf = self._buf[at + len(word) :]
            if word == ACTION_START:
                self._in_call = True
        return [e for e in events if e[0] != "text" or e[1]]

    def _partial_tail(self) -> int:
        """Length of the longest end of the buffer that is a proper prefix of a watched string."""
        best = 0
        for w in self._watch:
            for n in range(min(len(w) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(w[:n]):
                    best = n
                    break
        return best

    def finish(self) -> List[Tuple[str, Any]]:
        """End of the reply: an unterminated call is parsed as it stands (the stop token
        <|action_end|> may have been left out of the text); held text is released."""
        events: List[Tuple[str, Any]] = []
        if self._in_call:
            events = self._close_call(self._buf, False)
        elif self._buf:
            events = [("text", self._buf)]
        self._buf, self._in_call = "", False
        return [e for e in events if e[0] != "text" or e[1]]


def parse_tool_calls(text: str, drop: Iterable[str] = ()) -> Tuple[str, List[ToolCall]]:
    """A whole reply -> (its text without the calls, the calls)."""
    parser = ToolCallParser(drop)
    events = parser.feed(text) + parser.finish()
    return "".join(v for k, v in events if k == "text"), [v for k, v in events if k == "call"]


def chat_with_tools(llm, messages, tools=None, tool_choice=None, system=None, **sampling):
    """LLM.chat for a tool conversation: -> (content, tool calls, Generation). Generates
    from the InternLM2.5 prompt with the special tokens kept in the text and
    `<|action_end|>` as an extra stop token, then parses the reply. Sampling defaults are
    LLM.chat's; the Generation's finish_reason is the engine's (a caller reporting to
    OpenAI clients says "tool_calls" when calls came back)."""
    if not supports_tools(llm):
        raise ToolCallError(
            "tools need InternLM2's prompt format and its <|action_start|>/<|plugin|> tokens; "
            "this model has its own chat template"
        )
    ids = encode_messages(llm.tokenizer, messages, tools, tool_choice, system)
    kwargs = {"temperature": 0.8, "top_p": 0.8}
    kwargs.update(sampling)
    kwargs.setdefault("max_new_tokens", max(1, min(1024, llm.model.max_seq_len - len(ids))))
    result = llm.generate(
        ids, stop_token_ids=(llm.tokenizer.token_to_id(ACTION_END),), skip_special_tokens=False, **kwargs
    )
    content, calls = parse_tool_calls(result.text, drop=reply_drop_strings(llm.tokenizer))
    return content, calls, result


def reply_drop_strings(tokenizer) -> List[str]:
    """Special-token strings other than the call markers: never part of a reply's text."""
    keep = {ACTION_START, ACTION_END, PLUGIN, INTERPRETER}
    added = getattr(tokenizer, "added_tokens", {})
    return [t.content for t in added.values() if t.special and t.content not in keep]


__all__ = [
    "ACTION_END",
    "ACTION_START",
    "PLUGIN",
    "ToolCall",
    "ToolCallError",
    "ToolCallParser",
    "chat_with_tools",
    "check_tools",
    "encode_messages",
    "parse_tool_calls",
    "render_messages",
    "reply_drop_strings",
    "select_tools",
    "supports_tools",
]
