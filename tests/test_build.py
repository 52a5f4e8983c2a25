"""A kept CMake build folder survives the environment that configured it going away.

pip builds in a temporary environment (its own cmake, ninja, pybind11) that it deletes
after the install; the build folder in the source tree stays. These tests configure the
real project (configure only, CPU-only: seconds) with tools in a temporary folder, delete
that folder, and configure again as setup.py does."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


@pytest.fixture(scope="module")
def setup_py():
    pytest.importorskip("pybind11")
    spec = importlib.util.spec_from_file_location("fastinternlm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


def _configure(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _cpu_env():
    return {**os.environ, "FASTINTERNLM_CUDA": "0"}


def test_reconfigure_after_the_ninja_that_configured_it_is_gone(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINTERNLM_CUDA", "0")
    build = tmp_path / "build"
    gone = tmp_path / "pip-build-env" / "bin"
    gone.mkdir(parents=True)
    shutil.copy2(setup_py.ninja_program(), gone / "ninja")
    first = setup_py.configure_command(build, tmp_path / "out")
    first = [
        a if not a.startswith("-DCMAKE_MAKE_PROGRAM=") else f"-DCMAKE_MAKE_PROGRAM={gone / 'ninja'}" for a in first
    ]
    r = _configure(first, _cpu_env())
    assert r.returncode == 0, r.stderr
    shutil.rmtree(tmp_path / "pip-build-env")

    # The command without the make program, as setup.py ran it before: CMake still tries the
    # deleted ninja (the failure a second `pip install .` used to end in).
    old = [a for a in setup_py.configure_command(build, tmp_path / "out") if not a.startswith("-DCMAKE_MAKE_PROGRAM=")]
    r = _configure(old, _cpu_env())
    assert r.returncode != 0 and "pip-build-env" in r.stderr, r.stderr

    # The make program is not a reason to start over; setup.py's command re-points it.
    assert setup_py.stale_cache_reason(build) is None
    r = _configure(setup_py.configure_command(build, tmp_path / "out"), _cpu_env())
    assert r.returncode == 0, r.stderr
    cache = setup_py._cache_entries(build / "CMakeCache.txt")
    assert cache["CMAKE_MAKE_PROGRAM"] == setup_py.ninja_program()


def test_a_vanished_compiler_means_a_clean_configure(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINTERNLM_CUDA", "0")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    build = tmp_path / "build"
    tools = tmp_path / "toolchain"
    tools.mkdir()
    (tools / "c++").symlink_to(os.path.realpath(cxx))
    cmd = setup_py.configure_command(build, tmp_path / "out") + [f"-DCMAKE_CXX_COMPILER={tools / 'c++'}"]
    r = _configure(cmd, _cpu_env())
    assert r.returncode == 0, r.stderr
    assert setup_py.stale_cache_reason(build) is None
    shutil.rmtree(tools)

    reason = setup_py.stale_cache_reason(build)
    assert reason is not None and "CMAKE_CXX_COMPILER" in reason and str(tools / "c++") in reason
    setup_py.clear_cache(build)
    assert setup_py.stale_cache_reason(build) is None
    r = _configure(setup_py.configure_command(build, tmp_path / "out"), _cpu_env())
    assert r.returncode == 0, r.stderr
    assert os.path.exists(setup_py._cache_entries(build / "CMakeCache.txt")["CMAKE_CXX_COMPILER"])


def test_a_cache_from_another_generator_or_tree_is_not_reused(setup_py, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (build / "CMakeCache.txt").write_text(
        f"CMAKE_GENERATOR:INTERNAL=Unix Makefiles\nCMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n"
    )
    assert "Unix Makefiles" in setup_py.stale_cache_reason(build)
    (build / "CMakeCache.txt").write_text(
        f"CMAKE_GENERATOR:INTERNAL=Ninja\nCMAKE_HOME_DIRECTORY:INTERNAL={tmp_path / 'elsewhere'}\n"
    )
    assert "elsewhere" in setup_py.stale_cache_reason(build)
    (build / "CMakeCache.txt").write_text(f"CMAKE_GENERATOR:INTERNAL=Ninja\nCMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n")
    assert setup_py.stale_cache_reason(build) is None
