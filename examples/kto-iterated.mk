# Iterated KTO: three rounds of KTO, each round's model the next round's reference.
#
# Run from the repository root:
#   make -f examples/kto-iterated.mk                     # demo scale: demo model + demo pairs, a few minutes on CPU
#   make -f examples/kto-iterated.mk MODEL=... DATA_1=... DATA_2=... DATA_3=... STEPS=0 OUT=...
#   make -f examples/kto-iterated.mk clean               # remove $(OUT)
# Stages are files ($(OUT)/kto-N/final_metrics.json), written only when a round is complete, so
# re-running make skips finished rounds. A changed MODEL or flag does not make a finished round
# out of date: use a new OUT (or clean).
#
# The original (Contextual AI, Contextual_KTO_Mistral_PairRM, March 2024; #2 on AlpacaEval 2.0):
#   model     mistralai/Mistral-7B-Instruct-v0.2 (no SFT stage: KTO starts from the instruct model)
#   data      snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset: UltraFeedback prompts in three
#             partitions (train_iteration_1/2/3), each with a chosen and a rejected response
#             ranked by PairRM; KTO splits each pair into one desirable and one undesirable example
#   rounds    3, one epoch of one partition each; round k's reference is round k-1's model
#             (round 1's is the starting model); Tulu-2 template (<|user|> / <|assistant|>)
#   trainer   ContextualAI/HALOs; the model card gives no hyper-parameters, so the KTO paper's
#             defaults stand here: beta 0.1, desirable/undesirable weights 1 (pairs give n_D = n_U)
# The same in rlkit flags (full fine-tuning of a 7B model: several GPUs with
# `accelerate launch --config_file examples/accelerate/fsdp.yaml -m rlkit kto ...`):
#   rlkit kto mistralai/Mistral-7B-Instruct-v0.2 snorkel-iter1.parquet -o runs/kto-1 --full --template tulu --epochs 1
#   rlkit kto runs/kto-1 snorkel-iter2.parquet -o runs/kto-2 --ref runs/kto-1 --full --template tulu --epochs 1
#   rlkit kto runs/kto-2 snorkel-iter3.parquet -o runs/kto-3 --ref runs/kto-2 --full --template tulu --epochs 1
# i.e. with this file (the three splits saved as files first; a dataset name reads its 'train' split):
#   make -f examples/kto-iterated.mk MODEL=mistralai/Mistral-7B-Instruct-v0.2 DATA_1=snorkel-iter1.parquet \
#       DATA_2=snorkel-iter2.parquet DATA_3=snorkel-iter3.parquet STEPS=0 EPOCHS=1 TRAIN=--full \
#       MAX_LENGTH=2048 BATCH=8 GRAD_ACCUM=4 LR=5e-7 OUT=runs/kto-iterated
#
# Demo scale (the defaults): the demo model; the demo pairs rewritten in the Snorkel/UltraFeedback
# layout (whole conversations as message lists) and cut into three partitions of 100 pairs, one
# per round; LoRA (round 1 makes the adapter, rounds 2 and 3 continue it, each against the
# previous round's adapter frozen); a larger learning rate than a 7B full fine-tune would use.

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/kto-iterated
DATA      ?= $(OUT)/data/snorkel-pairs.jsonl
DATA_1    ?= $(if $(filter $(OUT)/data/snorkel-pairs.jsonl,$(DATA)),$(OUT)/data/snorkel-iter1.jsonl,$(DATA))
DATA_2    ?= $(if $(filter $(OUT)/data/snorkel-pairs.jsonl,$(DATA)),$(OUT)/data/snorkel-iter2.jsonl,$(DATA))
DATA_3    ?= $(if $(filter $(OUT)/data/snorkel-pairs.jsonl,$(DATA)),$(OUT)/data/snorkel-iter3.jsonl,$(DATA))
EVAL_DATA ?= $(OUT)/data/snorkel-pairs-eval.jsonl
COLUMN_MAP ?=
TEMPLATE  ?= tulu

# Scale. STEPS sets each round's --max-steps; 0 trains each round for EPOCHS instead.
STEPS      ?= 12
EPOCHS     ?= 1
BATCH      ?= 8
GRAD_ACCUM ?= 1
MAX_LENGTH ?= 256
LR         ?= 5e-5
BETA       ?= 0.1
DESIRABLE_WEIGHT   ?= 1.0
UNDESIRABLE_WEIGHT ?= 1.0
TRAIN      ?= --lora
LOG_EVERY  ?= 4
EXTRA      ?=

steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
dep = $(if $(filter $(OUT)/data/%,$(1)),$(1),$(wildcard $(1)))
KTO = $(RLKIT) kto $(1) $(2) -o $(3) $(if $(4),--ref $(4)) $(TRAIN) $(if $(TEMPLATE),--template $(TEMPLATE)) \
      $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) \
      --beta $(BETA) --desirable-weight $(DESIRABLE_WEIGHT) --undesirable-weight $(UNDESIRABLE_WEIGHT) \
      --lr $(LR) --batch-size $(BATCH) --grad-accum $(GRAD_ACCUM) $(call steps,$(STEPS),$(EPOCHS)) \
      --max-length $(MAX_LENGTH) --log-every $(LOG_EVERY) --overwrite $(EXTRA)

.PHONY: all data clean
all: $(OUT)/kto-3/final_metrics.json

data: $(call dep,$(DATA_1)) $(call dep,$(DATA_2)) $(call dep,$(DATA_3)) $(call dep,$(EVAL_DATA))

$(OUT)/data/snorkel-pairs.jsonl: $(DEMO_DATA)/pairs.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py ultrafeedback $< $@

$(OUT)/data/snorkel-pairs-eval.jsonl: $(DEMO_DATA)/pairs_eval.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py ultrafeedback $< $@

# three partitions, as the original's train_iteration_1/2/3: every third pair
$(OUT)/data/snorkel-iter%.jsonl: $(OUT)/data/snorkel-pairs.jsonl
	awk 'NR % 3 == $* % 3' $< > $@.tmp && mv $@.tmp $@

# Round 1: from MODEL; the reference is MODEL as it starts (with LoRA, the base with the adapter off)
$(OUT)/kto-1/final_metrics.json: $(call dep,$(DATA_1)) $(call dep,$(EVAL_DATA))
	$(call KTO,$(MODEL),$(DATA_1),$(@D),)

# Rounds 2 and 3: from the previous round's output, which is also the reference
$(OUT)/kto-2/final_metrics.json: $(OUT)/kto-1/final_metrics.json $(call dep,$(DATA_2))
	$(call KTO,$(OUT)/kto-1,$(DATA_2),$(@D),$(OUT)/kto-1)

$(OUT)/kto-3/final_metrics.json: $(OUT)/kto-2/final_metrics.json $(call dep,$(DATA_3))
	$(call KTO,$(OUT)/kto-2,$(DATA_3),$(@D),$(OUT)/kto-2)
	@echo "kto-iterated: $(@D)  final metrics: $@ (rounds: $(OUT)/kto-1 $(OUT)/kto-2 $(@D))" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
