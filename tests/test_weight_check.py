"""Transformer.check_finite and `fastinternlm check`: a NaN or Inf anywhere in a loaded
model's weights (dense tensors, int4 scales and offsets, embeddings, norms, head) is
found on the device the weights live on and named, instead of turning every token into
garbage later."""

import random
import subprocess
import sys

import pytest
import torch

import fastinternlm
from fastinternlm.model import NonFiniteWeightError
from model_fixtures import write_tiny_internlm2

LAYERS = 2
# Per layer: attention_norm, wqkv, wo, ffn_norm, w13, w2; then embeddings, norm, head.
DENSE_TENSORS = 6 * LAYERS + 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # ffn a multiple of 32: the int4 test quantizes w2, whose input size it is.
    return write_tiny_internlm2(
        tmp_path_factory.mktemp("model"), layers=LAYERS, ffn=224, dtype=torch.float32, shards=1, seed=11
    )


def load(ckpt, device, **kw):
    return fastinternlm.load(
        ckpt.path,
        device=device,
        dtype=torch.float32 if device.type == "cpu" else torch.float16,
        max_seq_len=16,
        progress=False,
        **kw,
    )


def poison(t: torch.Tensor, value: float) -> int:
    """Write `value` at a random element of t in place; returns its flat index."""
    index = random.randrange(t.numel())
    t.view(-1)[index] = value
    return index


def test_clean_model_passes_and_every_weight_is_scanned(ckpt, device):
    llm = load(ckpt, device)
    names = [name for name, _ in llm.model.named_weights()]
    assert len(names) == len(set(names)) == DENSE_TENSORS
    assert names[0] == "tok_embeddings" and names[-2:] == ["norm", "output"]
    assert all(t.device == llm.model.device for _, t in llm.model.named_weights())
    llm.model.check_finite()  # raises on a non-finite value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_names_the_bad_tensor(ckpt, device, value):
    llm = load(ckpt, device)
    named = dict(llm.model.named_weights())
    name = random.choice(list(named))
    index = poison(named[name], value)
    with pytest.raises(
        NonFiniteWeightError,
        match=rf"weight {name} \(.*\) holds 1 non-finite value\(s\).* "
        rf"flat index {index} is {value}",
    ):
        llm.model.check_finite()


def test_names_the_first_of_several(ckpt, device):
    llm = load(ckpt, device)
    names = [name for name, _ in llm.model.named_weights()]
    first, second = sorted(random.sample(range(len(names)), 2))
    named = dict(llm.model.named_weights())
    poison(named[names[second]], float("nan"))
    poison(named[names[first]], float("inf"))
    with pytest.raises(NonFiniteWeightError, match=rf"weight {names[first]} "):
        llm.model.check_finite()


def test_int4_scales_and_offsets(ckpt, device):
    llm = load(ckpt, device, quant="int4", group_size=32, quant_head=True)
    names = [name for name, _ in llm.model.named_weights()]
    # Embeddings and final norm, per layer two norms and four Int4Weights (two float
    # tensors each), and the int4 head.
    assert len(names) == 2 + LAYERS * (2 + 2 * 4) + 2
    assert "output.scales" in names and "layers.1.w2.offsets" in names
    llm.model.check_finite()
    name = random.choice([n for n in names if n.endswith((".scales", ".offsets"))])
    poison(dict(llm.model.named_weights())[name], float("inf"))
    with pytest.raises(NonFiniteWeightError, match=rf"weight {name} "):
        llm.model.check_finite()


def test_cli_check(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    base = [sys.executable, "-m", "fastinternlm", "check", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    good = subprocess.run(base + [str(ckpt.path)], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert f"{DENSE_TENSORS} weight tensors, all finite" in good.stdout
    # The same checkpoint with one NaN in layer 1's w1 (stacked into w13 when loaded).
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for f in ckpt.path.iterdir():
        if f.is_file():
            (bad_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad_dir / "model.safetensors"))
    poison(tensors["model.layers.1.feed_forward.w1.weight"], float("nan"))
    save_file(tensors, str(bad_dir / "model.safetensors"), metadata={"format": "pt"})
    bad = subprocess.run(base + [str(bad_dir)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "weight layers.1.w13 " in bad.stderr and "non-finite" in bad.stderr
