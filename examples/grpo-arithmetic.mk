# RL from verifiable rewards: SFT -> GRPO, the reward a program that checks each answer.
#
# Run from the repository root:
#   make -f examples/grpo-arithmetic.mk                      # demo scale: demo model + demo arithmetic prompts, minutes on CPU
#   make -f examples/grpo-arithmetic.mk MODEL=... SFT_DATA=... PROMPTS=... REWARD=my_checker:correct STEPS=0 ...
#   make -f examples/grpo-arithmetic.mk clean                # remove $(OUT)
# Stages are files ($(OUT)/sft/final_metrics.json, $(OUT)/grpo/final_metrics.json), written only
# when a stage is complete, so re-running make skips what is done and redoes what is out of date.
# A different MODEL or new flags do not make a finished stage out of date: use a new OUT (or clean).
#
# The original (DeepSeekMath, Shao et al. 2024, Sec. 4.2 "Training and Evaluating DeepSeekMath-RL"):
#   model     DeepSeekMath-Instruct 7B (itself the SFT stage), full fine-tuning
#   data      GSM8K and MATH chain-of-thought questions (about 144K)
#   grpo      64 samples per question, max length 1024, batch 1024, lr 1e-6, KL coefficient 0.04
#             (k3, in the loss), one update per rollout, outcome supervision: each output's reward,
#             normalised in its group, is every token's advantage
# DeepSeekMath scored outputs with a learned reward model; a checker of the final answer (as
# here) is the verifiable-reward form of DeepSeek-R1-Zero and DAPO.
# The same in rlkit flags (8 GPUs: `accelerate launch --multi_gpu --num_processes 8 -m rlkit ...`;
# 1024 completions = 8 processes x batch 16 x grad-accum 8, i.e. 16 questions x 64 samples):
#   rlkit grpo deepseek-ai/deepseek-math-7b-instruct math-questions.parquet -o runs/grpo --full \
#       --reward my_checker:correct --num-generations 64 --batch-size 16 --grad-accum 8 \
#       --max-new-tokens 1024 --lr 1e-6 --beta 0.04 --loss-type grpo --scale-rewards group \
#       --num-iterations 1 --precision bf16 --gradient-checkpointing
# i.e. with this file (no SFT stage of its own: SFT_OUT names the model GRPO starts from):
#   make -f examples/grpo-arithmetic.mk SFT_OUT=deepseek-ai/deepseek-math-7b-instruct OUT=runs/grpo-math \
#       PROMPTS=math-questions.parquet REWARD=my_checker:correct NUM_GENERATIONS=64 GRPO_BATCH=16 GRPO_GRAD_ACCUM=8 \
#       MAX_NEW_TOKENS=1024 MAX_LENGTH=1536 GRPO_LR=1e-6 BETA=0.04 GRPO_STEPS=0 TRAIN=--full \
#       GRPO_EXTRA="--loss-type grpo --scale-rewards group" EXTRA="--precision bf16 --gradient-checkpointing"
# (GRPO_BATCH counts completions; its default is BATCH prompts x NUM_GENERATIONS.)
#
# Demo scale (the defaults): the demo model; SFT on the demo conversations (they teach the answer
# format), then GRPO on the demo arithmetic prompts, whose `answer` column reaches the checker
# `rlkit.demo.task:arithmetic_reward` as a keyword argument (1 when the completion states the
# true number, else 0); LoRA; 4 prompts x 8 completions per step; a larger learning rate than a
# 7B model would use, so that so few steps move the reward.

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/grpo-arithmetic
SFT_DATA  ?= $(DEMO_DATA)/sft.jsonl
PROMPTS   ?= $(DEMO_DATA)/grpo_prompts.jsonl
# the policy GRPO starts from: the SFT stage's output, or an existing model (skips SFT)
SFT_OUT   ?= $(OUT)/sft
REWARD    ?= rlkit.demo.task:arithmetic_reward
COLUMN_MAP ?=
TEMPLATE  ?=

# Scale. STEPS sets every stage's --max-steps; 0 trains for *_EPOCHS instead.
STEPS           ?=
SFT_STEPS       ?= $(or $(STEPS),8)
GRPO_STEPS      ?= $(or $(STEPS),20)
SFT_EPOCHS      ?= 1
GRPO_EPOCHS     ?= 1
BATCH           ?= 4
SFT_BATCH       ?= $(BATCH)
NUM_GENERATIONS ?= 8
GRPO_BATCH      ?= $(shell echo $$(( $(BATCH) * $(NUM_GENERATIONS) )))
GRAD_ACCUM      ?= 1
SFT_GRAD_ACCUM  ?= $(GRAD_ACCUM)
GRPO_GRAD_ACCUM ?= $(GRAD_ACCUM)
MAX_LENGTH      ?= 256
MAX_NEW_TOKENS  ?= 32
SFT_LR          ?= 3e-4
GRPO_LR         ?= 5e-5
BETA            ?= 0.0
TEMPERATURE     ?= 1.0
TRAIN           ?= --lora
LOG_EVERY       ?= 5
SAMPLE_EVERY    ?= 5
EXTRA           ?=
SFT_EXTRA       ?=
GRPO_EXTRA      ?=

# --max-steps N, or --epochs E when N is 0
steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
COMMON = $(if $(TEMPLATE),--template $(TEMPLATE)) $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) $(TRAIN) \
         --max-length $(MAX_LENGTH) --log-every $(LOG_EVERY) --overwrite $(EXTRA)
# GRPO's prerequisite: the SFT stage when it is this recipe's, else nothing to build
policy_dep = $(if $(filter $(OUT)/sft,$(SFT_OUT)),$(OUT)/sft/final_metrics.json)

.PHONY: all clean
all: $(OUT)/grpo/final_metrics.json

# 1. SFT on the demo conversations (the answer format), LoRA
$(OUT)/sft/final_metrics.json: $(wildcard $(SFT_DATA))
	$(RLKIT) sft $(MODEL) $(SFT_DATA) -o $(@D) $(COMMON) \
	    $(call steps,$(SFT_STEPS),$(SFT_EPOCHS)) --batch-size $(SFT_BATCH) --grad-accum $(SFT_GRAD_ACCUM) \
	    --lr $(SFT_LR) $(SFT_EXTRA)

# 2. GRPO from the SFT model: NUM_GENERATIONS completions per prompt, scored by the checker
$(OUT)/grpo/final_metrics.json: $(policy_dep) $(wildcard $(PROMPTS))
	$(RLKIT) grpo $(SFT_OUT) $(PROMPTS) -o $(@D) $(COMMON) --reward $(REWARD) \
	    --num-generations $(NUM_GENERATIONS) --batch-size $(GRPO_BATCH) --grad-accum $(GRPO_GRAD_ACCUM) \
	    --max-new-tokens $(MAX_NEW_TOKENS) --temperature $(TEMPERATURE) --beta $(BETA) \
	    $(call steps,$(GRPO_STEPS),$(GRPO_EPOCHS)) --lr $(GRPO_LR) --sample-every $(SAMPLE_EVERY) $(GRPO_EXTRA)
	@echo "grpo-arithmetic: $(@D)  final metrics: $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
