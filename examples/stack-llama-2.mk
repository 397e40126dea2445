# Stack-Llama-2: SFT -> DPO, the SFT model being the DPO reference.
#
# Run from the repository root:
#   make -f examples/stack-llama-2.mk                        # demo scale: demo model + demo pairs, a few minutes on CPU
#   make -f examples/stack-llama-2.mk MODEL=meta-llama/Llama-2-7b-hf DATA=se-paired.parquet STEPS=0 ...
#   make -f examples/stack-llama-2.mk clean                  # remove $(OUT)
# Stages are files ($(OUT)/sft/final_metrics.json, $(OUT)/dpo/final_metrics.json), written only
# when a stage is complete, so re-running make skips what is done and redoes what is out of date.
# A different MODEL or new flags do not make a finished stage out of date: use a new OUT (or clean).
#
# The original (TRL's examples/research_projects/stack_llama_2, "Fine-tune Llama 2 with DPO", 2023):
#   model     meta-llama/Llama-2-7b-hf, 4-bit QLoRA, LoRA r 8, alpha 16, dropout 0.05, bf16,
#             gradient checkpointing, paged AdamW; one GPU (an A100-class card)
#   data      lvwerra/stack-exchange-paired (columns qid, question, date, metadata, response_j,
#             response_k; response_j is the better answer), template "Question: ...\n\nAnswer: ..."
#   sft       split data/finetune, response_j only, packed rows of 1024 tokens, 500 steps,
#             batch 4 x grad-accum 2, lr 1e-4 cosine, 100 warmup steps, weight decay 0.05
#   dpo       split data/rl, the merged SFT model as policy start and as reference, beta 0.1,
#             lr 5e-4 cosine, 100 warmup steps, weight decay 0.05, batch 4 x grad-accum 4,
#             1000 steps, max length 1024 (prompt 512)
# The same in rlkit flags (one GPU; `accelerate launch -m rlkit ...` for several):
#   rlkit sft meta-llama/Llama-2-7b-hf se-finetune.parquet -o runs/sft --template stack-exchange \
#       --columns prompt=question,chosen=response_j,rejected=response_k --max-length 1024 \
#       --max-steps 500 --batch-size 4 --grad-accum 2 --lr 1e-4 --scheduler cosine --warmup-steps 100 \
#       --weight-decay 0.05 --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --lora-targets q_proj,v_proj \
#       --gradient-checkpointing --precision bf16
#   rlkit dpo runs/sft se-rl.parquet -o runs/dpo --template stack-exchange \
#       --columns prompt=question,chosen=response_j,rejected=response_k --beta 0.1 --max-length 1024 \
#       --max-steps 1000 --batch-size 4 --grad-accum 4 --lr 5e-4 --scheduler cosine --warmup-steps 100 \
#       --weight-decay 0.05 --gradient-checkpointing --precision bf16
# i.e. with this file:
#   make -f examples/stack-llama-2.mk MODEL=meta-llama/Llama-2-7b-hf SFT_DATA=se-finetune.parquet \
#       PAIRS=se-rl.parquet EVAL_DATA=se-eval.parquet MAX_LENGTH=1024 SFT_STEPS=500 DPO_STEPS=1000 \
#       BATCH=4 SFT_GRAD_ACCUM=2 DPO_GRAD_ACCUM=4 SFT_LR=1e-4 DPO_LR=5e-4 SCHEDULER=cosine \
#       WARMUP="--warmup-steps 100" EXTRA="--weight-decay 0.05 --gradient-checkpointing --precision bf16" \
#       LORA="--lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --lora-targets q_proj,v_proj" OUT=runs/stack-llama-2
# Differences: rlkit has no 4-bit loading (the LoRA base stays in --precision), and DPO continues
# the SFT adapter (reference: that adapter, frozen) instead of a fresh adapter on the merged SFT
# model; both make the SFT model the reference. The dataset needs its splits as files, since a
# dataset name is read as its 'train' split.
#
# Demo scale (the defaults): the demo model, the demo pairs rewritten in the stack-exchange-paired
# layout (so the column mapping really runs), 256-token rows, 8 SFT steps of 4 rows (one epoch)
# and 20 DPO steps of 4 pairs, and larger learning rates than the original (3e-4 and 5e-5, so
# that so few steps move the loss and the held-out DPO accuracy).

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/stack-llama-2
DATA      ?= $(OUT)/data/stack-exchange-paired.jsonl
SFT_DATA  ?= $(DATA)
PAIRS     ?= $(DATA)
EVAL_DATA ?= $(OUT)/data/stack-exchange-paired-eval.jsonl
# COLUMN_MAP= (empty) for data already in a standard layout (prompt/chosen/rejected, ...)
COLUMN_MAP ?= prompt=question,chosen=response_j,rejected=response_k
TEMPLATE  ?= stack-exchange

