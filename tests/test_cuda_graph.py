"""The captured decode step (cuda_graph.DecodeGraph) against eager decoding: the same tokens
for greedy and seeded sampling, batches of different prompt lengths, both NTK modes across
the dynamic-NTK threshold, and a capture that leaves the live KV cache untouched. CUDA only
(graphs are a CUDA feature); on the CPU every test here skips."""

import pytest
import torch

import fastinternlm
from fastinternlm.cuda_graph import DecodeGraph
from model_fixtures import write_tiny_internlm2

MAX_POS = 64  # the tiny model's max_position_embeddings: dynamic NTK starts past it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("model"), dtype=torch.float32, seed=11)


def cuda_or_skip(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")


def load(ckpt, device, dtype, **kw):
    return fastinternlm.load(ckpt.path, device=device, dtype=dtype, progress=False, max_seq_len=160, max_batch=3, **kw)


def prompts(ckpt, lengths):
    return [torch.randint(3, ckpt.tokenizer.vocab_size - 6, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ntk_mode", ["hf", "fixed"])
def test_graph_tokens_equal_eager(ckpt, device, dtype, ntk_mode):
    cuda_or_skip(device)
    graphed = load(ckpt, device, dtype, ntk_mode=ntk_mode)
    eager = load(ckpt, device, dtype, ntk_mode=ntk_mode, cuda_graph=False)
    assert graphed.cuda_graph and not eager.cuda_graph
    # 37 + 60 new tokens crosses MAX_POS, so "hf" mode changes the base mid-decode.
    batch = prompts(ckpt, [37, 5, 50])
    for kw in ({}, {"temperature": 0.9, "top_k": 40, "seed": 1234}):
        a = graphed.generate(batch, max_new_tokens=60, **kw)
        b = eager.generate(batch, max_new_tokens=60, **kw)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_graph_step_matches_decode_and_spares_the_cache(ckpt, device):
    cuda_or_skip(device)
    llm = load(ckpt, device, torch.float16, cuda_graph=False)
    model = llm.model
    for k, v in zip(model.k_cache, model.v_cache):  # random, never-zero cache contents
        k.normal_()
        v.normal_()
    before = [t.clone() for t in model.k_cache + model.v_cache]
    graph = DecodeGraph(model, 2)
    # Warm-up and capture run with slot -1: nothing of them may reach the cache.
    for a, b in zip(before, model.k_cache + model.v_cache):
        assert torch.equal(a, b)
    tokens = torch.randint(3, 200, (2,), device=device)
    slots = torch.tensor([2, 0], dtype=torch.int32, device=device)
    positions = torch.tensor([17, 90], dtype=torch.int32, device=device)
    bases = torch.tensor([10000.0, 23456.0], dtype=torch.float32, device=device)
    got = graph.run(tokens, slots, positions, bases).clone()
    after_graph = [t.clone() for t in model.k_cache + model.v_cache]
    for t, b in zip(model.k_cache + model.v_cache, before):
        t.copy_(b)
    want = model.decode(tokens, slots, positions, bases)
    # The same kernels on the same inputs: equal up to a possible difference in the
    # library GEMM's algorithm choice between capture and eager (one float16 rounding of
    # the logits at most).
    unit = 2.0**-11
    assert (got - want).abs().max().item() <= 4 * unit * want.abs().max().item()
    for a, b in zip(after_graph, model.k_cache + model.v_cache):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_graph_refusals(ckpt, device):
    cuda_or_skip(device)
    model = load(ckpt, device, torch.float16).model
    with pytest.raises(ValueError, match=r"batch must be an integer in \[1, max_batch=3\], got 4"):
        DecodeGraph(model, 4)
    graph = DecodeGraph(model, 1)
    one = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"tokens must have shape \(1,\), got \(2,\)"):
        graph.run(torch.zeros(2, dtype=torch.int64, device=device), one, one, None)
    with pytest.raises(ValueError, match="pass bases"):
        graph.run(torch.zeros(1, dtype=torch.int64, device=device), one, one, None)


def test_graph_refuses_cpu_model(ckpt):
    model = fastinternlm.load(ckpt.path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=32).model
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        DecodeGraph(model, 1)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        fastinternlm.load(
            ckpt.path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=32, cuda_graph="yes"
        )


def test_padded_buckets_equal_eager_and_spare_unused_slots(ckpt, device):
    # max_batch 8, five requests of different lengths: the decode batch shrinks from 5 to 1,
    # so the replays use buckets 8, 4, 2 and 1 with padded rows (slot -1) beside live ones.
    # The tokens equal eager decoding's, and the three slots no request used keep their
    # (random) contents through the captures and every replay.
    cuda_or_skip(device)
    batch = prompts(ckpt, [37, 5, 50, 12, 21])
    lengths = [9, 23, 40, 17, 31]

    def run(cuda_graph):
        llm = fastinternlm.load(
            ckpt.path,
            device=device,
            dtype=torch.float16,
            progress=False,
            max_seq_len=160,
            max_batch=8,
            cuda_graph=cuda_graph,
        )
        caches = llm.model.k_cache + llm.model.v_cache
        for t in caches:
            t.normal_()
        before = [t.clone() for t in caches]
        engine = fastinternlm.Engine(llm)
        assert llm.cuda_graph == cuda_graph  # the captures at engine start succeeded
        reqs = [engine.submit(p, max_new_tokens=n) for p, n in zip(batch, lengths)]
        out = [r.result(timeout=120).token_ids for r in reqs]
        used = {s.index for s in engine._slots if s.tokens}
        engine.close()
        return out, used, before, caches

    graphed, used, before, caches = run(True)
    eager, _, _, _ = run(False)
    assert graphed == eager
    assert len(used) == len(batch)
    spare = [i for i in range(8) if i not in used]
    for a, b in zip(before, caches):
        assert torch.equal(a[spare], b[spare])
