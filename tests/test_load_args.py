"""load's arguments are checked once, the same way for every format, before any file is
read: a wrong value is refused with the same message for a checkpoint folder and for a
GGUF file (max_batch=True used to be accepted by one of them)."""

from __future__ import annotations

import pytest
import torch

import fastinternlm
from fastinternlm.weights import files as files_module
from fastinternlm.weights import gguf as gguf_module
from fastinternlm.weights import hf as hf_module
from model_fixtures import tiny_internlm2  # noqa: F401


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import test_gguf

    return test_gguf.write_tiny_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny.gguf", test_gguf.TinyBPE("smollm"), test_gguf.ALL_Q4_TIED, seed=5
    ).path


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(files_module, "read_tensor", refuse)
    monkeypatch.setattr(hf_module, "load_config", refuse)
    monkeypatch.setattr(gguf_module, "read_gguf", refuse)


BAD = [
    ({"max_batch": True}, ValueError, "max_batch must be an integer >= 1, got True"),
    ({"max_batch": 0}, ValueError, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": 2.0}, ValueError, "max_batch must be an integer >= 1, got 2.0"),
    ({"max_seq_len": True}, ValueError, "max_seq_len must be an integer >= 2 or 'auto', got True"),
    ({"max_seq_len": 1}, ValueError, "max_seq_len must be an integer >= 2 or 'auto', got 1"),
    ({"ntk_mode": "yarn"}, ValueError, "ntk_mode must be one of .'hf', 'fixed'., got 'yarn'"),
    ({"dtype": "half precision"}, TypeError, "dtype must be float16, bfloat16 or float32, got 'half precision'"),
    ({"dtype": "int8"}, TypeError, "dtype must be float16 or bfloat16 or float32 .*got torch.int8"),
    ({"dtype": torch.int8}, TypeError, "dtype must be float16 or bfloat16 or float32"),
    ({"device": "meta"}, ValueError, "device must be the CPU or a CUDA device, got meta"),
    ({"device": "tpu"}, ValueError, "device must be the CPU or a CUDA device, got 'tpu'"),
    ({"device": 3.5}, TypeError, "device must be a str or a torch.device, got float"),
    ({"cuda_graph": "yes"}, TypeError, "cuda_graph must be a bool, got str"),
    ({"progress": None}, TypeError, "progress must be a bool, got NoneType"),
    ({"quant": "int8"}, ValueError, "quant must be None or 'int4', got 'int8'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_bad_arguments_refused_the_same_for_every_format(
    fmt, kwargs, error, message, tiny_internlm2, tiny_gguf, no_work
):
    path = tiny_internlm2.path if fmt == "hf" else tiny_gguf
    kwargs = {"device": "cpu", "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        fastinternlm.load(path, **kwargs)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_good_arguments_load(fmt, tiny_internlm2, tiny_gguf):
    path = tiny_internlm2.path if fmt == "hf" else tiny_gguf
    llm = fastinternlm.load(
        path,
        device="cpu",
        dtype="float32",
        max_seq_len=48,
        max_batch=2,
        ntk_mode="fixed",
        progress=False,
        cuda_graph=False,
    )
    assert (llm.model.max_batch, llm.model.max_seq_len, llm.ntk_mode) == (2, 48, "fixed")
    assert llm.dtype == torch.float32 and llm.device == torch.device("cpu")
