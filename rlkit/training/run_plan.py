"""The run plan: which models a training run holds, each decided once, by its recipe.

Every training command has one plan function, `config -> RunPlan`, beside its setup code
(`sft_plan` in rlkit.recipes.sft, `dpo_plan`, `kto_plan`, `reward_model_plan`, `ppo_plan` in
rlkit.recipes.ppo.plan, `grpo_plan` in rlkit.recipes.grpo_plan). The recipe computes its plan
first and reads its decisions from it while it sets up (is there a reference, which value
function trains, does dropout stay on); `--dry-run` shows the memory arithmetic of the very same
record (rlkit.training.memory_plan) and stops. Why: when the plan was re-derived from the
command name in a second place, changing a recipe silently left its `--dry-run` describing
another run.

The record says what is trained (the policy, a reward model, a critic, a value head; LoRA or
full), what is frozen (the reference and how it is had, reward models, a distillation teacher
in its own precision), what generates and how many rows per `generate` call, and the
micro-batch one training forward sees. A new recipe (e.g. `distill`: the student trained and
generating, the teacher frozen, scoring every token with a no-grad forward) is one more plan
function; the arithmetic needs no change. Torch-free: it is only data.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

#: How a run has its reference: `--ref` as a second model; the base under a fresh LoRA adapter
#: with the adapter switched off; a frozen copy of the starting model (full fine-tuning, on the
#: fly); its log-probs computed before training (no model while training); or none at all.
ReferenceKind = Literal["second model", "adapter disabled", "frozen copy", "precomputed", "none"]

#: A frozen model's dtype: None is the run's own for frozen weights (bf16 under a bf16 LoRA run,
#: else fp32, as `TrainingRun.weights_dtype`); a teacher may keep its own.
Dtype = Literal["fp32", "bf16", "fp16"] | None


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter on a trained model: rank, target layers, dropout on its path."""

    r: int
    targets: str
    dropout: float


@dataclass(frozen=True)
class Trained:
    """A model the run trains with AdamW.

    `source` None is a head on the first trained model's trunk (PPO's value head: hidden-size
    parameters). `classifier`: a one-score sequence classifier (no log-prob head). `dropout`:
    whether the model's dropout stays on while training (the recipe calls `disable_dropout`
    otherwise). `nf4`: the frozen base held in 4 bits (--load-in-4bit)."""

    role: str  # "policy", "reward model", "critic", "value head", "student"
    source: str | None
    lora: Lora | None = None
    classifier: bool = False
    dropout: bool = True
    nf4: bool = False
    label: str = ""  # its row in --dry-run's table (default: the role)

    @property
    def name(self) -> str:
        return self.label or self.role


@dataclass(frozen=True)
class Frozen:
    """A model held frozen while training: no gradients, no optimizer state.

    `sharded`: divided over the processes like the trained weights under FSDP (a reference is;
    a reward model scores on every process whole)."""

    role: str  # "reference", "reward model", "teacher"
    source: str
    classifier: bool = False
    dtype: Dtype = None
    sharded: bool = False
    label: str = ""
    note: str = ""

    @property
    def name(self) -> str:
        return self.label or self.role


@dataclass(frozen=True)
class ReferencePlan:
    """The run's reference and how it is had; `why` says why there is none (kind "none")."""

    kind: ReferenceKind
    source: str = ""  # --ref, or MODEL as it starts
    why: str = ""

    @property
    def present(self) -> bool:
        return self.kind != "none"

    @property
    def held(self) -> Frozen | None:
        """The frozen model training holds for it: `--ref`'s, or the starting model's copy; else none."""
        if self.kind == "second model":
            return Frozen(
                "reference", self.source, sharded=True, label="reference (--ref)", note="frozen, no gradients"
            )
        if self.kind == "frozen copy":
            return Frozen(
                "reference",
                self.source,
                dtype="fp32",
                sharded=True,
                label="reference (frozen copy)",
                note="frozen copy of the starting model",
            )
        return None


@dataclass(frozen=True)
class MicroBatch:
    """What one training forward sees: `examples` rows of `length` tokens, each `sides` sequences
    (2 for a pair's chosen and rejected, one forward over both)."""

    examples: int
    length: int
    sides: int = 1

    @property
    def rows(self) -> int:
        return self.examples * self.sides

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class Generation:
    """Sampling: `rows` per `generate` call of up to `length` tokens (prompt + completion), by the
    trained model of role `by`."""

    rows: int
    length: int
    by: str = "policy"


