# StackLLaMA: packed SFT -> reward model on (question, better answer, worse answer) -> PPO with a
# per-token KL penalty against the SFT model, LoRA policy throughout.
#
# Run from the repository root:
#   make -f examples/stack-llama.mk                          # demo scale: demo model + demo data, minutes on CPU
#   make -f examples/stack-llama.mk MODEL=huggyllama/llama-7b SFT_DATA=se-finetune.parquet ...
#   make -f examples/stack-llama.mk clean                    # remove $(OUT)
# Stages are files ($(OUT)/packed/rlkit_pack.json, then $(OUT)/{sft,rm,ppo}/final_metrics.json),
# written only when a stage is complete, so re-running make skips what is done and redoes what
# is out of date. A different MODEL or new flags do not make a finished stage out of date: use a
# new OUT (or clean).
#
# The original (TRL's examples/research_projects/stack_llama, "StackLLaMA" blog post, 2023):
#   model     huggyllama/llama-7b, 8-bit base + LoRA (r 16, alpha 32, dropout 0.05), bf16;
#             trained on A100 80GB GPUs with DDP (torchrun, 8 processes in the scripts' README)
#   data      lvwerra/stack-exchange-paired: qid, question, date, metadata, response_j (better),
#             response_k (worse); splits data/finetune, data/reward, data/rl, data/evaluation;
#             template "Question: {question}\n\nAnswer: {answer}"
#   sft       data/finetune, question + response_j, packed rows of 1024 tokens, 10000 steps,
#             batch 4, lr 1e-4 cosine, 100 warmup steps, weight decay 0.05
#   rm        on the merged SFT model, data/reward (100k pairs), LoRA r 8, alpha 32, dropout 0.1,
#             1 epoch, batch 4, lr 2e-5 linear, weight decay 0.001, max length 512;
#             ~67% accuracy on held-out pairs
#   ppo       policy and reference: the merged SFT model, a LoRA adapter trained on top;
#             data/rl questions, responses of up to 128 new tokens (sampling, top-p 1.0),
#             batch 8 x grad-accum 8, 4 PPO epochs, lr 1.4e-5, adaptive KL (init 0.2, target 6,
#             horizon 10000), reward = the RM's score
# The same in rlkit flags (8 GPUs: `accelerate launch --multi_gpu --num_processes 8 -m rlkit ...`):
#   COLS=prompt=question,chosen=response_j,rejected=response_k
#   rlkit pack se-finetune.parquet --tokenizer huggyllama/llama-7b -o runs/packed --kind sft \
#       --template stack-exchange --columns $COLS --max-length 1024
#   rlkit sft huggyllama/llama-7b runs/packed -o runs/sft --max-steps 10000 --batch-size 4 \
#       --lr 1e-4 --scheduler cosine --warmup-steps 100 --weight-decay 0.05 \
#       --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --precision bf16
#   rlkit train-rm runs/sft se-reward.parquet -o runs/rm --template stack-exchange --columns $COLS \
#       --eval-data se-evaluation.parquet --max-length 512 --epochs 1 --batch-size 4 --lr 2e-5 \
#       --scheduler linear --weight-decay 0.001 --lora-r 8 --lora-alpha 32 --lora-dropout 0.1 --precision bf16
#   rlkit ppo runs/sft se-rl.parquet -o runs/ppo --reward runs/rm --template stack-exchange \
#       --columns prompt=question --batch-size 8 --grad-accum 8 --ppo-epochs 4 --max-new-tokens 128 \
#       --max-length 640 --sample-every 10 \
#       --lr 1.4e-5 --kl-coef 0.2 --target-kl 6 --kl-horizon 10000 --precision bf16 --save-every 100
# i.e. with this file:
#   make -f examples/stack-llama.mk MODEL=huggyllama/llama-7b SFT_DATA=se-finetune.parquet \
#       PAIRS=se-reward.parquet EVAL_DATA=se-evaluation.parquet PROMPTS=se-rl.parquet \
#       SFT_MAX_LENGTH=1024 RM_MAX_LENGTH=512 PPO_MAX_LENGTH=640 SAMPLE_EVERY=10 SFT_STEPS=10000 RM_STEPS=0 PPO_STEPS=0 \
#       SFT_BATCH=4 RM_BATCH=4 PPO_BATCH=8 PPO_GRAD_ACCUM=8 SFT_LR=1e-4 RM_LR=2e-5 PPO_LR=1.4e-5 \
#       SFT_EXTRA="--warmup-steps 100 --weight-decay 0.05" RM_EXTRA="--weight-decay 0.001" \
#       MAX_NEW_TOKENS=128 PPO_EXTRA="--save-every 100" EXTRA="--precision bf16" OUT=runs/stack-llama
# Differences: rlkit has no 8-bit loading (the base stays in --precision); the RM and PPO start
# from the SFT adapter dir (train-rm merges it into its base first; ppo continues it, and the
# reference is that adapter frozen) instead of from a separately merged copy; TRL sampled each
# response length in [32, 128] while rlkit samples up to --max-new-tokens and stops at EOS. The
# dataset needs its splits as files, since a dataset name is read as its 'train' split.
#
# Demo scale (the defaults): the demo model; the demo pairs rewritten in the stack-exchange-paired
# layout (SFT and RM data, held-out pairs for RM accuracy) and the demo prompts as its questions
# (PPO), so every column mapping really runs; 256-token rows, 4 SFT steps of 8 rows (one epoch), 12 RM steps
# of 8 pairs, 3 PPO steps of 8 prompts with up to 32 new tokens, and larger learning rates than
# the original (3e-4 SFT, 1e-4 RM) so that so few steps show something.

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/stack-llama
DATA      ?= $(OUT)/data/stack-exchange-paired.jsonl
SFT_DATA  ?= $(DATA)
PAIRS     ?= $(DATA)
EVAL_DATA ?= $(OUT)/data/stack-exchange-paired-eval.jsonl
PROMPTS   ?= $(OUT)/data/stack-exchange-questions.jsonl
# COLUMN_MAP= (empty) for data already in a standard layout (prompt/chosen/rejected, ...)
COLUMN_MAP ?= prompt=question,chosen=response_j,rejected=response_k
PROMPT_COLUMNS ?= prompt=question
TEMPLATE  ?= stack-exchange

