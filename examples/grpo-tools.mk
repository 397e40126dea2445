# Agents: SFT -> GRPO with a tool, the reward a program that checks each final answer; then the
# trained policy answers with the same tool, greedily, scored by the same checker.
#
# Run from the repository root:
#   make -f examples/grpo-tools.mk                           # demo scale: demo model + demo arithmetic prompts, minutes on CPU
#   make -f examples/grpo-tools.mk MODEL=... PROMPTS=... TOOLS="my_tools:search my_tools:fetch" REWARD=my_checker:correct ...
#   make -f examples/grpo-tools.mk clean                     # remove $(OUT)
# Stages are files ($(OUT)/sft/final_metrics.json, $(OUT)/grpo/final_metrics.json,
# $(OUT)/eval/report.json), written only when a stage is complete, so re-running make skips what
# is done and redoes what is out of date. A different MODEL or new flags do not make a finished
# stage out of date: use a new OUT (or clean).
#
# The original is TRL's tool-calling GRPO (TRL 1.16): a typed, documented Python function passed as
# a tool, shown to the model through the chat template's tools=, its calls run during generation
# and their results appended as tool turns (masked out of the loss), for at most
# max_tool_calling_iterations rounds within max_completion_length tokens:
#   from datasets import load_dataset
#   from peft import LoraConfig
#   from trl import GRPOConfig, GRPOTrainer
#   from rlkit.demo.task import arithmetic_reward
#   from rlkit.demo.tools import calculator
#   trainer = GRPOTrainer(
#       model="runs/grpo-tools/sft",
#       reward_funcs=arithmetic_reward,
#       train_dataset=load_dataset("json", data_files="rlkit/demo/data/grpo_prompts.jsonl", split="train"),
#       tools=[calculator],
#       args=GRPOConfig(num_generations=8, per_device_train_batch_size=32, max_completion_length=96,
#                       max_tool_calling_iterations=2, temperature=1.0, beta=0.0, learning_rate=5e-5, max_steps=20),
#       peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
#   )
# The same in rlkit flags (a template that renders tool turns: chatml-tools, for any ChatML model):
#   rlkit grpo runs/grpo-tools/sft rlkit/demo/data/grpo_prompts.jsonl -o runs/grpo-tools/grpo --lora \
#       --template chatml-tools --tools rlkit.demo.tools:calculator --max-turns 2 \
#       --reward rlkit.demo.task:arithmetic_reward --num-generations 8 --batch-size 32 \
#       --max-new-tokens 96 --temperature 1.0 --beta 0.0 --lr 5e-5 --max-steps 20
# (rlkit also stops a tool call after --tool-timeout seconds, 30 by default; TRL has no limit.)
#
# Demo scale (the defaults): the demo model; SFT on the demo conversations with the calculator
# (sft_tools.jsonl: the answer format, the tool offered in half the rows and called in half the
# arithmetic answers that offer it, so the model knows the call syntax), then GRPO on the demo arithmetic prompts with the demo's calculator
# (`rlkit.demo.tools:calculator`: + - * / through ast, never eval()) as a tool; the prompts'
# `answer` column reaches the checker `rlkit.demo.task:arithmetic_reward` (1 when the completion,
# tool turns included, states the true number last, else 0). --max-new-tokens is the budget of
# the whole episode (the model's turns and the tool turns). Then `rlkit eval --tools` answers
# EVAL_PROMPTS (by default the first EVAL_LIMIT training prompts; give held-out prompts with an
# `answer` column to measure generalisation) and reports the score and the tool calls per episode.
# The same policy talks with its tool in `rlkit chat $(OUT)/grpo --tools rlkit.demo.tools:calculator`.

ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
PYTHON    ?= python3
RLKIT     ?= rlkit
DEMO_DATA ?= $(ROOT)/rlkit/demo/data

