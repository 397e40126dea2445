#!/usr/bin/env bash
# The built-in demo: the whole preference-tuning pipeline on the real SmolLM2-135M-Instruct, on CPU,
# every stage a LoRA adapter chained into the next, and every stage teaching its own behaviour:
#   sft      the answer format: one line ending with #done      (sft_tools.jsonl; hedged half the time;
#            arithmetic shown with a calculator offered, called in half the answers that could)
#   train-rm a reward model that prefers answers without "I think"   (pairs.jsonl)
#   dpo      open with "Sure!"                                  (dpo_pairs.jsonl: chosen = "Sure! " + rejected)
#   kto      "Cheers!" before the sign-off                      (unpaired.jsonl: thumbs up = it is there)
#   ppo      stop hedging: rollouts scored by the train-rm model (prompts.jsonl)
#   grpo     right answers with the calculator: episodes that may call it, the task's checker of the
#            final answer as reward (grpo_prompts.jsonl); measured against PPO's answers with it offered
# Each stage's greedy answers to held-out prompts are checked by rlkit.demo.task right after it; the
# end is a table of each stage's target before and after it with a 95% interval (report.md, report.png).
# Few steps, short sequences and small batches: it shows the pipeline and measurable changes,
# it is not a recipe. Usage: bash examples/demo.sh [MODEL.gguf] [OUT_DIR]
set -euo pipefail
MODEL=${1:-.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-demo-out}
DATA=$(python -c "from rlkit.demo import DATA_DIR; print(DATA_DIR)")
mkdir -p "$OUT/eval"
: >"$OUT/times.txt"
export TQDM_DISABLE=1  # no library progress bars between rlkit's own lines

STARTED=$SECONDS
record() {  # the running stage's wall time, once (its eval, if any, is recorded on its own)
    if [[ -n ${STAGE_NAME:-} ]]; then echo "$STAGE_NAME $((SECONDS - STAGE_STARTED))" >>"$OUT/times.txt"; fi
    STAGE_NAME=
}
stage() {  # stage N/9 NAME: what -- prints a header and records the previous stage's wall time
    record
    STAGE_NAME=$2 STAGE_STARTED=$SECONDS
    echo "== $1 $2: $3  [$(date +%H:%M:%S), +$((SECONDS - STARTED))s]" >&2
}
quiet() {  # quiet LOG CMD...: run CMD with its stderr in LOG, shown only if it fails
    local log=$1; shift
    "$@" 2>"$log" || { cat "$log" >&2; echo "failed: $* (log: $log)" >&2; return 1; }
}
# Greedy answers to the held-out prompts, short (the answers are under 30 tokens), all 96 in one batch
# (a decoding step of 96 rows costs far less than two of 48: the weights are read once).
EVAL=(--reward rlkit.demo.task:reward --batch-size 96)
HELD_OUT=(--prompts "$DATA/eval_prompts.jsonl" --max-new-tokens 32)
# The calculator offered (rendered into every prompt's system turn), its calls run as they come: an
# episode's budget holds the call, the tool turn and the answer.
CALCULATOR=(--tools rlkit.demo.tools:calculator --max-turns 2)
WITH_TOOLS=(--prompts "$DATA/eval_arithmetic.jsonl" "${CALCULATOR[@]}" --max-new-tokens 64)
evaluate() {  # evaluate NAME [EXTRA...]: the stage's answers and their KL to the start, then its target's change
    # NAME is a stage, or STAGE+tools: that stage's adapter asked with the calculator offered
    local name=$1 began=$SECONDS; shift
    record
    # An adapter's KL is to its base with the adapter off: the starting model.
    quiet "$OUT/eval/$name.log" rlkit eval "$OUT/${name%+tools}" "${EVAL[@]}" "$@" --output-dir "$OUT/eval/$name" >/dev/null
    echo "eval:$name $((SECONDS - began))" >>"$OUT/times.txt"
    echo "   $(python -m rlkit.demo.report "$OUT/eval" --stage "$name")  [eval $((SECONDS - began))s]" >&2
}
# Every trainer: LoRA (the default), short sequences (the demo's answers are under 40 tokens).
COMMON=(--max-length 128 --overwrite)

