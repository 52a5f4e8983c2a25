"""The `fastinternlm` command as a person uses it: a subprocess, a pipe, a terminal.

Argument errors must come before the model loads (a nonexistent --model proves it: had
the loader run, the message would be about the path), as one line with exit 2; chat must
survive Ctrl-C during an answer and quit cleanly on Ctrl-C or Ctrl-D at the prompt
(driven through a pseudo-terminal, where Ctrl-C is the byte 0x03 that the terminal turns
into SIGINT)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_fixtures import write_tiny_internlm2

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
    "FASTINTERNLM_NUM_THREADS": "1",
}
ENV.pop("FASTINTERNLM_TRACEBACK", None)
MISSING = "/nonexistent/checkpoint"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # A long context, so an answer of thousands of tokens fits (Ctrl-C must land mid-answer).
    return write_tiny_internlm2(
        tmp_path_factory.mktemp("cli_tiny"),
        max_position_embeddings=4096,
        rope_scaling=None,
        dtype=torch.float32,
        shards=1,
    ).path


def run(*args, input=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "fastinternlm", *args],
        capture_output=True,
        text=True,
        env=ENV,
        input=input,
        timeout=timeout,
    )


def one_error_line(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("fastinternlm ") and "error:" in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1", "got 0"]),
        (["--max-new-tokens", "many"], ["--max-new-tokens", "integer", "'many'"]),
        (["--temperature", "-1"], ["--temperature", ">= 0", "-1"]),
        (["--temperature", "nan"], ["--temperature", "nan"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--min-p", "1"], ["--min-p", "[0, 1)"]),
        (["--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
        (["--seed", str(2**70)], ["--seed", str(2**70)]),
        (["--max-seq-len", "1"], ["--max-seq-len", ">= 2"]),
        (["--device", "tpu"], ["--device", "cpu, cuda or cuda:N", "'tpu'"]),
    ],
)
def test_argument_errors_come_before_loading(args, needles):
    r = run("generate", "--model", MISSING, *args, "Hello")
    line = one_error_line(r, 2, *needles)
    assert MISSING not in line


def test_empty_prompt_is_refused_before_loading():
    one_error_line(run("generate", "--model", MISSING, ""), 2, "prompt is empty")


def test_cuda_without_a_gpu_is_refused_before_loading():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    one_error_line(run("generate", "--model", MISSING, "--device", "cuda", "Hello"), 2, "no CUDA device")


def test_a_kv_cache_too_big_for_memory_is_refused_with_the_numbers(tiny):
    r = run("generate", "--model", str(tiny), "--max-seq-len", str(10**13), "Hello")
    line = one_error_line(r, 2, "does not fit", "KV cache", "GiB", "What would fit")
    # 2 layers x 2 KV heads x 64 x 4 bytes, twice (keys and values): 2048 bytes per position.
    need = re.search(r"KV cache ([\d.]+) GiB", line).group(1)
    assert abs(float(need) - 2048 * 10**13 / 2**30) < 0.1
    largest = int(re.search(r"max_seq_len at this max_batch: (\d+)", line).group(1))
    assert 0 < largest < 10**13
    assert "Loading" not in r.stderr  # refused before any weight was read


def test_a_junk_tokenizer_is_one_line(tiny, tmp_path):
    # A junk tokenizer.model: the loader fails; the CLI says so in one line.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny).iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "tokenizer.model").unlink()
    (broken / "tokenizer.model").write_bytes(os.urandom(97))
    r = run("generate", "--model", str(broken), "--quiet", "Hello")
    assert r.returncode in (1, 2)  # 2 only if the loader calls it an argument (path) problem
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_other_failures_are_one_line_with_exit_1(monkeypatch, capsys):
    from fastinternlm import cli

    def fail(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")

    monkeypatch.setattr(cli, "_load", fail)
    monkeypatch.delenv("FASTINTERNLM_TRACEBACK", raising=False)
    assert cli.main(["generate", "--model", MISSING, "Hello"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fastinternlm generate: error: RuntimeError: CUDA error: an illegal memory access was encountered second line\n"
    )
    monkeypatch.setenv("FASTINTERNLM_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli.main(["generate", "--model", MISSING, "Hello"])


def test_help_shows_defaults():
    r = run("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for needle in ("--max-new-tokens N tokens to generate at most (default: 256)", "(default: 0.0)", "--quiet"):
        assert needle in text, needle
    chat = " ".join(run("chat", "--help").stdout.split())
    assert "(default: 0.8)" in chat


def test_generate_reports_timing_on_stderr_and_quiet_hides_it(tiny):
    r = run(
        "generate", "--model", str(tiny), "--max-new-tokens", "7", "--temperature", "0", "--no-progress", "Hello world"
    )
    assert r.returncode == 0, r.stderr
    m = re.search(
        r"\[(\d+) tokens?, (\d+) in the prompt; time to first token ([\d.]+) s; ([\d.]+) tokens/s\]", r.stderr
    )
    assert m, r.stderr
    assert 1 <= int(m.group(1)) <= 7 and int(m.group(2)) > 0
    assert "tokens/s" not in r.stdout
    q = run("generate", "--model", str(tiny), "--max-new-tokens", "7", "--temperature", "0", "--quiet", "Hello world")
    assert q.returncode == 0 and q.stderr == "", q.stderr
    assert q.stdout == r.stdout  # greedy: the same text, only the report differs


def test_a_closed_pipe_ends_quietly(tiny):
    # `| true`: the reader exits before the first token is written, so every write fails.
    cmd = (
        f"{sys.executable} -m fastinternlm generate --model {tiny} --max-new-tokens 50 --no-progress "
        f"'Hello world' | true; echo \"rc=${{PIPESTATUS[0]}}\" >&2"
    )
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=120)
    assert "rc=0" in r.stderr and "BrokenPipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- chat in a terminal ------------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal (its controlling terminal), read and typed into."""

    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            # As a shell starts a command in a terminal: SIGINT at its default, even when
            # this test runs in the background of a non-interactive shell, which ignores it
            # (an ignored SIGINT survives exec, and Python then never raises KeyboardInterrupt).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, ENV)
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float = 60.0, start: int = 0) -> int:
        """Reads until `pattern` appears after offset `start`; returns the end of the match."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.output.find(pattern, start)
            if at >= 0:
                return at + len(pattern)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output so far: {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {pattern!r}; output: {self.output[-2000:]!r}")
                self.output += chunk

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # keep draining, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.output += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"still running after {timeout} s; output: {self.output[-2000:]!r}")


def chat_terminal(tiny):
    return Terminal(
        [
            sys.executable,
            "-m",
            "fastinternlm",
            "chat",
            "--model",
            str(tiny),
            "--no-progress",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3000",
        ]
    )


def test_chat_ctrl_c_stops_the_answer_and_ctrl_d_quits(tiny):
    t = chat_terminal(tiny)
    end = t.read_until(b"user> ")
    t.type(b"Hello there\n")
    end = t.read_until(b"assistant> ", start=end)
    t.read_until(b"", start=end)
    # Let the answer run a little (3000 tokens would take minutes), then Ctrl-C.
    deadline = time.monotonic() + 30
    while len(t.output) < end + 40 and time.monotonic() < deadline:
        if select.select([t.fd], [], [], 0.2)[0]:
            t.output += os.read(t.fd, 4096)
    assert len(t.output) >= end + 40, t.output[-500:]
    t.type(b"\x03")
    end = t.read_until(b"answer stopped", start=end, timeout=30)
    end = t.read_until(b"user> ", start=end)
    # Still alive, and the next question is answered (with the first turn in its history).
    t.type(b"And then?\n")
    end = t.read_until(b"assistant> ", start=end)
    t.type(b"\x03")
    end = t.read_until(b"user> ", start=end, timeout=30)
    t.type(b"\x04")  # Ctrl-D at the prompt
    assert t.wait() == 0
    assert b"Traceback" not in t.output, t.output[-2000:]


def test_chat_ctrl_c_at_the_prompt_quits_with_0(tiny):
    t = chat_terminal(tiny)
    t.read_until(b"user> ")
    # As a person would: Ctrl-C once the prompt waits for input. A SIGINT that lands between
    # the prompt being written and readline blocking in read() only sets Python's flag,
    # which readline does not look at until a key arrives.
    time.sleep(0.5)
    t.type(b"\x03")
    assert t.wait() == 0
    assert b"Traceback" not in t.output and b"KeyboardInterrupt" not in t.output, t.output[-2000:]


def test_chat_keeps_the_stopped_turn_in_the_history(monkeypatch, capsys):
    """What the terminal test cannot see: the history the next turn is sent with."""
    from fastinternlm import cli

    calls = []

    class FakeLLM:
        def stream_chat(self, query, history, system=None, **kwargs):
            calls.append((query, list(history)))
            yield "partial "
            if len(calls) == 1:
                raise KeyboardInterrupt  # as Ctrl-C during the first answer
            yield "done"

    monkeypatch.setattr(cli, "_load", lambda args: FakeLLM())
    lines = iter(["first question", "second question"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(["chat", "--model", MISSING, "--quiet"]) == 0
    assert calls == [("first question", []), ("second question", [("first question", "partial ")])]