# Scale. STEPS sets every stage's --max-steps (PPO: PPO steps); 0 trains for *_EPOCHS instead.
STEPS          ?=
SFT_STEPS      ?= $(or $(STEPS),4)
RM_STEPS       ?= $(or $(STEPS),12)
PPO_STEPS      ?= $(or $(STEPS),3)
SFT_EPOCHS     ?= 1
RM_EPOCHS      ?= 1
PPO_EPOCHS     ?= 1
BATCH          ?= 8
SFT_BATCH      ?= $(BATCH)
RM_BATCH       ?= $(BATCH)
PPO_BATCH      ?= $(BATCH)
GRAD_ACCUM     ?= 1
SFT_GRAD_ACCUM ?= $(GRAD_ACCUM)
RM_GRAD_ACCUM  ?= $(GRAD_ACCUM)
PPO_GRAD_ACCUM ?= $(GRAD_ACCUM)
MAX_LENGTH     ?= 256
SFT_MAX_LENGTH ?= $(MAX_LENGTH)
RM_MAX_LENGTH  ?= $(MAX_LENGTH)
PPO_MAX_LENGTH ?= $(MAX_LENGTH)
MAX_NEW_TOKENS ?= 32
SFT_LR         ?= 3e-4
RM_LR          ?= 1e-4
PPO_LR         ?= 1.4e-5
PPO_EPOCHS_PER_ROLLOUT ?= 4
KL_COEF        ?= 0.2
TARGET_KL      ?= 6
SAMPLE_EVERY   ?= 1
SFT_LORA       ?= --lora-r 16 --lora-alpha 32 --lora-dropout 0.05
RM_LORA        ?= --lora-r 8 --lora-alpha 32 --lora-dropout 0.1
LOG_EVERY      ?= 5
EXTRA          ?=
SFT_EXTRA      ?=
RM_EXTRA       ?=
PPO_EXTRA      ?=