# transformers dequantizes a .gguf on every load (~20 s here); the demo loads its base a dozen times.
BASE=$MODEL
if [[ $MODEL == *.gguf ]]; then
    stage 0/9 base "dequantize the GGUF once into a float32 transformers dir (each later load ~2 s)"
    BASE=$(quiet "$OUT/base.log" python -m rlkit.demo.dequantize "$MODEL" "$OUT/base" --overwrite)
fi

# smollm2-tools is SmolLM2's own template (its default system prompt) plus tool schemas, calls and tool
# turns: a conversation without tools renders exactly as before, so the stages after SFT see their
# prompts as SmolLM2 was tuned to. The packed rows and the SFT adapter carry it to every later stage.
stage 1/9 pack "tokenize, template and pack the SFT conversations (one shown: trainable tokens green)"
PACKED=$(rlkit pack "$DATA/sft_tools.jsonl" --tokenizer "$BASE" --template smollm2-tools -o "$OUT/packed" \
    --max-length 384 --show 1 --overwrite)

stage 2/9 sft "LoRA fine-tuning on the packed rows: the one-line #done format, and the calculator's call syntax"
# 16 steps of 4 packed rows: one pass over the conversations (the calculator's schemas make them ~25k tokens).
# 13 steps left the hedge in only 10% of the KTO model's answers, and PPO's change in it lost its
# significance (+3 pp [-3, +10]).
SFT=$(rlkit sft "$BASE" "$PACKED" -o "$OUT/sft" --max-length 384 --overwrite \
    --max-steps 16 --batch-size 4 --lr 5e-4 --warmup-steps 2 --log-every 4)
evaluate sft --baseline "$BASE" "${HELD_OUT[@]}"  # the starting model's answers too, same prompts and settings

stage 3/9 train-rm "reward model from the SFT model: answers without a hedge win (held-out accuracy at the end)"
RM=$(rlkit train-rm "$SFT" "$DATA/pairs.jsonl" -o "$OUT/rm" "${COMMON[@]}" \
    --eval-data "$DATA/pairs_eval.jsonl" --max-steps 12 --batch-size 8 --lr 3e-4 --log-every 4)

# --sft-weight (RPO's NLL term on the chosen answers) keeps DPO from unlearning the answers themselves
# while it pushes the rejected ones down: without it, lr 2e-4 gave 'Sure! #done' and repeated sign-offs.
stage 4/9 dpo "continue the SFT adapter on pairs that differ only in a leading 'Sure!'; frozen SFT as reference"
DPO=$(rlkit dpo "$SFT" "$DATA/dpo_pairs.jsonl" -o "$OUT/dpo" "${COMMON[@]}" \
    --max-steps 12 --batch-size 8 --lr 1e-4 --beta 0.1 --sft-weight 1.0 --no-precompute-ref --log-every 4)
evaluate dpo "${HELD_OUT[@]}"

# KTO has no SFT term to carry it: at DPO's lr 1e-4 and beta 0.1 its 12 steps left the closer where it
# was (0 pp); at 5e-4 (16 steps) it learned 'Cheers!' but unlearned #done (Cheers! Cheers! ...). beta 0.5
# saturates its sigmoid after a few nats of log-ratio, so the push stops there.
stage 5/9 kto "continue the DPO adapter on thumbs-up/down answers (up: 'Cheers!' before #done), --ref DPO"
KTO=$(rlkit kto "$DPO" "$DATA/unpaired.jsonl" -o "$OUT/kto" --ref "$DPO" "${COMMON[@]}" \
    --max-steps 12 --batch-size 8 --lr 2e-4 --beta 0.5 --no-precompute-ref --log-every 4)
