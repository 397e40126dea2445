# Tulu 2.5 DPO: full-weight DPO of an SFT model on UltraFeedback pairs, Tulu chat template.
#
# Run from the repository root:
#   make -f examples/tulu-2.5-dpo.mk                         # demo scale: demo model + demo pairs, minutes on CPU
#   make -f examples/tulu-2.5-dpo.mk MODEL=allenai/tulu-2-13b DATA=ultrafeedback.jsonl STEPS=0 LR=5e-7
#   make -f examples/tulu-2.5-dpo.mk clean                   # remove $(OUT)
# The stage is a file ($(OUT)/dpo/final_metrics.json), written only when the run is complete,
# so re-running make skips it once done. A different MODEL or new flags do not make it out of
# date: use a new OUT (or clean).
#
# The original (Ivison et al. 2024, "Unpacking DPO and PPO", the Tulu 2.5 suite; the same DPO
# hyper-parameters as Tulu 2 DPO, trained with EasyLM on TPU pods):
#   model     allenai/tulu-2-13b (the Tulu 2 SFT model), full fine-tuning; it is also the reference
#   data      UltraFeedback pairs (allenai/tulu-2.5-preference-data, or HuggingFaceH4/ultrafeedback_binarized
#             train_prefs: prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected;
#             chosen and rejected are whole conversations [{role: user}, {role: assistant}])
#   template  "<|user|>\n{prompt}\n<|assistant|>\n{answer}</s>"
#   dpo       beta 0.1, lr 5e-7, global batch 32, linear schedule with warmup ratio 0.1, 3 epochs,
#             Adam (0.9, 0.999, 1e-8), no weight decay
# The same in rlkit flags (one device, batch 8 x grad-accum 4 = 32; with N processes divide
# --grad-accum by N: `accelerate launch --config_file examples/accelerate/<zero3|fsdp>.yaml -m rlkit dpo ...`):
#   rlkit dpo allenai/tulu-2-13b HuggingFaceH4/ultrafeedback_binarized:train_prefs -o runs/tulu-2.5-dpo --full --template tulu \
#       --beta 0.1 --lr 5e-7 --batch-size 8 --grad-accum 4 --scheduler linear --warmup-ratio 0.1 \
#       --epochs 3 --adam-beta1 0.9 --adam-beta2 0.999 --adam-epsilon 1e-8 --max-length 2048 \
#       --gradient-checkpointing --precision bf16
# i.e. with this file:
#   make -f examples/tulu-2.5-dpo.mk MODEL=allenai/tulu-2-13b DATA=HuggingFaceH4/ultrafeedback_binarized:train_prefs \
#       EVAL_DATA=HuggingFaceH4/ultrafeedback_binarized:test_prefs \
#       STEPS=0 LR=5e-7 MAX_LENGTH=2048 EXTRA="--gradient-checkpointing --precision bf16" OUT=runs/tulu-2.5-dpo
# (NAME:SPLIT picks a split; a dataset name alone means its 'train' split.)
# The message-list layout needs no --columns: rlkit takes the prompt from the shared first turn.
#
# Demo scale (the defaults): the demo model, the demo pairs rewritten in the ultrafeedback_binarized
# layout (held-out pairs for the implicit-reward accuracy), 256 tokens, the published batch (8 x 4),
# schedule, warmup, beta and Adam settings, but 6 steps instead of 3 epochs and lr 2e-5 instead
# of 5e-7, so that a few minutes on a CPU move the rewards visibly.

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/tulu-2.5-dpo
DATA      ?= $(OUT)/data/ultrafeedback.jsonl
EVAL_DATA ?= $(OUT)/data/ultrafeedback-eval.jsonl
COLUMN_MAP ?=
TEMPLATE  ?= tulu

# Scale. STEPS sets --max-steps; 0 trains for EPOCHS instead (the published 3).
STEPS      ?= 6
EPOCHS     ?= 3
BATCH      ?= 8
GRAD_ACCUM ?= 4
MAX_LENGTH ?= 256
LR         ?= 2e-5
BETA       ?= 0.1
TRAIN      ?= --full
LOG_EVERY  ?= 1
EXTRA      ?=

# --max-steps N, or --epochs E when N is 0
steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
# a data prerequisite: the files this recipe writes, or an existing file/dir (not a dataset name)
dep = $(if $(filter $(OUT)/data/%,$(1)),$(1),$(wildcard $(1)))

.PHONY: all data clean
all: $(OUT)/dpo/final_metrics.json

data: $(call dep,$(DATA)) $(call dep,$(EVAL_DATA))

$(OUT)/data/ultrafeedback.jsonl: $(DEMO_DATA)/pairs.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py ultrafeedback $< $@

$(OUT)/data/ultrafeedback-eval.jsonl: $(DEMO_DATA)/pairs_eval.jsonl $(ROOT)/examples/data_layouts.py
	$(PYTHON) $(ROOT)/examples/data_layouts.py ultrafeedback $< $@

# DPO; the reference is MODEL as it starts (a frozen copy, its log-probs precomputed once)
$(OUT)/dpo/final_metrics.json: $(call dep,$(DATA)) $(call dep,$(EVAL_DATA))
	$(RLKIT) dpo $(MODEL) $(DATA) -o $(@D) $(TRAIN) $(if $(TEMPLATE),--template $(TEMPLATE)) \
	    $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) \
	    --beta $(BETA) --lr $(LR) --batch-size $(BATCH) --grad-accum $(GRAD_ACCUM) \
	    --scheduler linear --warmup-ratio 0.1 $(call steps,$(STEPS),$(EPOCHS)) \
	    --adam-beta1 0.9 --adam-beta2 0.999 --adam-epsilon 1e-8 --max-length $(MAX_LENGTH) \
	    --log-every $(LOG_EVERY) --overwrite $(EXTRA)
	@echo "tulu-2.5-dpo: $(@D)  final metrics: $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
