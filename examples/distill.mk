# On-policy distillation: the demo's final adapter (teacher) into a fresh LoRA on the base model
# (student), then which of the teacher's targets the student recovered on the held-out prompts.
#
# Run from the repository root, after `make demo` (its demo-out/grpo is the default teacher):
#   make -f examples/distill.mk                              # demo scale: minutes on CPU
#   make -f examples/distill.mk TEACHER=runs/grpo MODEL=... PROMPTS="a.jsonl b.jsonl" STEPS=200 BETA=1
#   make -f examples/distill.mk clean                        # remove $(OUT)
# Stages are files ($(OUT)/student/final_metrics.json, $(OUT)/eval/*/report.json,
# $(OUT)/transfer.md), written only when a stage is complete, so re-running make skips what is done.
#
# The original (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models", Sec. 4): a
# T5 student trained on its own samples against a larger T5 teacher's token distributions, with
# the generalized JSD (beta 0.1-0.9 best per task) and a mixture of on-policy and dataset outputs
# (lambda, 1 = fully on-policy best in most tasks). TRL's DistillationTrainer defaults: beta 1.0
# (reverse KL), always on-policy, temperature 1, top-p 0.95. The same in rlkit flags:
#   rlkit distill STUDENT prompts.jsonl --teacher TEACHER -o runs/student --beta 1.0 --lmbda 1.0 \
#       --temperature 1.0 --top-p 0.95 --max-new-tokens 512 --lr 1e-5
#
# Demo scale (the defaults): the teacher is the demo's last stage (format, opener, closer, no
# hedge and right answers with the calculator, each taught by one stage; the student is asked
# without tools, so `right answer` shows what it keeps without one); the student a fresh LoRA on the same base; the
# prompts the demo's training prompts (chat and arithmetic, none of the held-out ones); JSD at
# beta 0.5; the student's and the teacher's answers to the 96 held-out prompts, checked by the
# demo's task, make the table (rlkit.demo.transfer).

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

# the student's base: the demo's dequantized base when there is one, else the .gguf
MODEL     ?= $(if $(wildcard demo-out/base/config.json),demo-out/base,$(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf)
TEACHER   ?= demo-out/grpo
OUT       ?= runs/distill
# the prompts the student samples on: the `prompt` column of every file, in one file
PROMPT_FILES ?= $(DEMO_DATA)/prompts.jsonl $(DEMO_DATA)/grpo_prompts.jsonl
PROMPTS   ?= $(OUT)/data/prompts.jsonl
HELD_OUT  ?= $(DEMO_DATA)/eval_prompts.jsonl
CHECKER   ?= rlkit.demo.task:reward

# Scale. STEPS sets --max-steps (0: --epochs passes over the prompts).
STEPS          ?= 60
EPOCHS         ?= 1
BATCH          ?= 8
GRAD_ACCUM     ?= 1
MAX_LENGTH     ?= 128
MAX_NEW_TOKENS ?= 32
LR             ?= 5e-4
BETA           ?= 0.5
LMBDA          ?= 1.0
TEMPERATURE    ?= 1.0
TRAIN          ?= --lora
LOG_EVERY      ?= 5
SAMPLE_EVERY   ?= 10
EVAL_BATCH     ?= 48
EXTRA          ?=

steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
EVAL = --prompts $(HELD_OUT) --reward $(CHECKER) --max-new-tokens $(MAX_NEW_TOKENS) --batch-size $(EVAL_BATCH)

.PHONY: all clean
all: $(OUT)/transfer.md

# 0. the prompts of every file in one (the chat prompts and the arithmetic ones have other columns)
$(OUT)/data/prompts.jsonl: $(PROMPT_FILES)
	mkdir -p $(@D) && $(PYTHON) -c 'import json, sys; [print(json.dumps({"prompt": json.loads(line)["prompt"]})) for path in sys.argv[1:] for line in open(path) if line.strip()]' $(PROMPT_FILES) > $@.tmp && mv $@.tmp $@

# 1. the student samples, the teacher grades every token (generalized JSD over the whole vocabulary)
$(OUT)/student/final_metrics.json: $(PROMPTS)
	$(RLKIT) distill $(MODEL) $(PROMPTS) --teacher $(TEACHER) -o $(@D) $(TRAIN) --overwrite \
	    --max-length $(MAX_LENGTH) --max-new-tokens $(MAX_NEW_TOKENS) --batch-size $(BATCH) --grad-accum $(GRAD_ACCUM) \
	    $(call steps,$(STEPS),$(EPOCHS)) --lr $(LR) --beta $(BETA) --lmbda $(LMBDA) --temperature $(TEMPERATURE) \
	    --log-every $(LOG_EVERY) --sample-every $(SAMPLE_EVERY) $(EXTRA)

# 2. the teacher's greedy answers to the held-out prompts, and the base model's beside them
$(OUT)/eval/teacher/report.json:
	$(RLKIT) eval $(TEACHER) $(EVAL) --baseline $(MODEL) --output-dir $(@D)

# 3. the student's, same prompts and settings
$(OUT)/eval/student/report.json: $(OUT)/student/final_metrics.json
	$(RLKIT) eval $(OUT)/student $(EVAL) --output-dir $(@D)

# 4. each target in the base's, the teacher's and the student's answers; the student's change, 95% interval
$(OUT)/transfer.md: $(OUT)/eval/teacher/report.json $(OUT)/eval/student/report.json
	$(PYTHON) -m rlkit.demo.transfer $(OUT)/eval --md $@
	@echo "distill: $(OUT)/student  transfer: $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
