"""The runtime end to end on tiny random InternLM2 checkpoints written by the test:
logits against HF transformers and a float64 forward, greedy tokens against HF's
generate, chunking, batching, streaming, sampling, refusals, chat and the CLI."""

import subprocess
import sys

import pytest
import torch

import fastinternlm
from fastinternlm import sequence as sequence_module
from fastinternlm.chat import encode_chat
from model_fixtures import hf_llama_reference, reference_forward, write_tiny_internlm2

MAX_POS = 64  # the tiny models' max_position_embeddings: dynamic NTK starts past it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # float32 storage so every activation dtype is one rounding of the same weights.
    return write_tiny_internlm2(tmp_path_factory.mktemp("model"), dtype=torch.float32, shards=2, seed=7)


def load(ckpt, device="cpu", dtype=torch.float32, **kw):
    kw.setdefault("max_seq_len", 128)
    return fastinternlm.load(ckpt.path, device=device, dtype=dtype, progress=False, **kw)


def random_prompt(ckpt, n):
    # Ordinary pieces only (ids 3 .. first special token), so text round trips.
    return torch.randint(3, ckpt.tokenizer.vocab_size - 6, (n,)).tolist()


def device_dtypes():
    return [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]


@pytest.mark.parametrize("device_name,dtype", device_dtypes())
def test_logits_match_hf_across_ntk(ckpt, device_name, dtype):
    if device_name == "cuda" and not (torch.cuda.is_available() and fastinternlm.build_info()["cuda"]):
        pytest.skip("no CUDA device")
    llm = load(ckpt, device_name, dtype)
    prompt = random_prompt(ckpt, 30)
    generated = llm.generate(prompt, max_new_tokens=40).token_ids
    ids = prompt + generated
    if len(ids) <= MAX_POS:  # a stop token ended it early: extend so the NTK range is crossed
        ids += random_prompt(ckpt, MAX_POS + 6 - len(ids))
    ours = llm.logits(ids).cpu()
    assert ours.dtype == torch.float32 and ours.shape == (len(ids), ckpt.config["vocab_size"])
    ref = reference_forward(ckpt, ids)
    with torch.no_grad():
        hf = hf_llama_reference(ckpt, dtype)(torch.tensor([ids])).logits[0].double()
    err_ours = (ours.double() - ref).abs().max().item()
    err_hf = (hf - ref).abs().max().item()
    # The flash-attention oracle: no more than twice the error HF transformers makes in the
    # same precision, against the same float64 forward (floor: one rounding of the logits).
    floor = fastinternlm_unit(dtype) * ref.abs().mean().item()
    assert err_ours <= 2 * err_hf + floor, f"ours {err_ours:.3e} vs HF {err_hf:.3e} (floor {floor:.1e})"


def fastinternlm_unit(dtype):
    from conftest import UNIT_ROUNDOFF

    return UNIT_ROUNDOFF[dtype]


def test_greedy_tokens_equal_hf_generate_float32(ckpt):
    llm = load(ckpt)
    prompt = random_prompt(ckpt, 30)
    ours = llm.generate(prompt, max_new_tokens=40)
    hf = hf_llama_reference(ckpt, torch.float32)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=sorted(llm.stop_ids),
            pad_token_id=2,
        )
    assert ours.token_ids == out[0, len(prompt) :].tolist()
    assert ours.finish_reason == ("stop" if ours.token_ids[-1] in llm.stop_ids else "length")


def test_chunked_prefill_equals_one_shot(ckpt, monkeypatch):
    llm = load(ckpt)
    ids = random_prompt(ckpt, 90)
    one_shot = llm.logits(ids).double()
    monkeypatch.setattr(sequence_module, "PREFILL_CHUNK", 7)
    chunked = llm.logits(ids).double()
    ref = reference_forward(ckpt, ids)
    # Chunking changes nothing but GEMM shapes: it may not add error beyond what the
    # one-shot forward has against float64.
    assert (chunked - one_shot).abs().max() <= (one_shot - ref).abs().max()
    assert torch.equal(chunked.argmax(-1), one_shot.argmax(-1))


def test_batch_equals_each_alone(ckpt):
    llm = load(ckpt, max_batch=3)
    prompts = [random_prompt(ckpt, n) for n in (5, 33, 17)]
    together = llm.generate(prompts, max_new_tokens=25)
    alone = [llm.generate(p, max_new_tokens=25) for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]


def test_stream_equals_non_stream_and_seed_reproduces(ckpt):
    llm = load(ckpt)
    kw = dict(max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=1234)
    full = llm.generate("Hello world", **kw)
    again = llm.generate("Hello world", **kw)
    streamed = list(llm.generate("Hello world", stream=True, **kw))
    assert full.token_ids == again.token_ids
    assert "".join(streamed) == full.text
    other = llm.generate("Hello world", **{**kw, "seed": 99, "temperature": 1.5, "top_k": 0, "top_p": 1.0})
    assert other.token_ids != full.token_ids  # 30 draws at temperature 1.5 from ~600 tokens


