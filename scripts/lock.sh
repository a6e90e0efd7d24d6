#!/usr/bin/env bash
# Refreshes requirements.lock, the pinned versions every install uses (`make lock`). Run after changing
# pyproject.toml's dependencies, then `make test` and commit both files.
# torch is left out on purpose: scripts/install.sh installs the pinned build that fits the machine
# (CPU wheel without a GPU, CUDA build with one) before the lock is applied as constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-$(command -v uv || echo .venv/bin/uv)}  # make install puts uv in .venv
# Resolve against torch's CPU wheel (no CUDA libraries in the lock): the one on this machine's disk where
# there is one, else PyTorch's CPU index.
cpu_torch=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
[ -d /opt/wheels ] && ls /opt/wheels/torch-*+cpu-* >/dev/null 2>&1 && cpu_torch=(--find-links /opt/wheels)
"$uv" pip compile -q "${cpu_torch[@]}" pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-emit-package torch --no-header --custom-compile-command "make lock" -o requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