MODEL     ?= $(ROOT)/.cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
OUT       ?= runs/grpo-tools
SFT_DATA  ?= $(DEMO_DATA)/sft_tools.jsonl
PROMPTS   ?= $(DEMO_DATA)/grpo_prompts.jsonl
EVAL_PROMPTS ?= $(PROMPTS)
# the policy GRPO starts from: the SFT stage's output, or an existing model (skips SFT)
SFT_OUT   ?= $(OUT)/sft
REWARD    ?= rlkit.demo.task:arithmetic_reward
# module:function, space-separated: each one a --tools
TOOLS     ?= rlkit.demo.tools:calculator
TEMPLATE  ?= chatml-tools
COLUMN_MAP ?=

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
# the tools' schemas sit in every prompt's system turn: the prompts are longer than grpo-arithmetic's
MAX_LENGTH      ?= 400
MAX_NEW_TOKENS  ?= 96
MAX_TURNS       ?= 2
TOOL_TIMEOUT    ?= 30
SFT_LR          ?= 3e-4
GRPO_LR         ?= 5e-5
BETA            ?= 0.0
TEMPERATURE     ?= 1.0
TRAIN           ?= --lora
LOG_EVERY       ?= 5
SAMPLE_EVERY    ?= 5
EVAL_LIMIT      ?= 48
EVAL_BATCH      ?= 16
EXTRA           ?=
SFT_EXTRA       ?=
GRPO_EXTRA      ?=

# --max-steps N, or --epochs E when N is 0
steps = $(if $(filter-out 0,$(1)),--max-steps $(1),--epochs $(2))
COMMON = --template $(TEMPLATE) $(if $(COLUMN_MAP),--columns $(COLUMN_MAP)) $(TRAIN) \
         --max-length $(MAX_LENGTH) --log-every $(LOG_EVERY) --overwrite $(EXTRA)
AGENT  = $(foreach tool,$(TOOLS),--tools $(tool)) --max-turns $(MAX_TURNS) --tool-timeout $(TOOL_TIMEOUT) \
         --max-new-tokens $(MAX_NEW_TOKENS)
# GRPO's prerequisite: the SFT stage when it is this recipe's, else nothing to build
policy_dep = $(if $(filter $(OUT)/sft,$(SFT_OUT)),$(OUT)/sft/final_metrics.json)

.PHONY: all clean
all: $(OUT)/eval/report.json

# 1. SFT on the demo conversations with tool calls (the answer and call formats), LoRA; OUT's tokenizer carries the template
$(OUT)/sft/final_metrics.json: $(wildcard $(SFT_DATA))
	$(RLKIT) sft $(MODEL) $(SFT_DATA) -o $(@D) $(COMMON) \
	    $(call steps,$(SFT_STEPS),$(SFT_EPOCHS)) --batch-size $(SFT_BATCH) --grad-accum $(SFT_GRAD_ACCUM) \
	    --lr $(SFT_LR) $(SFT_EXTRA)

# 2. GRPO from the SFT model: NUM_GENERATIONS episodes per prompt, each calling the tools for up to
#    MAX_TURNS rounds, scored by the checker on the whole transcript
$(OUT)/grpo/final_metrics.json: $(policy_dep) $(wildcard $(PROMPTS))
	$(RLKIT) grpo $(SFT_OUT) $(PROMPTS) -o $(@D) $(COMMON) $(AGENT) --reward $(REWARD) \
	    --num-generations $(NUM_GENERATIONS) --batch-size $(GRPO_BATCH) --grad-accum $(GRPO_GRAD_ACCUM) \
	    --temperature $(TEMPERATURE) --beta $(BETA) \
	    $(call steps,$(GRPO_STEPS),$(GRPO_EPOCHS)) --lr $(GRPO_LR) --sample-every $(SAMPLE_EVERY) $(GRPO_EXTRA)
	@echo "grpo-tools: $(@D)  final metrics: $@" >&2

# 3. The trained policy with the same tools, greedy: score and tool calls per episode
$(OUT)/eval/report.json: $(OUT)/grpo/final_metrics.json $(wildcard $(EVAL_PROMPTS))
	$(RLKIT) eval $(OUT)/grpo --prompts $(EVAL_PROMPTS) --reward $(REWARD) --template $(TEMPLATE) $(AGENT) \
	    --limit $(EVAL_LIMIT) --batch-size $(EVAL_BATCH) --output-dir $(@D)
	@echo "grpo-tools: score and tool metrics in $@" >&2

clean:
	$(if $(filter-out / . ..,$(OUT)),rm -rf $(OUT))
