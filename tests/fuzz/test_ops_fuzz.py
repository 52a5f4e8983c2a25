"""Runs the op abuse cases of ops_cases.py in worker subprocesses, many cases per process
(importing torch dominates on a small machine). A worker that crashes or hangs is
replaced by a new one that goes on after the case it was running, and that case fails
with the signal or the timeout, so one crash neither hides nor fails the other cases.
One test per (op, device) reports every failing case of that op."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ops_cases import CASES  # noqa: E402

OPS = sorted({c.op for c in CASES.values()})
# A worker's budget per case: the slowest good case takes well under a second on 2 cores;
# a hang (an infinite loop in a kernel, a deadlock) ends here and fails that case.
CASE_TIMEOUT_S = 60

_results: Dict[str, Dict[str, dict]] = {}


def _run_workers(device: str) -> Dict[str, dict]:
    """{case id: outcome} for every case, restarting the worker after a crash or a hang."""
    pending: List[str] = list(CASES)
    results: Dict[str, dict] = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "python"), env.get("PYTHONPATH", "")])
    while pending:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "ops_cases.py"), device, *pending],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            out, err = proc.communicate(timeout=CASE_TIMEOUT_S * len(pending))
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung = True
        running = None
        for line in out.splitlines():
            record = json.loads(line)
            if "start" in record:
                running = record
            else:
                results[record["id"]] = record
                running = None
        done = [i for i in pending if i in results]
        if running is not None:
            why = "hung (timeout)" if hung else f"crashed the worker (exit status {proc.returncode})"
            results[running["start"]] = {
                "id": running["start"],
                "seed": running["seed"],
                "status": "crash",
                "detail": f"{why}; stderr tail: {err[-2000:]}",
            }
            done.append(running["start"])
        elif len(done) < len(pending):
            raise RuntimeError(f"worker stopped without starting a case (exit {proc.returncode}): {err[-4000:]}")
        pending = [i for i in pending if i not in results]
    return results


def results_for(device: str) -> Dict[str, dict]:
    if device not in _results:
        _results[device] = _run_workers(device)
        counts = collections.Counter(CASES[i].op for i, r in _results[device].items() if r["status"] != "skip")
        print(
            f"fuzz cases run on {device}: "
            + ", ".join(f"{op} {counts[op]}" for op in OPS)
            + f"; total {sum(counts.values())}"
        )
    return _results[device]


@pytest.mark.parametrize("op", OPS)
def test_op_fuzz(op, device):
    results = results_for(device.type)
    mine = {i: r for i, r in results.items() if CASES[i].op == op}
    assert len(mine) == sum(1 for c in CASES.values() if c.op == op)
    bad = [r for r in mine.values() if r["status"] not in ("pass", "skip")]
    assert not bad, f"{len(bad)} of {len(mine)} {op} cases failed:\n" + "\n".join(
        f"  {r['id']} [{r['status']}, FASTINTERNLM_TEST_SEED={r['seed']}]: {r['detail']}" for r in bad
    )
    assert any(r["status"] == "pass" for r in mine.values())
