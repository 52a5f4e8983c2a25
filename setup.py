"""Builds fastinternlm._C through CMake and Ninja.

Environment:
  FASTINTERNLM_CUDA=0|1        force a CPU-only build (0) or require CUDA (1); default:
                               compile CUDA whenever nvcc is found
  FASTINTERNLM_CUDA_ARCHS      CUDA architectures, default "80;90a" (Ampere, Hopper)
  FASTINTERNLM_BUILD_DIR       CMake build folder (default build/cmake-<python tag>);
                               kept between builds so a rebuild only compiles what changed
                               (started afresh when a tool it remembers has gone, see
                               stale_cache_reason)
  FASTINTERNLM_NVCC_FLAGS      extra nvcc flags, e.g. "-Xptxas -v"
  MAX_JOBS                     parallel compile jobs
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cache_entries(cache: Path) -> dict:
    """NAME -> value of a CMakeCache.txt (lines NAME:TYPE=value)."""
    out = {}
    for line in cache.read_text(errors="replace").splitlines():
        m = re.match(r"([A-Za-z_][A-Za-z0-9_.-]*):[A-Z]+=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def ninja_program() -> str:
    """The Ninja of the environment running this build: pip's isolated build puts the
    `ninja` package's binary first on PATH, a development environment has its own."""
    try:
        import ninja
        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if found is None:
        raise RuntimeError("fastinternlm: building needs Ninja (pip install ninja, or pip install . which "
                           "installs it for the build)")
    return found


# Tools whose absolute path CMake writes into the cache at the first configure and never
# looks up again: a compiler that has gone means the toolchain moved. (The cmake and ninja
# of pip's isolated build environment vanish after every install, but CMake takes a new
# cmake running it and the Ninja passed on each configure without rebuilding anything.)
_TOOL_ENTRIES = ("CMAKE_CXX_COMPILER", "CMAKE_C_COMPILER", "CMAKE_CUDA_COMPILER")


def stale_cache_reason(build_dir: Path):
    """Why the CMake cache in build_dir cannot be reused (None when it can, or there is
    none). The make program is not checked: it is passed on every configure, and CMake
    takes a new one without rebuilding anything; a compiler or generator change means a
    different toolchain, for which CMake itself asks for a fresh cache."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    entries = _cache_entries(cache)
    generator = entries.get("CMAKE_GENERATOR")
    if generator is not None and generator != "Ninja":
        return f"it was configured for the {generator!r} generator, not Ninja"
    source = entries.get("CMAKE_HOME_DIRECTORY")
    if source is not None and Path(source).resolve() != ROOT:
        return f"it belongs to the source tree {source}, not {ROOT}"
    for name in _TOOL_ENTRIES:
        value = entries.get(name)
        if value and os.path.isabs(value) and not os.path.exists(value):
            return f"its {name} {value} no longer exists"
    return None


def clear_cache(build_dir: Path) -> None:
    """Forget the configuration, keep nothing CMake could mix with a new toolchain."""
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
    for name in ("build.ninja", ".ninja_deps", ".ninja_log", "cmake_install.cmake"):
        (build_dir / name).unlink(missing_ok=True)


def configure_command(build_dir: Path, out_dir: Path) -> list:
    """The CMake configure command for this environment (run on every build: cheap when
    nothing changed, and it re-points the cache at this environment's Ninja)."""
    import pybind11

    cuda = os.environ.get("FASTINTERNLM_CUDA", "AUTO")
    cuda = {"0": "OFF", "1": "ON"}.get(cuda, cuda)
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja_program()}",
        f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTINTERNLM_BUILD_TYPE', 'Release')}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DFASTINTERNLM_CUDA={cuda}",
        f"-DFASTINTERNLM_CUDA_ARCHS={os.environ.get('FASTINTERNLM_CUDA_ARCHS', '80;90a')}",
        f"-DFASTINTERNLM_NVCC_EXTRA_FLAGS={os.environ.get('FASTINTERNLM_NVCC_FLAGS', '')}",
    ]
    return configure


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = Path(os.environ.get("FASTINTERNLM_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        reason = stale_cache_reason(build_dir)
        if reason is not None:
            print(f"fastinternlm: starting a clean build in {build_dir}: {reason}", flush=True)
            clear_cache(build_dir)
        elif (build_dir / "CMakeCache.txt").is_file():
            print(f"fastinternlm: incremental build in {build_dir}", flush=True)
        configure = configure_command(build_dir, out_dir)
        subprocess.run(configure, check=True)
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers
    setup(ext_modules=[CMakeExtension("fastinternlm._C")], cmdclass={"build_ext": CMakeBuild})
