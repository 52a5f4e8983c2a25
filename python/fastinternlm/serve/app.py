"""The FastAPI app: OpenAI's chat completions and completions over an Engine.

Nothing is scheduled here: a request is validated, turned into prompt ids and sampling
arguments, and handed to Engine.submit; its deltas are relayed as they come (server-sent
events in OpenAI's chunk format when streaming). A client that goes away cancels its
engine request, which frees the slot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import toolcalls
from ..engine import EngineOverloaded, EngineUnhealthy
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

PAGE = Path(__file__).with_name("chat.html")
# Seconds a client told "queue full" should wait: about one short request's decode.
RETRY_AFTER_S = 1
# Default max_tokens of /v1/completions, OpenAI's (chat defaults to the rest of the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(rid: str, obj: str, created: int, model: str, choice: Dict[str, Any], usage: bool) -> str:
    """One streamed chunk as an event: a chat delta or a completion text piece. With
    include_usage every chunk carries "usage": null, as OpenAI's do; the last one has it."""
    out = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": 0, **choice, "logprobs": None}],
    }
    if usage:
        out["usage"] = None
    return _sse(out)


def _finish_reason(engine_reason: str, has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    return "stop" if engine_reason in ("stop", "stop_string") else engine_reason


def _validation_message(e: ValidationError) -> Tuple[str, Optional[str]]:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return f"The request body is not valid JSON: {err['msg']}", None
    loc = ".".join(str(p) for p in err["loc"])
    given = err.get("input")
    shown = json.dumps(given)[:80] if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{loc}: {err['msg']} (got {shown})", loc


class Server:
    """State shared by the routes: the model, its engine and the metrics."""

    def __init__(self, llm, engine, model_name: str):
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.max_seq_len = llm.model.max_seq_len
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())
        self.tool_drop = toolcalls.reply_drop_strings(llm.tokenizer)
        self.tools_ok = toolcalls.supports_tools(llm)
        self.action_end_id = llm.tokenizer.token_to_id(toolcalls.ACTION_END) if self.tools_ok else None

    # ---- request -> prompt ids + engine arguments ------------------------------------------
    async def parse(self, request: Request, model_cls):
        body = await request.body()
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None
        if req.model is not None and req.model != self.model_name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        return req

    def chat_prompt(self, req: ChatCompletionRequest) -> Tuple[List[int], bool]:
        """-> (prompt ids, whether the reply is parsed for tool calls)."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        with_tools = bool(tools) and choice != "none"
        try:
            if self.llm.chat_template is not None:
                if with_tools:
                    raise APIError(
                        400,
                        "tools are not supported for this model: it has a chat template of its own "
                        "(a GGUF file), whose tool-call syntax this server does not parse; tool calls "
                        "need an InternLM2 checkpoint",
                        param="tools",
                    )
                for n, m in enumerate(messages):
                    m["content"] = toolcalls.message_text(m.get("content"), f"messages[{n}].content")
                    if m["role"] == "developer":
                        m["role"] = "system"
                return self.llm.chat_template.encode(messages), False
            if with_tools and not self.tools_ok:
                raise APIError(
                    400,
                    "tools need the <|action_start|>, <|action_end|> and <|plugin|> tokens, "
                    "which this model's tokenizer does not have",
                    param="tools",
                )
            ids = toolcalls.encode_messages(self.llm.tokenizer, messages, tools, choice)
            with_tools = with_tools and bool(toolcalls.select_tools(toolcalls.check_tools(tools), choice))
            return ids, with_tools
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None

    def completion_prompt(self, req: CompletionRequest) -> List[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.llm.tokenizer.encode(prompt)
        if not prompt:
            raise APIError(400, "prompt: the token-id list is empty", param="prompt")
        vocab = self.llm.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    def sampling(self, req, prompt_len: int, max_tokens: Optional[int], default_max: Optional[int]) -> Dict[str, Any]:
        if max_tokens is None:
            max_tokens = self.max_seq_len - prompt_len if default_max is None else default_max
            max_tokens = max(1, min(max_tokens, self.max_seq_len - prompt_len))
        if prompt_len + max_tokens > self.max_seq_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Please shorten the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop is not None and any(s == "" for s in stop):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return dict(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            stop=stop or None,
        )

    def submit(self, ids: List[int], kwargs: Dict[str, Any], tools: bool):
        if tools:
            kwargs = dict(kwargs, stop_token_ids=(self.action_end_id,), skip_special_tokens=False)
        try:
            return self.engine.submit(ids, **kwargs)
        except EngineOverloaded as e:
            raise APIError(
                429,
                f"The server is busy: {e}. Retry after {RETRY_AFTER_S} s.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except EngineUnhealthy as e:
            raise APIError(
                503, f"The engine is not serving: {e}", type="service_unavailable", code="engine_unhealthy"
            ) from None
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None

    # ---- results ---------------------------------------------------------------------------
    @staticmethod
    async def wait(req):
        return req.result() if req.done else await asyncio.to_thread(req.result)

    def finish(self, req, gen, endpoint: str, t0: float, has_calls: bool = False) -> str:
        """The OpenAI finish_reason of a finished request (recorded in the metrics)."""
        if gen.finish_reason == "error":
            raise APIError(500, f"generation failed: {gen.error}", type="server_error", code="engine_error")
        reason = _finish_reason(gen.finish_reason, has_calls)
        self.metrics.finished(endpoint, gen, reason, time.perf_counter() - t0, getattr(req, "token_times", None))
        return reason

    @staticmethod
    def usage(gen) -> Dict[str, int]:
        return {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": len(gen.token_ids),
            "total_tokens": gen.prompt_tokens + len(gen.token_ids),
        }


async def _drain(req, request: Request) -> None:
    """Wait for a non-streamed request, cancelling it if the client goes away first."""

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                req.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for _ in req:
            pass
    finally:
        watcher.cancel()
        if not req.done:
            req.cancel()


def create_app(
    llm, engine, model_name: str, *, close_engine_timeout: Optional[float] = None, close_engine: bool = True
) -> FastAPI:
    """The app serving `llm` through `engine` under the name `model_name`. On shutdown the
    engine is closed (close_engine), waiting up to close_engine_timeout seconds for it."""
    srv = Server(llm, engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine:
            await asyncio.to_thread(engine.close, close_engine_timeout)

    app = FastAPI(title="fastinternlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        srv.metrics.errors.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        # The engine's scalar figures (its latency sample lists are for /metrics-like tools, not a probe).
        stats = {k: v for k, v in engine.stats().items() if isinstance(v, (int, float, bool))}
        ok = bool(stats.get("healthy")) and engine.healthy
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "model": model_name, "engine": stats},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": srv.created,
                    "owned_by": "fastinternlm",
                    "max_model_len": srv.max_seq_len,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        req = await srv.parse(request, ChatCompletionRequest)
        ids, tools = srv.chat_prompt(req)
        kwargs = srv.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, None)
        handle = srv.submit(ids, kwargs, tools)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _chat_stream(srv, handle, rid, created, tools, usage, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        await _drain(handle, request)
        gen = await srv.wait(handle)
        calls: List[toolcalls.ToolCall] = []
        content = gen.text
        if tools:
            content, calls = toolcalls.parse_tool_calls(gen.text, srv.tool_drop)
        reason = srv.finish(handle, gen, "chat", t0, bool(calls))
        message: Dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": srv.usage(gen),
            "system_fingerprint": None,
        }

    async def _chat_stream(srv: Server, handle, rid, created, tools: bool, usage: bool, t0) -> AsyncIterator[str]:
        def chunk(delta, finish=None):
            choice = {"delta": delta, "finish_reason": finish}
            return _chunk(rid, "chat.completion.chunk", created, model_name, choice, usage)

        parser = toolcalls.ToolCallParser(srv.tool_drop) if tools else None
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in handle:
                if parser is None:
                    yield chunk({"content": delta})
                else:
                    for kind, value in parser.feed(delta):
                        yield from_event(chunk, kind, value, parser)
            if parser is not None:
                for kind, value in parser.finish():
                    yield from_event(chunk, kind, value, parser)
            gen = await srv.wait(handle)
            try:
                reason = srv.finish(handle, gen, "chat", t0, bool(parser and parser.calls))
            except APIError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            yield chunk({}, reason)
            if usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": srv.usage(gen),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        req = await srv.parse(request, CompletionRequest)
        ids = srv.completion_prompt(req)
        kwargs = srv.sampling(req, len(ids), req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        handle = srv.submit(ids, kwargs, False)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = (req.prompt if isinstance(req.prompt, str) else llm.tokenizer.decode(ids)) if req.echo else ""
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _completion_stream(handle, rid, created, prefix, usage, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        await _drain(handle, request)
        gen = await srv.wait(handle)
        reason = srv.finish(handle, gen, "completions", t0)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "text": prefix + gen.text, "logprobs": None, "finish_reason": reason}],
            "usage": srv.usage(gen),
            "system_fingerprint": None,
        }

    async def _completion_stream(handle, rid, created, prefix: str, usage: bool, t0) -> AsyncIterator[str]:
        def chunk(text, finish=None):
            return _chunk(rid, "text_completion", created, model_name, {"text": text, "finish_reason": finish}, usage)

        try:
            if prefix:
                yield chunk(prefix)
            async for delta in handle:
                yield chunk(delta)
            gen = await srv.wait(handle)
            try:
                reason = srv.finish(handle, gen, "completions", t0)
            except APIError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            yield chunk("", reason)
            if usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": srv.usage(gen),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()

    return app


def from_event(chunk, kind: str, value, parser) -> str:
    """One parser event as a chat chunk: text as content, a call as a complete tool_calls
    entry (its index is its position among this reply's calls)."""
    if kind == "text":
        return chunk({"content": value})
    return chunk({"tool_calls": [value.to_openai(index=parser.calls.index(value))]})
