"""Shared test fixtures: the device parameter, fresh random seeds, and dtype-derived
tolerances.

No GPU is queried at import or collection time: the CUDA variant of a test asks inside
the fixture and skips there, so the suite collects on machines without a driver."""

from __future__ import annotations

import os
import random

import pytest
import torch

import fastinternlm

# Unit roundoff of each dtype: the largest relative error of one rounding to it.
UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    if request.param == "cuda":
        if not fastinternlm.build_info()["cuda"]:
            pytest.skip("this build has no CUDA kernels")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        # With its index, so it compares equal to the .device of the tensors made on it.
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A fresh seed per test (set FASTINTERNLM_TEST_SEED to replay one); printed so a
    failure can be reproduced."""
    value = int(os.environ.get("FASTINTERNLM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    print(f"seed={value}")
    return value


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    roundings: float,
    name: str = "output",
    float32_ops: float = 0,
) -> None:
    """|actual - expected| <= (roundings * u + float32_ops * u32) * (|expected| + mean|expected|).

    `expected` is a float64 reference. `roundings` is how many roundings to `dtype` the op
    under test may legitimately incur and `float32_ops` how many float32 operations (each
    one rounding, or one ulp of a libm function) stand between inputs and output, both
    argued at the call site. The mean|expected| term is the absolute floor that rounding
    of intermediates leaves where the output itself cancels to near zero."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    u = roundings * UNIT_ROUNDOFF[dtype] + float32_ops * UNIT_ROUNDOFF[torch.float32]
    bound = u * (e.abs() + e.abs().mean())
    err = (a - e).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: error {err.flatten()[worst]:.3e} exceeds bound {bound.flatten()[worst]:.3e} "
        f"at flat index {worst} (actual {a.flatten()[worst]:.6g}, expected {e.flatten()[worst]:.6g}); "
        f"max error {err.max():.3e}"
    )


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Normal random values in `dtype` (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