@dataclass(frozen=True)
class NoGradForward:
    """A forward without gradient over the micro-batch beside the trained one (KTO's mismatched
    completions; a teacher's scores), by the model of role `by`."""

    label: str
    by: str = "policy"


@dataclass(frozen=True)
class RunPlan:
    """What a run of `command` holds; `trained[0]` is the model it writes."""

    command: str
    trained: tuple[Trained, ...]
    micro_batch: MicroBatch
    reference: ReferencePlan | None = None  # None: the recipe has no reference at all (sft, train-rm)
    frozen: tuple[Frozen, ...] = ()  # held besides the reference: reward models, a teacher
    generation: Generation | None = None
    no_grad_forwards: tuple[NoGradForward, ...] = ()

    @property
    def main(self) -> Trained:
        return self.trained[0]

    @property
    def has_reference(self) -> bool:
        return self.reference is not None and self.reference.present

    @property
    def value_function(self) -> Trained | None:
        """The trained critic or value head, if the run has one (PPO's; GRPO's runs without)."""
        return next((t for t in self.trained if t.role in ("critic", "value head")), None)

    @property
    def held_frozen(self) -> tuple[Frozen, ...]:
        """Every frozen model in memory while training, the reference's first."""
        held = self.reference.held if self.reference is not None else None
        return ((held,) if held is not None else ()) + self.frozen

    def model(self, role: str) -> Trained | Frozen:
        """The trained or frozen model of `role` (the first of them)."""
        for model in (*self.trained, *self.held_frozen):
            if model.role == role:
                return model
        raise KeyError(f"{self.command}'s plan has no {role}")


# ---- what the plan functions share -----------------------------------------------------------


class ModelOptions(Protocol):
    """What the plan functions read of every training config (rlkit.training.options.TrainConfig)."""

    model: str | None
    lora: bool
    lora_r: int
    lora_targets: str
    lora_dropout: float
    load_in_4bit: bool


def trained_policy(config: ModelOptions, dropout: bool, role: str = "policy", classifier: bool = False) -> Trained:
    """MODEL, trained with LoRA (`--lora`, its base in 4 bits under --load-in-4bit) or in full."""
    lora = Lora(config.lora_r, config.lora_targets, config.lora_dropout) if config.lora else None
    nf4 = bool(config.load_in_4bit and lora)
    return Trained(role, config.model or "", lora=lora, classifier=classifier, dropout=dropout, nf4=nf4)


def reference_of(config: ModelOptions, ref: str | None, precomputed: bool) -> ReferencePlan:
    """How the reference is had (rlkit.preference.reference chooses the same way): its log-probs
    precomputed, `--ref` as a second model (unless it names MODEL under LoRA: the base is it), the
    base with a LoRA adapter disabled, or a frozen copy of the start under full fine-tuning."""
    start = config.model or ""
    if precomputed:
        return ReferencePlan("precomputed", ref or start)
    if ref and not (config.lora and ref == start):
        return ReferencePlan("second model", ref)
    return ReferencePlan("adapter disabled" if config.lora else "frozen copy", start)


def reward_models(specs: list[str]) -> tuple[Frozen, ...]:
    """The reward model dirs among the rewards (a `module:function` reward holds no model)."""
    from rlkit.scoring import is_model_dir

    return tuple(
        Frozen("reward model", spec, classifier=True, label=f"reward model {Path(spec).name}", note="frozen scorer")
        for spec in specs
        if spec and is_model_dir(spec)
    )


def plan_of(command: str, config: object) -> RunPlan:
    """The plan of `command` under `config`, from its recipe's plan function, which the command's
    module (rlkit.commands) names as `PLAN`, for callers that hold only a command name."""
    module_name = f"rlkit.commands.{command.replace('-', '_')}"
    try:
        named = importlib.import_module(module_name).PLAN
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(f"no run plan for {command}: there is no {module_name}") from None
    except AttributeError:
        raise ValueError(f"no run plan for {command}: {module_name} names no PLAN") from None
    target, _, name = named.partition(":")
    return getattr(importlib.import_module(target), name)(config)
