"""Corrupted checkpoints: every case must end in the project's own error (CheckpointError,
ConfigError, GGUFError: ValueError subclasses) naming the damaged file, raised before any
tensor data is read; none may crash, hang or load. Each case runs `fastinternlm.load` in
its own subprocess, since reading a damaged file could crash the process, with the one
function that reads tensor data (weights.files.read_tensor) replaced by a refusal."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from model_fixtures import tiny_internlm2, write_tiny_internlm2  # noqa: F401

PROJECT_ERRORS = ("CheckpointError", "ConfigError", "GGUFError")
RUNNER = r"""
import json, sys
import fastinternlm
from fastinternlm.weights import files

def refuse(handle, name):
    raise AssertionError("tensor data of " + name + " was read before the files were validated")

files.read_tensor = refuse
try:
    fastinternlm.load(sys.argv[1], device="cpu", progress=False, max_seq_len=32)
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__], "msg": str(e)}))
else:
    print(json.dumps({"type": None}))
"""


def run_load(path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, f"the process died (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_named_error(result: dict, file: str, *fragments: str) -> None:
    assert result["type"] in PROJECT_ERRORS and "ValueError" in result["bases"], result
    assert file in result["msg"], result["msg"]
    for f in fragments:
        assert f in result["msg"], result["msg"]


# ---- safetensors, sharded -----------------------------------------------------------------

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _header(file: Path):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(file: Path, header, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _first_tensor(header) -> str:
    return next(n for n in header if n != "__metadata__")


def _drop_offsets(file):
    h, data = _header(file)
    del h[_first_tensor(h)]["data_offsets"]
    _write_header(file, h, data)


def _wrong_offsets(file):
    h, data = _header(file)
    begin, end = h[_first_tensor(h)]["data_offsets"]
    h[_first_tensor(h)]["data_offsets"] = [begin, end - 2]
    _write_header(file, h, data)


def _unknown_dtype(file):
    h, data = _header(file)
    h[_first_tensor(h)]["dtype"] = "Q7"
    _write_header(file, h, data)


def _list_header(file):
    h, data = _header(file)
    _write_header(file, [h], data)


def _junk_header(file):
    _, data = _header(file)
    _write_header(file, b"\xff\xfe{not json", data)


def _huge_header_length(file):
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def _truncate(keep):
    def cut(file):
        raw = file.read_bytes()
        file.write_bytes(raw[: keep(len(raw))])

    return cut


SAFETENSORS_CASES = {
    # (file to damage, damage, what the message must say besides the file's name)
    "second shard truncated": (SHARD2, _truncate(lambda n: n - 1000), ["truncated"]),
    "first shard cut to 5 bytes": (SHARD1, _truncate(lambda n: 5), ["shorter than 8 bytes"]),
    "zero-byte shard": (SHARD2, _truncate(lambda n: 0), ["shorter than 8 bytes"]),
    "header length past the end": (SHARD1, _huge_header_length, ["header length"]),
    "entry without data_offsets": (SHARD2, _drop_offsets, ["has no data_offsets"]),
    "data_offsets not the tensor's size": (SHARD1, _wrong_offsets, ["data_offsets"]),
    "unknown dtype": (SHARD2, _unknown_dtype, ["unknown dtype 'Q7'"]),
    "header is a JSON list": (SHARD1, _list_header, ["must be a JSON object, got list"]),
    "header is not JSON": (SHARD2, _junk_header, ["unreadable safetensors header"]),
    "index is not JSON": ("model.safetensors.index.json", lambda f: f.write_bytes(b"\x00junk"), ["not valid JSON"]),
    "index is a JSON list": (
        "model.safetensors.index.json",
        lambda f: f.write_text("[1, 2]"),
        ["must hold a JSON object"],
    ),
    "zero-byte tokenizer.model": ("tokenizer.model", _truncate(lambda n: 0), ["empty"]),
    "junk tokenizer.model": (
        "tokenizer.model",
        lambda f: f.write_bytes(os.urandom(300)),
        ["not a readable SentencePiece model"],
    ),
    "junk tokenizer_config.json": ("tokenizer_config.json", lambda f: f.write_bytes(b"{\x81 nope"), ["not valid JSON"]),
    "tokenizer_config.json is a list": (
        "tokenizer_config.json",
        lambda f: f.write_text("[]"),
        ["must hold a JSON object"],
    ),
    "junk config.json": ("config.json", lambda f: f.write_bytes(b"\xff\x00"), ["not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_corrupted_safetensors_checkpoint(tmp_path, tiny_internlm2, case):
    file, damage, fragments = SAFETENSORS_CASES[case]
    path = tmp_path / "ck"
    shutil.copytree(tiny_internlm2.path, path)
    damage(path / file)
    assert_named_error(run_load(path), file, *fragments)


def test_the_undamaged_copy_loads(tmp_path, tiny_internlm2):
    """The runner itself: an intact copy gets past validation to the first tensor read
    (which the runner refuses), so the cases above fail for their damage alone."""
    path = tmp_path / "ck"
    shutil.copytree(tiny_internlm2.path, path)
    result = run_load(path)
    assert result["type"] == "AssertionError" and "was read before" in result["msg"]


# ---- pytorch_model*.bin ---------------------------------------------------------------------

BIN1, BIN2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
BIN_CASES = {
    "zero-byte .bin": (BIN1, _truncate(lambda n: 0)),
    "junk .bin": (BIN2, lambda f: f.write_bytes(os.urandom(4096))),
    "truncated .bin": (BIN2, _truncate(lambda n: n // 2)),
}


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("bin"), fmt="bin", shards=2)


@pytest.mark.parametrize("case", sorted(BIN_CASES))
def test_corrupted_bin_checkpoint(tmp_path, tiny_bin, case):
    file, damage = BIN_CASES[case]
    path = tmp_path / "ck"
    shutil.copytree(tiny_bin.path, path)
    damage(path / file)
    assert_named_error(run_load(path), file, "not a readable PyTorch checkpoint")


# ---- GGUF -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import test_gguf

    return test_gguf.write_tiny_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny.gguf", test_gguf.TinyBPE("smollm"), test_gguf.ALL_Q4_TIED, seed=3
    ).path


def _counts(tensors=None, keys=None):
    def edit(file):
        raw = bytearray(file.read_bytes())
        if tensors is not None:
            raw[8:16] = struct.pack("<Q", tensors)
        if keys is not None:
            raw[16:24] = struct.pack("<Q", keys)
        file.write_bytes(bytes(raw))

    return edit


GGUF_CASES = {
    "truncated in the data": (_truncate(lambda n: n - 777), "unreadable GGUF file"),
    "counts larger than the file": (_truncate(lambda n: 300), "more than a file of 300 bytes can hold"),
    "truncated in the metadata": (_truncate(lambda n: 3000), "unreadable GGUF file"),
    "cut to 10 bytes": (_truncate(lambda n: 10), "truncated GGUF header"),
    "2^40 tensors": (_counts(tensors=2**40), "announces 1099511627776 tensors"),
    "2^40 keys": (_counts(keys=2**40), "1099511627776 metadata keys"),
    "a few tensors too many": (_counts(tensors=40), "unreadable GGUF file"),
    "version 99": (
        lambda f: f.write_bytes(f.read_bytes()[:4] + struct.pack("<I", 99) + f.read_bytes()[8:]),
        "GGUF version 99 is not supported",
    ),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_corrupted_gguf(tmp_path, tiny_gguf, case):
    damage, fragment = GGUF_CASES[case]
    path = tmp_path / "damaged.gguf"
    shutil.copy(tiny_gguf, path)
    damage(path)
    result = run_load(path)
    assert result["type"] == "GGUFError" and "ValueError" in result["bases"], result
    # The fragment is looked for outside the path: pytest names tmp_path after the case.
    assert str(path) in result["msg"] and fragment in result["msg"].replace(str(path), ""), result["msg"]