# --max-steps N, or --epochs E when N is 0
steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
# a data prerequisite: the files this recipe writes, or an existing file/dir (not a dataset name)
dep = $(if $(filter $(OUT)/data/%,$(1)),$(1),$(wildcard $(1)))
TEMPLATE_FLAG = $(if $(TEMPLATE),--template $(TEMPLATE))
COMMON = --log-every $(LOG_EVERY) --overwrite $(EXTRA)

.PHONY: all data clean
all: $(OUT)/ppo/final_metrics.json

data: $(call dep,$(SFT_DATA)) $(call dep,$(PAIRS)) $(call dep,$(EVAL_DATA)) $(call dep,$(PROMPTS))

$(OUT)/data/stack-exchange-paired.jsonl: $(DEMO_DATA)/pairs.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py stack-exchange $< $@

$(OUT)/data/stack-exchange-paired-eval.jsonl: $(DEMO_DATA)/pairs_eval.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py stack-exchange $< $@

$(OUT)/data/stack-exchange-questions.jsonl: $(DEMO_DATA)/prompts.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py questions $< $@

# 1a. Tokenize question + better answer with the Question:/Answer: template and pack the rows
$(OUT)/packed/rlkit_pack.json: $(call dep,$(SFT_DATA))
	$(RLKIT) pack $(SFT_DATA) --tokenizer $(MODEL) -o $(@D) --kind sft --packing $(TEMPLATE_FLAG) \
	    $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) --max-length $(SFT_MAX_LENGTH) --overwrite

# 1b. LoRA SFT on the packed rows (the template travels with them into the adapter's tokenizer)
$(OUT)/sft/final_metrics.json: $(OUT)/packed/rlkit_pack.json
	$(RLKIT) sft $(MODEL) $(OUT)/packed -o $(@D) $(COMMON) $(SFT_LORA) --max-length $(SFT_MAX_LENGTH) \
	    $(call steps,$(SFT_STEPS),$(SFT_EPOCHS)) --batch-size $(SFT_BATCH) --grad-accum $(SFT_GRAD_ACCUM) \
	    --lr $(SFT_LR) --scheduler cosine --warmup-ratio 0.1 $(SFT_EXTRA)

# 2. Reward model from the SFT model (adapter merged into its base first), held-out accuracy
$(OUT)/rm/final_metrics.json: $(OUT)/sft/final_metrics.json $(call dep,$(PAIRS)) $(call dep,$(EVAL_DATA))
	$(RLKIT) train-rm $(OUT)/sft $(PAIRS) -o $(@D) $(COMMON) $(TEMPLATE_FLAG) $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) \
	    $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) $(RM_LORA) --max-length $(RM_MAX_LENGTH) \
	    $(call steps,$(RM_STEPS),$(RM_EPOCHS)) --batch-size $(RM_BATCH) --grad-accum $(RM_GRAD_ACCUM) \
	    --lr $(RM_LR) --scheduler linear $(RM_EXTRA)

# 3. PPO: the SFT adapter is the policy (continued) and, frozen, the KL reference; the RM scores
$(OUT)/ppo/final_metrics.json: $(OUT)/sft/final_metrics.json $(OUT)/rm/final_metrics.json $(call dep,$(PROMPTS))
	$(RLKIT) ppo $(OUT)/sft $(PROMPTS) -o $(@D) --reward $(OUT)/rm $(COMMON) $(TEMPLATE_FLAG) \
	    $(if $(PROMPT_COLUMNS),--columns $(PROMPT_COLUMNS)) --max-length $(PPO_MAX_LENGTH) \
	    --max-new-tokens $(MAX_NEW_TOKENS) $(call steps,$(PPO_STEPS),$(PPO_EPOCHS)) --batch-size $(PPO_BATCH) \
	    --grad-accum $(PPO_GRAD_ACCUM) --ppo-epochs $(PPO_EPOCHS_PER_ROLLOUT) --lr $(PPO_LR) \
	    --kl-coef $(KL_COEF) $(if $(TARGET_KL),--target-kl $(TARGET_KL)) --sample-every $(SAMPLE_EVERY) $(PPO_EXTRA)
	@echo "stack-llama: $(@D)  final metrics: $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
