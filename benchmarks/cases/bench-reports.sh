#!/usr/bin/env bash
# The two committed VRAM comparison reports: random-weight Llama-2-7B at seq 2048, micro-batch 1, on the card as it
# is and capped at 15 GiB (what a T4 holds). Run from the repository root on a GPU machine; writes under $1.
set -euo pipefail
out=${1:-benchmarks/results}
python3 -m qlora_trainer bench --model llama-2-7b --random-weights --seq-len 2048 --batch-size 1 \
    --methods full,full-8bit,lora,qlora --out "$out/vram-llama-2-7b-h100"
python3 -m qlora_trainer bench --model llama-2-7b --random-weights --seq-len 2048 --batch-size 1 \
    --methods full,full-8bit,lora,qlora --cap-gib 15 --out "$out/vram-llama-2-7b-h100-cap15"
