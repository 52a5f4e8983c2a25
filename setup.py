"""Builds fastinternlm._C through CMake and Ninja.

Environment:
  FASTINTERNLM_CUDA=0|1        force a CPU-only build (0) or require CUDA (1); default:
                               compile CUDA whenever nvcc is found
  FASTINTERNLM_CUDA_ARCHS      CUDA architectures, default "80;90a" (Ampere, Hopper)
  FASTINTERNLM_BUILD_DIR       CMake build folder (default build/cmake-<python tag>);
                               kept between builds so a rebuild only compiles what changed
  FASTINTERNLM_NVCC_FLAGS      extra nvcc flags, e.g. "-Xptxas -v"
  MAX_JOBS                     parallel compile jobs
"""

import os
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = Path(os.environ.get("FASTINTERNLM_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("FASTINTERNLM_CUDA", "AUTO")
        cuda = {"0": "OFF", "1": "ON"}.get(cuda, cuda)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTINTERNLM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTINTERNLM_CUDA={cuda}",
            f"-DFASTINTERNLM_CUDA_ARCHS={os.environ.get('FASTINTERNLM_CUDA_ARCHS', '80;90a')}",
            f"-DFASTINTERNLM_NVCC_EXTRA_FLAGS={os.environ.get('FASTINTERNLM_NVCC_FLAGS', '')}",
        ]
        subprocess.run(configure, check=True)
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)


setup(ext_modules=[CMakeExtension("fastinternlm._C")], cmdclass={"build_ext": CMakeBuild})
