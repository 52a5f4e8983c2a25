import pytest
import torch

from conftest import assert_close, rand
from fastinternlm import ops

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference(x, weight, eps):
    """float64 RMSNorm; the kernel rounds twice (normalised value, then times weight)."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 1000), (3, 8), (5, 4101), (2, 1)])
def test_rms_norm(device, dtype, rows, hidden):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    x = rand(rows, hidden, dtype=dtype, device=device, scale=3.0)
    w = rand(hidden, dtype=dtype, device=device)
    eps = 1e-5
    out = ops.rms_norm(x, w, eps)
    # Two roundings to dtype in the op; float32 accumulation of the mean adds < 1.
    assert_close(out, reference(x, w, eps), dtype, roundings=3)
    assert out.dtype == dtype and out.device == x.device


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (9, 2050), (4, 11)])
def test_add_rms_norm(device, dtype, rows, hidden):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")
    x = rand(rows, hidden, dtype=dtype, device=device)
    residual = rand(rows, hidden, dtype=dtype, device=device, scale=2.0)
    w = rand(hidden, dtype=dtype, device=device)
    res_before = residual.clone()
    out = ops.add_rms_norm(x, residual, w, 1e-6)
    summed = res_before.double() + x.double()
    # residual is one rounding of the exact sum.
    assert_close(residual, summed, dtype, roundings=1, name="residual")
    # The norm sees the rounded residual; compare against that to isolate the norm's error.
    assert_close(out, reference(residual, w, 1e-6), dtype, roundings=3)


def test_rms_norm_leading_dims(device):
    x = rand(2, 3, 64, dtype=torch.float16, device=device)
    w = rand(64, dtype=torch.float16, device=device)
    out = ops.rms_norm(x, w)
    assert out.shape == x.shape
    assert_close(out, reference(x, w, 1e-5), torch.float16, roundings=3)


def test_rms_norm_bad_input(device):
    x = rand(4, 16, dtype=torch.float16, device=device)
    w = rand(16, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.rms_norm(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.rms_norm(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ops.rms_norm(x, rand(15, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.rms_norm(rand(16, 4, dtype=torch.float16, device=device).t(), w)
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.add_rms_norm(x, rand(3, 16, dtype=torch.float16, device=device), w)
    with pytest.raises(ValueError, match="residual and x must not overlap in memory"):
        ops.add_rms_norm(x, x, w)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.rms_norm([1.0, 2.0], w)


def test_rms_norm_device_mix(device):
    # The meta device stands in for "another device" where no second one exists.
    other = "meta"
    x = rand(4, 16, dtype=torch.float16, device=device)
    w = torch.empty(16, dtype=torch.float16, device=other)
    with pytest.raises(ValueError, match=f"weight must be on {device.type}"):
        ops.rms_norm(x, w)