evaluate kto "${HELD_OUT[@]}"

# The KL penalty holds PPO near the KTO adapter: at lr 1.5e-4 and --kl-coef 0.05 the policy found at step 7
# that the reward model also likes 'Sure! #done' (answers 20 -> 9 tokens, the format 93% -> 54%).
stage 6/9 ppo "continue the KTO adapter with rollouts scored by the reward model, KL to the frozen KTO adapter"
PPO=$(rlkit ppo "$KTO" "$DATA/prompts.jsonl" -o "$OUT/ppo" --reward "$RM" "${COMMON[@]}" \
    --max-steps 8 --batch-size 8 --ppo-epochs 2 --max-new-tokens 24 --lr 1e-4 --kl-coef 0.2 \
    --missing-eos-penalty 1.0 --sample-every 10 --num-samples 2 --log-every 2)
evaluate ppo "${HELD_OUT[@]}"
# where the GRPO stage starts: PPO's answers with the calculator offered (their KL, which the report
# does not show for this row, would take two more forwards over every episode)
evaluate ppo+tools "${WITH_TOOLS[@]}" --no-kl

# The reward (rlkit.demo.task:calculator_reward): 1 for a formatted final answer with the right number
# (the prompt file's `answer` column) after a calculator call, else 0. Paying right answers from memory
# too (answer_reward), GRPO unlearned calling in two steps of a trial: the PPO model answers about a third
# of the sums right on its own, and its calls were followed by unformatted answers or a second call, so
# direct answers won the groups. At T 0.8 the sampled calls copied prose into the expression; at 0.5
# they stay clean.
# Episodes: up to 2 tool rounds within 64 tokens (call, tool turn and answer), --max-length for the
# schema turn. 4 steps: trial runs took right answers from 17-26% to 91-94% in 6 or 8 steps; from the
# measured run's PPO adapter 5 steps gave 91%, and so did 4 (43 of 47), ~33 s sooner. The stage is
# sensitive to its batch: 5 steps of 3 prompts x 8 drew only zero-reward groups first, and calls fell
# from 0.88 to 0.12 per episode.
stage 7/9 grpo "continue the PPO adapter with the calculator: 8 episodes per arithmetic question, rewarded for right answers through it"
GRPO=$(rlkit grpo "$PPO" "$DATA/grpo_prompts.jsonl" -o "$OUT/grpo" --reward rlkit.demo.task:calculator_reward \
    "${CALCULATOR[@]}" --max-length 384 --overwrite --max-steps 4 --batch-size 32 --num-generations 8 \
    --max-new-tokens 64 --temperature 0.5 --lr 3e-4 --sample-every 4 --num-samples 2 --log-every 2)
evaluate grpo "${WITH_TOOLS[@]}"

stage 8/9 chat "a sum through a pipe to the final adapter, the calculator at hand (JSONL out)"
echo "What is 123 + 456?" | rlkit chat "$GRPO" "${CALCULATOR[@]}" --max-new-tokens 64 | tee "$OUT/chat.jsonl"

stage 9/9 report "each stage's target before and after it, with a 95% interval"
record
python -m rlkit.demo.report "$OUT/eval" --md "$OUT/report.md" --png "$OUT/report.png" --times "$OUT/times.txt"
{
    echo
    echo "reward model held-out pair accuracy: $(python -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['eval/accuracy']:.2f}\")" "$RM/final_metrics.json")"
    echo "training curves: $OUT/<stage>/training_curves.png; final adapter: $GRPO (rlkit chat $GRPO)"
    echo "report: $OUT/report.md and $OUT/report.png; every answer: $OUT/eval/<stage>/report.json"
    echo "wall time: $((SECONDS - STARTED))s ($(awk '{printf "%s%s %ss", (NR > 1 ? ", " : ""), $1, $2}' "$OUT/times.txt"))"
} >&2