# Scale. STEPS sets every stage's --max-steps; 0 trains for *_EPOCHS instead.
STEPS          ?=
SFT_STEPS      ?= $(or $(STEPS),8)
DPO_STEPS      ?= $(or $(STEPS),20)
SFT_EPOCHS     ?= 1
DPO_EPOCHS     ?= 1
BATCH          ?= 4
SFT_BATCH      ?= $(BATCH)
DPO_BATCH      ?= $(BATCH)
GRAD_ACCUM     ?= 1
SFT_GRAD_ACCUM ?= $(GRAD_ACCUM)
DPO_GRAD_ACCUM ?= $(GRAD_ACCUM)
MAX_LENGTH     ?= 256
SFT_LR         ?= 3e-4
DPO_LR         ?= 5e-5
BETA           ?= 0.1
SCHEDULER      ?= cosine
WARMUP         ?= --warmup-ratio 0.1
LORA           ?= --lora-r 8 --lora-alpha 16 --lora-dropout 0.05
LOG_EVERY      ?= 5
EXTRA          ?=
SFT_EXTRA      ?=
DPO_EXTRA      ?=

# --max-steps N, or --epochs E when N is 0
steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
# a data prerequisite: the files this recipe writes, or an existing file/dir (not a dataset name)
dep = $(if $(filter $(OUT)/data/%,$(1)),$(1),$(wildcard $(1)))
COMMON = $(if $(TEMPLATE),--template $(TEMPLATE)) $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) \
         --max-length $(MAX_LENGTH) --scheduler $(SCHEDULER) $(WARMUP) --log-every $(LOG_EVERY) --overwrite $(EXTRA)

.PHONY: all data clean
all: $(OUT)/dpo/final_metrics.json

data: $(call dep,$(SFT_DATA)) $(call dep,$(PAIRS)) $(call dep,$(EVAL_DATA))

$(OUT)/data/stack-exchange-paired.jsonl: $(DEMO_DATA)/pairs.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py stack-exchange $< $@

$(OUT)/data/stack-exchange-paired-eval.jsonl: $(DEMO_DATA)/pairs_eval.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py stack-exchange $< $@

# 1. SFT on question + better answer (the chosen side of each pair), packed, LoRA
$(OUT)/sft/final_metrics.json: $(call dep,$(SFT_DATA))
	$(RLKIT) sft $(MODEL) $(SFT_DATA) -o $(@D) $(COMMON) --packing $(LORA) \
	    $(call steps,$(SFT_STEPS),$(SFT_EPOCHS)) --batch-size $(SFT_BATCH) --grad-accum $(SFT_GRAD_ACCUM) \
	    --lr $(SFT_LR) $(SFT_EXTRA)

# 2. DPO continuing the SFT adapter; the reference is the SFT model (that adapter, frozen)
$(OUT)/dpo/final_metrics.json: $(OUT)/sft/final_metrics.json $(call dep,$(PAIRS)) $(call dep,$(EVAL_DATA))
	$(RLKIT) dpo $(OUT)/sft $(PAIRS) -o $(@D) $(COMMON) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) \
	    --beta $(BETA) $(call steps,$(DPO_STEPS),$(DPO_EPOCHS)) --batch-size $(DPO_BATCH) \
	    --grad-accum $(DPO_GRAD_ACCUM) --lr $(DPO_LR) $(DPO_EXTRA)
	@echo "stack-llama-2: $(@D)  final metrics: $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
