#!/usr/bin/env bash
# The built-in demo: the whole preference-tuning pipeline on the real SmolLM2-135M-Instruct, on CPU
# (10 to 14 minutes on 2 cores), every stage a LoRA adapter chained into the next:
#   pack -> sft -> train-rm -> dpo (SFT adapter continued, frozen SFT as reference)
#   -> kto (DPO adapter continued, --ref DPO) -> ppo (KTO adapter, reward = the train-rm model)
#   -> merge-lora -> eval of every stage on held-out prompts -> one piped `chat` -> before/after table.
# Few steps, short sequences and small batches: it shows the pipeline and a measurable change,
# it is not a recipe. Usage: bash examples/demo.sh [MODEL.gguf] [OUT_DIR]
set -euo pipefail
MODEL=${1:-.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-demo-out}
DATA=$(python -c "from rlkit.demo import DATA_DIR; print(DATA_DIR)")
mkdir -p "$OUT/eval"
export TQDM_DISABLE=1  # no library progress bars between rlkit's own lines

STARTED=$SECONDS
STAGE_STARTED=$SECONDS
TIMES=()
stage() {  # stage N/10 NAME: what -- prints a header and records the previous stage's wall time
    if [[ -n ${STAGE_NAME:-} ]]; then TIMES+=("$STAGE_NAME $((SECONDS - STAGE_STARTED))s"); fi
    STAGE_NAME=$2 STAGE_STARTED=$SECONDS
    echo "== $1 $2: $3  [$(date +%H:%M:%S), +$((SECONDS - STARTED))s]" >&2
}
quiet() {  # quiet LOG CMD...: run CMD with its stderr in LOG, shown only if it fails
    local log=$1; shift
    "$@" 2>"$log" || { cat "$log" >&2; echo "failed: $* (log: $log)" >&2; return 1; }
}
EVAL=(--prompts "$DATA/eval_prompts.jsonl" --reward rlkit.demo.task:reward --max-new-tokens 40)
# Every trainer: LoRA (the default), short sequences (the demo's examples are under 100 tokens).
COMMON=(--max-length 128 --overwrite)

stage 1/10 pack "tokenize, template and pack the SFT conversations (one shown: trainable tokens green)"
PACKED=$(rlkit pack "$DATA/sft.jsonl" --tokenizer "$MODEL" -o "$OUT/packed" --max-length 256 --show 1 --overwrite)

stage 2/10 sft "LoRA fine-tuning on the packed rows"
SFT=$(rlkit sft "$MODEL" "$PACKED" -o "$OUT/sft" --max-length 256 --overwrite \
    --max-steps 16 --batch-size 4 --lr 5e-4 --warmup-steps 2 --log-every 4)

stage 3/10 train-rm "reward model from the SFT model, on preference pairs (held-out accuracy at the end)"
RM=$(rlkit train-rm "$SFT" "$DATA/pairs.jsonl" -o "$OUT/rm" "${COMMON[@]}" \
    --eval-data "$DATA/pairs_eval.jsonl" --max-steps 12 --batch-size 8 --lr 3e-4 --log-every 4)

stage 4/10 dpo "continue the SFT adapter on the pairs; the frozen SFT adapter is the reference"
DPO=$(rlkit dpo "$SFT" "$DATA/pairs.jsonl" -o "$OUT/dpo" "${COMMON[@]}" \
    --max-steps 10 --batch-size 8 --lr 5e-5 --beta 0.1 --no-precompute-ref --log-every 5)

stage 5/10 kto "continue the DPO adapter on thumbs-up/down completions, --ref the DPO adapter"
KTO=$(rlkit kto "$DPO" "$DATA/unpaired.jsonl" -o "$OUT/kto" --ref "$DPO" "${COMMON[@]}" \
    --max-steps 10 --batch-size 8 --lr 5e-5 --beta 0.1 --no-precompute-ref --log-every 5)

stage 6/10 ppo "continue the KTO adapter with rollouts scored by the reward model, KL to the frozen KTO adapter"
PPO=$(rlkit ppo "$KTO" "$DATA/prompts.jsonl" -o "$OUT/ppo" --reward "$RM" "${COMMON[@]}" \
    --max-steps 6 --batch-size 8 --ppo-epochs 2 --max-new-tokens 24 --lr 2e-5 --kl-coef 0.05 \
    --missing-eos-penalty 1.0 --sample-every 6 --num-samples 3 --log-every 4)

stage 7/10 merge-lora "fold the final adapter into a full model dir"
MERGED=$(rlkit merge-lora "$PPO" -o "$OUT/merged" --overwrite)

stage 8/10 eval "greedy answers to $(wc -l < "$DATA/eval_prompts.jsonl") held-out prompts, scored by the task's checker and the reward model"
for name in sft dpo kto; do
    dir=$OUT/$name
    quiet "$OUT/eval/$name.log" rlkit eval "$dir" "${EVAL[@]}" --output-dir "$OUT/eval/$name" > "$OUT/eval/$name.json"
    echo "   $name: $(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"task score {m['score_mean']:.3f}, KL to start {m['kl_mean']:.1f}\")" "$OUT/eval/$name.json")" >&2
done
# The final model against the starting one (--baseline): same prompts, same settings.
quiet "$OUT/eval/ppo.log" rlkit eval "$MERGED" "${EVAL[@]}" --baseline "$MODEL" --ref "$MODEL" \
    --output-dir "$OUT/eval/ppo" > "$OUT/eval/ppo.json"
python -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"   merged (ppo): task score {m['score_mean']:.3f} vs start {m['baseline_score_mean']:.3f}, win rate {m['win_rate']:.2f}\")" "$OUT/eval/ppo.json" >&2
# Every model's completions scored by the reward model of stage 3.
python -m rlkit.demo.report "$OUT/eval" --rm-input "$OUT/eval/all_completions.jsonl" > /dev/null
quiet "$OUT/eval/rm_scores.log" rlkit eval --completions "$OUT/eval/all_completions.jsonl" --reward "$RM" \
    --output-dir "$OUT/eval/rm_scores" > "$OUT/eval/rm_scores.json"

stage 9/10 chat "one question through a pipe (JSONL out)"
echo "How many legs does a spider have?" | rlkit chat "$MERGED" --max-new-tokens 32 | tee "$OUT/chat.jsonl"

stage 10/10 report "before/after on the held-out prompts"
TIMES+=("$STAGE_NAME $((SECONDS - STAGE_STARTED))s")
python -m rlkit.demo.report "$OUT/eval" | tee "$OUT/report.md"
{
    echo
    echo "reward model held-out pair accuracy: $(python -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['eval/accuracy']:.2f}\")" "$RM/final_metrics.json")"
    echo "training curves:"
    for dir in "$SFT" "$RM" "$DPO" "$KTO" "$PPO"; do echo "  $dir/training_curves.png"; done
    echo "final model: $MERGED   (rlkit chat $MERGED)"
    echo "eval reports: $OUT/eval/<stage>/report.json and scores.png"
    echo "wall time: $((SECONDS - STARTED))s (${TIMES[*]})"
} >&2
