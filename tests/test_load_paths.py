"""Wrong paths get messages that say what is wrong, checked in the order a person thinks:
does the path exist; is it a folder with config.json, or a GGUF file; then the tokenizer.
Through `fastinternlm.load` and through the `fastinternlm quantize` command."""

from __future__ import annotations

import json
import shutil

import pytest

import fastinternlm
from fastinternlm.cli import main
from fastinternlm.config import ConfigError
from fastinternlm.weights.files import CheckpointError
from model_fixtures import tiny_internlm2  # noqa: F401


def load(path):
    return fastinternlm.load(path, device="cpu", progress=False, max_seq_len=32)


def test_missing_path(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"nowhere does not exist; load takes a checkpoint folder "
        r"\(with config.json\) or a .gguf file",
    ):
        load(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is an empty folder; load takes a checkpoint folder"):
        load(tmp_path)


def test_stray_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"notes.txt is a file, neither a checkpoint folder nor a GGUF file"):
        load(tmp_path / "notes.txt")


def test_folder_without_config_json(tmp_path, tiny_internlm2):
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_internlm2.path / f, tmp_path / f)
    with pytest.raises(
        FileNotFoundError,
        match=r"no config.json in .*: not a Hugging Face checkpoint folder "
        r"\(it holds tokenizer.model, tokenizer_config.json\)",
    ) as e:
        load(tmp_path)
    assert "no tokenizer.model" not in str(e.value)


def test_folder_holding_a_gguf_names_it(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FileNotFoundError, match=r"it holds model.Q4_0.gguf: pass that file's path"):
        load(tmp_path)


def test_config_before_tokenizer(tmp_path, tiny_internlm2):
    """With a broken config.json and no tokenizer, the config is what is named; with a
    good config and no tokenizer, the tokenizer."""
    (tmp_path / "config.json").write_text(json.dumps(dict(tiny_internlm2.config, hidden_act="gelu")))
    with pytest.raises(ConfigError, match="hidden_act must be 'silu'"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_internlm2.config))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
        load(tmp_path)


def test_quantize_a_gguf_says_what_quantize_takes(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert main(["quantize", str(gguf), str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a GGUF file; quantize takes a Hugging Face checkpoint folder (with config.json)" in err
    assert "does not exist" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "stray", "no_config"])
def test_quantize_wrong_paths(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "stray":
        src.write_text("x")
    elif case == "no_config":
        src.mkdir()
        (src / "tokenizer.model").write_bytes(b"x")
    expected = {
        "missing": "src does not exist; quantize takes a Hugging Face checkpoint folder",
        "empty": "src is an empty folder; quantize takes a Hugging Face checkpoint folder",
        "stray": "src is a file, neither a checkpoint folder nor a GGUF file; quantize takes a Hugging Face",
        "no_config": "no config.json in",
    }[case]
    assert main(["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    assert expected in capsys.readouterr().err
