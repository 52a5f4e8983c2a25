"""The C++ core stands on its own: build it without Python or torch, link a plain C++
program against it, and run that program's checks."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_links_and_runs_without_python(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is required to build the C++ core (pip install cmake)"
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *generator,
            "-DFASTINTERNLM_PYTHON=OFF",
            "-DFASTINTERNLM_BUILD_TESTS=ON",
            "-DFASTINTERNLM_CUDA=OFF",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(
        [cmake, "--build", str(build), "--target", "fastinternlm_core_test"], check=True, capture_output=True, text=True
    )
    exe = build / "fastinternlm_core_test"
    # No libtorch and no libpython in its dependencies.
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "torch" not in ldd and "python" not in ldd, ldd
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all C++ core checks passed" in result.stdout