def test_stop_string(ckpt):
    llm = load(ckpt)
    prompt = random_prompt(ckpt, 10)
    base = llm.generate(prompt, max_new_tokens=30)
    text = base.text
    if len(text) < 8:
        pytest.skip("the random model stopped before producing text to cut")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = llm.generate(prompt, max_new_tokens=30, stop=stop)
    assert cut.finish_reason == "stop_string"
    assert cut.text == text[: text.find(stop)]
    assert "".join(llm.generate(prompt, max_new_tokens=30, stop=[stop], stream=True)) == cut.text


def test_ntk_fixed_mode_keeps_the_prompt_base(ckpt):
    llm = load(ckpt, ntk_mode="fixed")
    prompt = random_prompt(ckpt, MAX_POS + 10)  # past max_position_embeddings: base != theta
    out = llm.generate(prompt, max_new_tokens=12)
    ids = prompt + out.token_ids
    base = llm._base(len(prompt))
    assert base > ckpt.config["rope_theta"]
    # With one base for every position, decoding equals one causal forward over the whole
    # sequence with that base: its argmax at each step must be the generated token.
    with torch.inference_mode():
        hidden = llm.model.prefill(torch.tensor(ids), 0, 0, base)
        logits = llm.model.logits(hidden)
    predicted = logits[len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()
    assert predicted == out.token_ids
    # The "hf" mode rotates decoded tokens with their own, larger bases: different logits.
    hf_mode = load(ckpt, ntk_mode="hf")
    assert hf_mode._base(len(ids)) > base


def test_refusals_before_any_work(ckpt, monkeypatch):
    llm = load(ckpt, max_seq_len=64)

    def no_work(*a, **k):
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(llm.model, "prefill", no_work)
    # 50 prompt tokens + 16 new ones need 65 cache positions (the last new token is never run).
    with pytest.raises(
        ValueError,
        match=r"prompt 0 has 50 tokens, and with max_new_tokens 16 needs 65 cache "
        r"positions \(prompt \+ max_new_tokens - 1\) > max_seq_len 64",
    ):
        llm.generate(random_prompt(ckpt, 50), max_new_tokens=16)
    with pytest.raises(ValueError, match="prompt 1 has 65 tokens"):  # every prompt checked before any runs
        llm.generate([random_prompt(ckpt, 3), random_prompt(ckpt, 65)], max_new_tokens=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, 5, 10**6], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        llm.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        llm.generate("hi", max_new_tokens=2, top_p=0.0)
    with pytest.raises(TypeError, match="prompt must be"):
        llm.generate(3.5)
    for empty in ([], (), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(ValueError, match="logits needs at least one token id, got an empty sequence"):
            llm.logits(empty)
    with pytest.raises(ValueError, match="ntk_mode must be one of"):
        load(ckpt, ntk_mode="linear")


def test_chat_builds_the_documented_prompt(ckpt, monkeypatch):
    llm = load(ckpt, max_seq_len=512)  # the default meta instruction is ~250 tiny-tokenizer tokens
    seen = {}
    real = llm.generate

    def spy(prompt, **kw):
        seen["ids"], seen["kw"] = prompt, kw
        return real(prompt, **kw)

    monkeypatch.setattr(llm, "generate", spy)
    history = [("first question", "first answer")]
    response, new_history = llm.chat("second question", history, max_new_tokens=5, temperature=0.0)
    assert seen["ids"] == encode_chat(llm.tokenizer, "second question", history)
    assert new_history == history + [("second question", response)]
    deltas = list(llm.stream_chat("second question", history, max_new_tokens=5, temperature=0.0))
    assert "".join(deltas) == response
    # The stream's return value is the Generation generate() would have given (the CLI's timings).
    stream = llm.generate(seen["ids"], stream=True, max_new_tokens=5, temperature=0.0)
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            result = stop.value
            break
    assert result.text == response and result.finish_reason in ("stop", "length") and result.time_to_first_token > 0
    # OpenAI-style messages give the same prompt as query + history.
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    assert llm.generate(messages, max_new_tokens=5).text == response


def test_cli_generate_and_chat(ckpt):
    llm = load(ckpt)
    expected = llm.generate("Hello", max_new_tokens=6).text
    base = [sys.executable, "-m", "fastinternlm"]
    common = [
        "--model",
        str(ckpt.path),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-seq-len",
        "128",
        "--no-progress",
    ]
    run = subprocess.run(
        base + ["generate", *common, "--max-new-tokens", "6", "Hello"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    chat = subprocess.run(
        base + ["chat", *common, "--max-new-tokens", "4", "--temperature", "0"],
        input="hello\n/reset\nagain\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2 and "(conversation cleared)" in chat.stderr
    bad = subprocess.run(base + ["generate", "--model", "/nonexistent", "hi"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in bad.stderr
