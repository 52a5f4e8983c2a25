"""The arithmetic of `python -m fastinternlm.bench accuracy` (perplexity over windows), on
random logits against torch's cross entropy; the model runs it drives are covered by
tests/test_gguf.py and tests/test_quantized_models.py."""

import math

import torch
import torch.nn.functional as F

from fastinternlm.bench.accuracy import evaluation_text, nll_sum, perplexity, windows


def test_windows_cover_the_budget_without_overlap():
    ids = list(range(1000))
    chunks = windows(ids, budget=777, window=100)
    assert [c[0] for c in chunks] == list(range(0, 777, 100))
    assert sum(chunks, []) == ids[:777]
    assert all(len(c) > 1 for c in chunks)


def test_nll_and_perplexity_match_cross_entropy():
    vocab = 37
    chunks = [torch.randint(0, vocab, (n,)).tolist() for n in (13, 29, 5)]
    logits = {id(c): torch.randn(len(c), vocab) * 3 for c in chunks}
    ppl = perplexity(lambda c: logits[id(c)], chunks)
    total = sum(
        F.cross_entropy(logits[id(c)][:-1].double(), torch.tensor(c[1:]), reduction="sum").item() for c in chunks
    )
    count = sum(len(c) - 1 for c in chunks)
    assert math.isclose(ppl, math.exp(total / count), rel_tol=1e-12)
    c = chunks[0]
    assert math.isclose(
        nll_sum(logits[id(c)], c),
        F.cross_entropy(logits[id(c)][:-1].double(), torch.tensor(c[1:]), reduction="sum").item(),
        rel_tol=1e-12,
    )


def test_evaluation_text_is_english_prose_of_the_stdlib():
    text = evaluation_text()
    assert len(text) > 100_000 and "the" in text


def test_dtype_needs_kv_cache(capsys):
    # --dtype other than float32 only for the cache comparison (the HF reference runs in
    # float32); refused before any model is loaded.
    import pytest

    from fastinternlm.bench.accuracy import main

    with pytest.raises(SystemExit):
        main(["--dtype", "float16"])
    assert "--dtype float16 needs --kv-cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dtype", "float8", "--kv-cache", "int4"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
