#!/usr/bin/env bash
# The built-in demo on the real SmolLM2-135M-Instruct (CPU, a few minutes):
#   pack the shipped SFT data -> LoRA SFT -> generate on held-out prompts, before and after.
# Usage: bash examples/demo.sh MODEL.gguf OUT_DIR
set -euo pipefail
MODEL=${1:-.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-demo-out}
DATA=$(python -c "from rlkit.demo import DATA_DIR; print(DATA_DIR)")
mkdir -p "$OUT"

echo "== 1/3 pack: tokenize, template and pack the demo conversations" >&2
PACKED=$(rlkit pack "$DATA/sft.jsonl" --tokenizer "$MODEL" -o "$OUT/packed" --max-length 256 --show 1 --overwrite)

echo "== 2/3 sft: LoRA fine-tuning on the packed rows" >&2
SFT=$(rlkit sft "$MODEL" "$PACKED" -o "$OUT/sft" --epochs 2 --batch-size 4 --lr 3e-4 --warmup-ratio 0.1 --log-every 5 --overwrite)

echo "== 3/3 generate on held-out prompts: the starting model, then the fine-tuned adapter" >&2
python -m rlkit.demo.generate "$MODEL" "$SFT" --limit 32 --show 4 | tee "$OUT/before_after.jsonl"
echo "model: $SFT   (load it with peft, or chain it into the next rlkit command)" >&2
