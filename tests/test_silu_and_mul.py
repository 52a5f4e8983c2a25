import pytest
import torch

from conftest import assert_close, rand
from fastinternlm import ops


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,ffn", [(1, 14336), (7, 1000), (3, 13), (2, 8)])
def test_silu_and_mul(device, dtype, rows, ffn):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    x = rand(rows, 2 * ffn, dtype=dtype, device=device, scale=3.0)
    out = ops.silu_and_mul(x)
    x64 = x.double().cpu()
    gate, up = x64[:, :ffn], x64[:, ffn:]
    expected = gate * torch.sigmoid(gate) * up
    # silu rounded to dtype, then the product rounded: two roundings; before that silu's
    # float32 exp (1 ulp), add and divide.
    assert_close(out, expected, dtype, roundings=2, float32_ops=3)


def test_silu_and_mul_leading_dims(device):
    x = rand(2, 3, 2 * 24, dtype=torch.float16, device=device)
    out = ops.silu_and_mul(x)
    assert out.shape == (2, 3, 24)
    g, u = x.double()[..., :24], x.double()[..., 24:]
    assert_close(out, g * torch.sigmoid(g) * u, torch.float16, roundings=2, float32_ops=3)


def test_silu_and_mul_bad_input(device):
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.silu_and_mul(torch.ones(2, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="even last dimension"):
        ops.silu_and_mul(rand(2, 7, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.silu_and_mul(rand(8, 4, dtype=torch.float16, device=device).t())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.silu_and_mul(None)
