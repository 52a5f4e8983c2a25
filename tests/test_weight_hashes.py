"""Every checkpoint format loads bit for bit the weights recorded in
tests/data/weight_hashes.json (made by tests/weight_hashes.py with the loaders as they
were before the weights/ package): a reorganisation of the loading code must not change
one bit of any tensor of any format."""

from __future__ import annotations

import json

import pytest

from weight_hashes import CASES, DATA, compute

STORED = json.loads(DATA.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_loaded_weights_equal_the_recorded_hashes(name, tmp_path):
    if name not in STORED:
        pytest.fail(f"no recorded hashes for {name}; run tests/weight_hashes.py {name} with the old loader")
    got = compute(name, tmp_path)
    if got is None:
        pytest.skip(f"{name}: the checkpoint's package is not installed")
    want = STORED[name]
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{name}: tensors differ from the recorded load: {differ}"
