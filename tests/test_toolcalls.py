"""InternLM2.5 tool calls: the prompt, token for token, and the reply parser at every split.

The reference prompt ids are built here segment by segment from InternLM's documented
chat format (special tokens as their ids 92538..92543, the text between them through
SentencePiece alone), independently of fastinternlm's tokenizer and renderer."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm

from fastinternlm import chat, toolcalls
from fastinternlm.tokenizer import load_tokenizer
from fastinternlm.toolcalls import (
    ACTION_END,
    ACTION_START,
    PLUGIN,
    ToolCallError,
    ToolCallParser,
    encode_messages,
    parse_tool_calls,
    render_messages,
)
from model_fixtures import train_tiny_tokenizer

IDS = {
    "<|plugin|>": 92538,
    "<|interpreter|>": 92539,
    "<|action_end|>": 92540,
    "<|action_start|>": 92541,
    "<|im_end|>": 92542,
    "<|im_start|>": 92543,
}
WORDS = ["Paris", "Zürich", "Shanghai", "上海", "Lyon", "Oslo", "Kyoto", "Lima", "Quito"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # Padded to InternLM2's vocabulary so the chat tokens sit at their real ids.
    d = tmp_path_factory.mktemp("tok92544")
    train_tiny_tokenizer(d, pad_to=92544)
    return load_tokenizer(d), spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def _weather_tool(rng):
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": f"Weather for a city, {rng.randint(1, 9)} days ahead",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }


def test_prompt_token_for_token(tok, seed):
    tokenizer, sp = tok
    rng = random.Random(seed)
    city, days, temp = rng.choice(WORDS), rng.randint(1, 17), rng.randint(-20, 40)
    question = f"What is the weather in {city} for {days} days?"
    tool = _weather_tool(rng)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "days": days})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": temp})},
    ]
    functions = json.dumps(
        [
            {
                "name": "get_weather",
                "description": tool["function"]["description"],
                "parameters": tool["function"]["parameters"],
            }
        ],
        ensure_ascii=False,
    )
    call = json.dumps({"name": "get_weather", "parameters": {"city": city, "days": days}}, ensure_ascii=False)
    S, E = IDS["<|im_start|>"], IDS["<|im_end|>"]
    nl = sp.encode("\n")
    want = (
        [1, S]
        + sp.encode("system\nYou are a helpful assistant.")
        + [E]
        + nl
        + [S]
        + sp.encode("system name=")
        + [IDS["<|plugin|>"]]
        + sp.encode("\n" + functions)
        + [E]
        + nl
        + [S]
        + sp.encode("user\n" + question)
        + [E]
        + nl
        + [S]
        + sp.encode("assistant\nLet me look.")
        + [IDS["<|action_start|>"], IDS["<|plugin|>"]]
        + sp.encode("\n" + call)
        + [IDS["<|action_end|>"], E]
        + nl
        + [S]
        + sp.encode("environment name=")
        + [IDS["<|plugin|>"]]
        + sp.encode("\n" + json.dumps({"temperature": temp}))
        + [E]
        + nl
        + [S]
        + sp.encode("assistant\n")
    )
    got = encode_messages(tokenizer, messages, tools=[tool])
    assert got == want
    # The special tokens appear exactly where the format puts them.
    assert got.count(IDS["<|plugin|>"]) == 3 and got.count(IDS["<|action_start|>"]) == 1


def test_plain_messages_render_as_llm_chat(tok, seed):
    tokenizer, _ = tok
    rng = random.Random(seed)
    messages = [
        {"role": "user", "content": rng.choice(WORDS) * rng.randint(1, 5)},
        {"role": "assistant", "content": rng.choice(WORDS)},
        {"role": "user", "content": "and " + rng.choice(WORDS)},
    ]
    for msgs in (messages, [{"role": "system", "content": "Be brief."}] + messages):
        want = chat.encode_chat(tokenizer, msgs)
        assert encode_messages(tokenizer, msgs) == want
        # tool_choice "none" keeps the tools out of the prompt.
        assert encode_messages(tokenizer, msgs, tools=[_weather_tool(rng)], tool_choice="none") == want
    with_tools = render_messages(messages, tools=[_weather_tool(rng)])
    assert f"<|im_start|>system name={PLUGIN}\n[" in with_tools
    assert with_tools.startswith(f"<|im_start|>system\n{chat.DEFAULT_META_INSTRUCTION}<|im_end|>\n")


def test_named_tool_choice_renders_only_that_tool():
    tools = [{"type": "function", "function": {"name": n}} for n in ("a_fn", "b_fn", "c_fn")]
    prompt = render_messages(
        [{"role": "user", "content": "hi"}], tools, {"type": "function", "function": {"name": "b_fn"}}
    )
    assert '[{"name": "b_fn"}]' in prompt and "a_fn" not in prompt and "c_fn" not in prompt


@pytest.mark.parametrize(
    "tools, choice, match",
    [
        ("get_weather", None, "tools must be a list"),
        ([{"type": "function", "function": {"name": ""}}], None, r"tools\[0\].function.name"),
        ([{"type": "retrieval"}], None, r"tools\[0\] must be"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "JSON Schema"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, None, "appears twice"),
        (
            [{"type": "function", "function": {"name": "f"}}],
            {"type": "function", "function": {"name": "g"}},
            "'g', which is not in tools",
        ),
        ([{"type": "function", "function": {"name": "f"}}], "always", "tool_choice must be"),
    ],
)
def test_bad_tools_are_refused(tools, choice, match):
    with pytest.raises(ToolCallError, match=match):
        render_messages([{"role": "user", "content": "hi"}], tools, choice)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "assistant", "content": "x"}], "end with a user or tool"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "may only come first"),
        ([{"role": "wizard", "content": "a"}], "role must be one of"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text"),
        (
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}],
                },
                {"role": "tool", "content": "r"},
            ],
            "arguments is not valid JSON",
        ),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(ToolCallError, match=match):
        render_messages(messages)


# ---- the parser ----------------------------------------------------------------------------


def _reply(rng):
    city, days = rng.choice(WORDS), rng.randint(1, 17)
    args = {"city": city, "days": days}
    text = f"Sure, checking {city} now."
    raw = f"{text}{ACTION_START}{PLUGIN}\n{json.dumps({'name': 'get_weather', 'parameters': args}, ensure_ascii=False)}{ACTION_END}"
    return raw, text, args


def _run(chunks, drop=()):
    p = ToolCallParser(drop)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    text = "".join(v for k, v in events if k == "text")
    calls = [(v.name, json.loads(v.arguments)) for k, v in events if k == "call"]
    return text, calls, events


def _token_deltas(tokenizer, ids):
    dec = tokenizer.stream(skip_special_tokens=False)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_parser_at_every_token_and_char_boundary(tok, seed):
    tokenizer, _ = tok
    rng = random.Random(seed)
    raw, text, args = _reply(rng)
    want = (text, [("get_weather", args)])
    for allow_special in (True, False):
        # allow_special_tokens=False: the model spelled the markers with ordinary pieces ("<|", "action", ...).
        ids = tokenizer.encode(raw, add_bos=False, allow_special_tokens=allow_special)
        assert (IDS["<|action_start|>"] in ids) == allow_special
        deltas = _token_deltas(tokenizer, ids)
        assert "".join(deltas) == raw
        assert _run(deltas)[:2] == want  # one token at a time
        for k in range(len(deltas) + 1):  # two chunks, cut at every token boundary
            # The stream decoder's deltas, not decode(ids[:k]): a cut inside a multi-byte
            # character decodes to U+FFFD, which no stream ever shows.
            head = "".join(deltas[:k])
            assert _run([head, raw[len(head) :]])[:2] == want, k
    for k in range(len(raw) + 1):  # and at every character
        assert _run([raw[:k], raw[k:]])[:2] == want, k
    assert _run(list(raw))[:2] == want
    cuts = sorted(rng.sample(range(1, len(raw)), 7))
    assert _run([raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])])[:2] == want
    assert parse_tool_calls(raw)[0] == text


def test_streamed_text_never_shows_a_partial_marker(seed):
    rng = random.Random(seed)
    raw, text, _ = _reply(rng)
    p = ToolCallParser()
    shown = ""
    for ch in raw:
        shown += "".join(v for k, v in p.feed(ch) if k == "text")
        assert "<|" not in shown and text.startswith(shown)
    assert shown == text and p.calls and not p.finish()


def test_marker_split_is_held_then_released_when_it_is_not_one():
    p = ToolCallParser()
    assert p.feed("a <|act") == [("text", "a ")]
    assert p.feed("ion") == []
    assert p.feed("_stop|> b") == [("text", "<|action_stop|> b")]
    assert p.finish() == []


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "parameters": {"city": "Par',  # cut off (max_tokens)
        '{"name": "get_weather", "parameters": {"city": "Paris"}',  # one brace short
        '["get_weather", {"city": "Paris"}]',  # JSON, not an object
        '{"parameters": {"city": "Paris"}}',  # no name
        '{"name": "get_weather", "parameters": [1, 2]}',  # arguments not an object
    ],
)
@pytest.mark.parametrize("ended", [True, False])
def test_malformed_call_comes_back_as_text(tok, body, ended):
    tokenizer, _ = tok
    raw = f"Checking.{ACTION_START}{PLUGIN}\n{body}" + (ACTION_END if ended else "")
    ids = tokenizer.encode(raw, add_bos=False)
    for k in range(len(ids) + 1):
        head = tokenizer.decode(ids[:k])
        assert _run([head, raw[len(head) :]])[:2] == (raw, []), k
    assert parse_tool_calls(raw) == (raw, [])


def test_two_calls_trailing_stop_text_and_variants(seed):
    rng = random.Random(seed)
    a, b = rng.choice(WORDS), rng.choice(WORDS)
    raw = (
        f"{ACTION_START}{PLUGIN}\n"
        + json.dumps({"name": "f", "parameters": {"x": a}})
        + ACTION_END
        + f"\n{ACTION_START} {PLUGIN}\n"
        + json.dumps({"name": "g", "arguments": json.dumps({"y": b})})
        + ACTION_END
        + "<|im_end|>"
    )
    want = ("\n", [("f", {"x": a}), ("g", {"y": b})])
    for k in range(len(raw) + 1):
        assert _run([raw[:k], raw[k:]], drop=["<|im_end|>", "</s>"])[:2] == want, k
    # Without <|action_end|> in the text (the stop token left out): still a call.
    cut = f"ok{ACTION_START}{PLUGIN}\n" + json.dumps({"name": "f", "parameters": {}})
    assert _run([cut])[:2] == ("ok", [("f", {})])
    # Code for the interpreter is no function call.
    code = f"Run it.{ACTION_START}<|interpreter|>\n```python\nprint(1)\n```{ACTION_END}"
    assert parse_tool_calls(code) == (code, [])


def test_call_ids_and_openai_shape():
    _, calls = parse_tool_calls(
        f'{ACTION_START}{PLUGIN}\n{{"name": "f", "parameters": {{"k": "v"}}}}{ACTION_END}'
        f'{ACTION_START}{PLUGIN}\n{{"name": "f", "parameters": {{}}}}{ACTION_END}'
    )
    assert len({c.id for c in calls}) == 2
    out = calls[0].to_openai(index=0)
    assert out["index"] == 0 and out["type"] == "function" and out["id"].startswith("call_")
    assert out["function"] == {"name": "f", "arguments": '{"k": "v"}'}


def test_supports_tools(tok):
    tokenizer, _ = tok

    class Fake:
        pass

    llm = Fake()
    llm.tokenizer, llm.chat_template = tokenizer, None
    assert toolcalls.supports_tools(llm)
    llm.chat_template = object()
    assert not toolcalls.supports_tools(llm)
