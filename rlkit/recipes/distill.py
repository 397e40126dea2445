"""On-policy distillation (GKD): the student samples, the teacher grades every token, the student moves
toward the teacher's next-token distribution where the student actually goes.

One distillation step = one rollout of the global batch (batch-size x grad-accum x processes
completions), then one optimizer update on it. With probability --lmbda a step is on-policy: the
student samples its completions through the rollout's sampling stage (`rlkit.training.rollout`:
merged-LoRA generation, the shared-prompt prefill with --num-generations > 1, seeded per chunk so
two processes sample what one does and a resumed run what the uninterrupted one did); otherwise
the step trains on the data's own completions (GKD's mixture of on- and off-policy data).

The loss is the generalized Jensen-Shannon divergence between the teacher's and the student's
next-token distributions at the sampling temperature, at every response token the student
produced (`rlkit.losses.distill`): over the whole vocabulary, a chunk of positions at a time for
both models, so no [batch, length, vocab] logits exist. Both models' final hidden states are taken
by standing in for their output layers during their own forwards (`output_layer_swapped`), so DDP
and FSDP see ordinary forwards, and the student's divergence is computed inside its forward.

The teacher is frozen, in its own precision (--teacher-precision), sharded over processes like a
frozen reference under --fsdp, and must share the student's tokenizer and output size.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import set_seed

from rlkit.agents.setup import Agents
from rlkit.console import info
from rlkit.data.formats import Messages, as_messages
from rlkit.data.prepare import tokenizer_fingerprint
from rlkit.data.prompts import PromptRows, rollout_prompts
from rlkit.data.templates import ChatTemplate, render_segments
from rlkit.errors import InputError
from rlkit.losses.distill import distill_loss
from rlkit.models.load import (
    ModelSource,
    adapter_config,
    base_of,
    is_reward_model,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from rlkit.models.modes import adapter_frozen_in_use, disable_dropout, load_frozen_adapter
from rlkit.preference.reference import same_weights, sharded_like_policy
from rlkit.recipes.distill_config import DistillConfig
from rlkit.tools.generation import left_pad
from rlkit.training.engine import StepOutput
from rlkit.training.episodes import EpisodeSamples, episode_metrics, sample_episodes
from rlkit.training.fast_sampling import column_major_frozen_linears
from rlkit.training.logprobs import output_layer_swapped, prompt_cached_inputs, response_logprobs
from rlkit.training.rollout import (
    Rollout,
    RolloutForward,
    RolloutInputs,
    RolloutSampling,
    Samples,
    check_rollout_layout,
    first_eos_mask,
    prompt_indices,
    prompts_per_rollout,
    sample,
)
from rlkit.training.rollout_steps import RolloutSteps
from rlkit.training.run import TrainingRun, stop_for_dry_run
from rlkit.training.run_plan import Frozen, Generation, MicroBatch, NoGradForward, RunPlan, trained_policy
from rlkit.training.samples import SAMPLES_FILE

# ---- the two models' forwards --------------------------------------------------------------------


class _HiddenHead(torch.nn.Module):
    """Stands in for an output layer during one forward: the hidden states themselves, [B, K, H]."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def teacher_states(teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, R, H2]: the teacher's final hidden states that predict the R tokens ending every row (no
    gradient). A teacher whose output layer is not a plain Linear (logit soft-capping, scaling)
    gives its logits [B, R, V] instead, and `TeacherHead` passes them through."""
    with torch.no_grad(), teacher.in_use() as model:
        inputs = prompt_cached_inputs(model, input_ids, attention_mask, width)  # shared prompt tokens once
        with output_layer_swapped(model, lambda head: _HiddenHead()) as fused:
            out = model(**inputs, logits_to_keep=width + 1)
        states = out.logits[:, :-1]
        return states if fused else states.float()


class TeacherHead(torch.nn.Module):
    """The teacher's output layer, frozen: its own, or a full copy of it when the teacher is sharded
    (FSDP holds a shard of the head on each process; the divergence needs all of it). Identity for a
    teacher without a plain Linear head, whose `teacher_states` are already logits."""

    def __init__(self, head: torch.nn.Linear | None):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.head is None else self.head(hidden)


class _DivergenceHead(torch.nn.Module):
    """Stands in for the student's output layer during one forward with `logits_to_keep = R + 1`:
    [B, R+1, H] -> [1, 1, 4], (Σ divergence, agreements, Σ student entropy, Σ teacher entropy) over
    the masked response tokens, the first with gradient through this head and the hidden states."""

    def __init__(self, head: torch.nn.Module, teacher: torch.Tensor, teacher_head: TeacherHead, mask: torch.Tensor, beta: float, temperature: float, chunk: int):  # fmt: skip
        super().__init__()
        self.head, self.teacher, self.teacher_head, self.mask = head, teacher, teacher_head, mask
        self.beta, self.temperature, self.chunk = beta, temperature, chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        terms = distill_loss(
            hidden[:, :-1],
            self.teacher,
            self.head,
            self.teacher_head,
            self.mask,
            self.beta,
            self.temperature,
            self.chunk,
        )
        parts = (terms.divergence_sum, terms.agreement_sum, terms.student_entropy_sum, terms.teacher_entropy_sum)
        return torch.stack([p.float() for p in parts]).view(1, 1, 4)


class DistillStudent(torch.nn.Module):
    """The trained module: the student (`.policy`, what the rollout samples from). Its forward is
    the divergence of the micro-batch, computed inside the policy's own forward so DDP and FSDP
    see one: (Σ divergence, agreements, Σ student entropy, Σ teacher entropy) [4]."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        width: int,
        teacher: torch.Tensor,
        teacher_head: TeacherHead,
        mask: torch.Tensor,
        beta: float,
        temperature: float,
        chunk: int,
    ) -> torch.Tensor:
        def make_head(head: torch.nn.Module) -> torch.nn.Module:
            return _DivergenceHead(head, teacher, teacher_head, mask, beta, temperature, chunk)

        inputs = prompt_cached_inputs(self.policy, input_ids, attention_mask, width)  # shared prompt tokens once
        with output_layer_swapped(self.policy, make_head) as fused:
            out = self.policy(**inputs, logits_to_keep=width + 1)
        if fused:
            return out.logits.view(4)
        # an output layer that post-processes its logits: they are the states, the head is the identity
        logits = out.logits[:, :-1].float()
        terms = distill_loss(logits, teacher, _HiddenHead(), teacher_head, mask, beta, temperature, chunk)
        parts = (terms.divergence_sum, terms.agreement_sum, terms.student_entropy_sum, terms.teacher_entropy_sum)
        return torch.stack([p.float() for p in parts])

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        self.policy.save_pretrained(directory, **kwargs)


class DistillObjective:
    """The divergence of one micro-batch as a sum over its response tokens (the engine divides by the
    tokens of the whole update: a token mean, TRL's `num_items_in_batch`), with its metrics."""

    def __init__(self, config: DistillConfig, teacher: Teacher, teacher_head: TeacherHead):
        self.c, self.teacher, self.teacher_head = config, teacher, teacher_head

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["response_mask"].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        c = self.c
        ids, mask, mask_r = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        width = batch["responses"].shape[1]
        teacher = teacher_states(self.teacher, ids, mask, width)
        terms = model(ids, mask, width, teacher, self.teacher_head, mask_r, c.beta, c.temperature, c.loss_chunk)
        tokens = mask_r.sum().float()
        metrics = {
            "divergence": terms[0].detach(),
            "teacher_agreement": terms[1].detach(),
            "student_entropy": terms[2].detach(),
            "teacher_entropy": terms[3].detach(),
        }
        return StepOutput(loss=terms[0], metrics=metrics, counts=dict.fromkeys(metrics, tokens))

    def take_means(self) -> dict[str, float]:
        """Nothing kept per step: the engine logs every update's metrics itself."""
        return {}


# ---- the rollout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillRollout(Rollout):
    """A distillation step's rollout: no reward and no advantages; `on_policy` whether the student
    sampled it; `shown_logprobs` the student's and the teacher's summed log-probs of the rows the
    samples table shows (empty on steps that show none)."""

    on_policy: bool = True
    shown_logprobs: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())


def reply_ids(tokenizer: Any, template: ChatTemplate, prompt: Messages, reply: Messages, limit: int) -> list[int]:
    """The token ids of a record's own completion as the template renders its assistant turns (EOS
    included), at most `limit` of them."""
    segments = render_segments(tokenizer, template, prompt + reply)
    text = "".join(piece for piece, trainable in segments if trainable)
    return tokenizer(text, add_special_tokens=False).input_ids[:limit]


def recorded_replies(config: DistillConfig, tokenizer: Any, template: ChatTemplate, prompts: PromptRows) -> list[list[int]]:  # fmt: skip
    """Every prompt's own completion ids (off-policy steps); one line naming the first record without one."""
    where = ", ".join(config.data)
    replies = []
    for i, (conversation, columns) in enumerate(zip(prompts.conversations, prompts.columns)):
        reply = prompts.replies[i] if prompts.replies else []
        if not reply and columns.get("completion") not in (None, "", []):
            reply = as_messages(columns["completion"], "assistant", f"{where}: prompt {i + 1}'s `completion`")
        if not reply:
            raise InputError(
                f"{where}: prompt {i + 1} has no completion (a `completion` column or a final assistant turn of "
                f"`messages`), which --lmbda {config.lmbda} needs for its off-policy steps; give --lmbda 1 or add them"
            )
        replies.append(reply_ids(tokenizer, template, conversation, reply, config.max_new_tokens))
    return replies


def recorded_samples(inputs: RolloutInputs, indices: list[int], replies: list[list[int]]) -> Samples:
    """The data's own completions of `indices` as a `Samples` (off-policy steps): right-padded, the
    mask over each completion's tokens."""
    tok, device, t0 = inputs.tokenizer, inputs.accelerator.device, time.time()
    query_ids, query_mask = left_pad([inputs.prompt_ids[i] for i in indices], tok.pad_token_id)
    ids = [replies[i] for i in indices]
    width = max(len(r) for r in ids)
    responses = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids], dtype=torch.long)
    response_mask = (torch.arange(width).unsqueeze(0) < torch.tensor([len(r) for r in ids]).unsqueeze(1)).long()
    _, has_eos = first_eos_mask(responses, tok.eos_token_id)
    texts = [tok.decode([t for t in r if t != tok.eos_token_id], skip_special_tokens=True).strip() for r in ids]
    return Samples(
        indices,
        [inputs.prompts.conversations[i] for i in indices],
        query_ids.to(device),
        query_mask.to(device),
        responses.to(device),
        response_mask.to(device),
        has_eos.to(device),
        ids,
        texts,
        time.time() - t0,
    )


class Distillation:
    """Distillation's `rlkit.training.rollout_steps.OnPolicyAlgorithm`: one rollout per step, sampled by
    the student (on-policy) or the data's own completions (off-policy)."""

    name = "distill"

    def __init__(
        self,
        config: DistillConfig,
        inputs: RolloutInputs,
        teacher: Teacher,
        replies: list[list[int]] | None,
        generation_rows: int,
        agents: Agents | None = None,
    ):
        """`generation_rows`: the rows per `generate` call, as the run's plan has them; `agents` the
        tools and environment of multi-turn episodes (--tools / --env), None for single turns."""
        c = config
        self.c, self.inputs, self.teacher, self.replies, self.agents = config, inputs, teacher, replies, agents
        acc = inputs.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.rollout_size = c.batch_size * c.grad_accum
        self.sampling = RolloutSampling(
            c.max_new_tokens,
            c.temperature,
            c.top_p,
            c.top_k or None,
            chunk=generation_rows,
            shared_prompts=c.num_generations > 1,
            seed=self.sample_seed,
            fast_warpers=True,  # transformers' warpers with numpy's sort (rlkit.training.fast_sampling)
        )

    def sample_seed(self, rl_step: int, start: int) -> int:
        """Chunk k of step s (in global order) is sampled from a generator seeded by (seed, s, k)."""
        chunk = (self.rank * self.rollout_size + start) // self.sampling.chunk
        return self.c.seed * 1_000_003 + rl_step * 10_007 + chunk

    def on_policy(self, rl_step: int) -> bool:
        """Whether step `rl_step` samples from the student: with probability --lmbda, drawn from the
        step's own seed, so every process and a resumed run draw the same."""
        lmbda = self.c.lmbda
        return lmbda >= 1.0 or (lmbda > 0.0 and random.Random(self.c.seed * 7_919 + rl_step).random() < lmbda)

    def collect(self, rl_step: int, wrapper: torch.nn.Module) -> Rollout:
        c, inputs = self.c, self.inputs
        # 1. this process's prompts of the step (each --num-generations times in a row)
        n = len(inputs.prompts.conversations)
        indices = prompt_indices(n, rl_step, c.seed, self.rollout_size, c.num_generations, self.rank, self.world)
        # 2. the completions: the student samples them (on-policy) or the data's own (off-policy)
        on_policy = self.on_policy(rl_step)
        if on_policy and self.agents is not None:  # episodes: tool turns appended with mask 0
            samples = sample_episodes(inputs, wrapper, indices, rl_step, self.sampling, self.agents)
        elif on_policy:
            samples = sample(inputs, wrapper, indices, rl_step, self.sampling)
        else:
            assert self.replies is not None
            samples = recorded_samples(inputs, indices, self.replies)
        # 3. the rows the samples table shows: the student's and the teacher's log-prob of each
        #    (the teacher grades every token in the update itself, with the divergence)
        t0 = time.time()
        shown = self.shown_logprobs(rl_step, wrapper, samples)
        forward = RolloutForward(None, None, None, None, time.time() - t0)
        return DistillRollout(samples, forward, None, None, 0.0, on_policy, shown)

    def shown_logprobs(
        self, rl_step: int, wrapper: torch.nn.Module, samples: Samples
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        c, acc = self.c, self.inputs.accelerator
        if not c.sample_every or rl_step % c.sample_every != 0:
            return (), ()
        rows = slice(0, c.num_samples)
        ids, mask, responses = samples.input_ids[rows], samples.attention_mask[rows], samples.responses[rows]
        kept = samples.response_mask[rows].bool()

        def summed(model: torch.nn.Module) -> tuple[float, ...]:
            with acc.autocast():
                logps = response_logprobs(model, ids, mask, responses, c.temperature, want_entropy=False)[0]
            return tuple(torch.where(kept, logps.float(), 0).sum(1).tolist())

        student = summed(wrapper.policy)
        with self.teacher.in_use() as teacher:
            return student, summed(teacher)

    def summary(self, rollout: Rollout) -> dict[str, float]:
        inputs, s = self.inputs, rollout.samples
        assert isinstance(rollout, DistillRollout)
        lengths = inputs.gather(s.response_mask.sum(1).float())
        tools = {}
        if self.agents is not None:  # every process takes this branch alike (the step's kind is shared)
            episodes = s if isinstance(s, EpisodeSamples) else None
            tools = episode_metrics(inputs, episodes, self.agents.tool_names) if episodes is not None else {}
        return {
            **tools,
            "on_policy": float(rollout.on_policy),
            "completion_length/mean": float(lengths.mean()),
            "completion_length/min": float(lengths.min()),
            "completion_length/max": float(lengths.max()),
            "frac_truncated": float(inputs.gather((~s.has_eos).float()).mean()),
            "response_tokens": float(s.response_mask.sum()),
            "time/generation_s": s.generation_s,
            "time/rollout_s": rollout.rollout_s,
            "generation_tokens_per_s": float(lengths.sum()) / max(s.generation_s, 1e-9),
        }

    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        assert isinstance(rollout, DistillRollout)
        s = rollout.samples
        student, teacher = rollout.shown_logprobs
        return [
            {
                "prompt": s.conversations[i][-1]["content"],
                "completion": s.completions[i],
                "student_logp": student[i],
                "teacher_logp": teacher[i],
            }  # fmt: skip
            for i in range(len(student))
        ]

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float, training_s: float) -> str:
        """The rollout's side of the step (the engine's progress line shows the loss, the divergence)."""
        nan = float("nan")
        return (
            f"distill step {rl_step + 1} ({'on' if metrics.get('on_policy', 1.0) else 'off'}-policy): "
            f"len {metrics.get('completion_length/mean', nan):.1f}  truncated {metrics.get('frac_truncated', nan):.2f}  "
            f"gen {generation_s:.1f}s train {training_s:.1f}s"
        )


# ---- the teacher -------------------------------------------------------------------------------------


def _vocabulary_size(source: ModelSource, trust_remote_code: bool) -> int:
    from rlkit.training.memory_plan import read_shape

    return read_shape(source.name, trust_remote_code).vocab


def check_teacher(config: DistillConfig, student: ModelSource, tokenizer: Any) -> ModelSource:
    """The teacher's source, refused in one line (before any weights load) when it is a reward model,
    has another tokenizer or another output size than the student."""
    assert config.teacher is not None
    source = resolve_source(config.teacher)
    if is_reward_model(source):
        raise InputError(
            f"--teacher {config.teacher} is a reward model (a sequence classifier); the teacher must be a causal LM"
        )
    if tokenizer_fingerprint(load_tokenizer(source, config.trust_remote_code)) != tokenizer_fingerprint(tokenizer):
        raise InputError(
            f"--teacher {config.teacher}: its tokenizer differs from {config.model}'s; distillation compares "
            "next-token distributions, so teacher and student must share one tokenizer"
        )
    teacher_vocab = _vocabulary_size(source, config.trust_remote_code)
    student_vocab = _vocabulary_size(student, config.trust_remote_code)
    if teacher_vocab != student_vocab:
        raise InputError(
            f"--teacher {config.teacher} predicts {teacher_vocab} tokens and {config.model} {student_vocab}; "
            "the distributions must be over the same vocabulary"
        )
    return source


TEACHER_ADAPTER = "teacher"


class Teacher(Protocol):
    def in_use(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The module whose forward is the teacher's, for the duration of the block (no gradients)."""


class SeparateTeacher:
    """A teacher model of its own, frozen."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextlib.contextmanager
    def in_use(self) -> Iterator[torch.nn.Module]:
        yield self.model


class TeacherOnStudentBase:
    """A teacher run on the student's own copy of the base weights: the base itself with the student's
    adapter switched off (`adapter_dir` None), or the teacher's LoRA adapter loaded frozen beside the
    student's and switched to. One copy of the base instead of two: 0.54 GB of fp32 SmolLM2-135M."""

    def __init__(self, policy: torch.nn.Module, adapter_dir: str | None):
        self.policy = policy
        self.adapter = TEACHER_ADAPTER if adapter_dir else None
        if adapter_dir:
            load_frozen_adapter(policy, adapter_dir, TEACHER_ADAPTER)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[torch.nn.Module]:
        with adapter_frozen_in_use(self.policy, self.adapter):
            yield self.policy


@dataclass(frozen=True)
class TeacherOnBase:
    """The teacher is the student's base (`adapter_dir` None) or a LoRA adapter on it."""

    adapter_dir: str | None


def teacher_on_student_base(config: DistillConfig) -> TeacherOnBase | None:
    """Whether the teacher can run on the student's own copy of the base (`TeacherOnStudentBase`):
    the student is a LoRA adapter (new, or continued) on the same base weights as the teacher (the
    base itself, or a plain LoRA adapter on it: no modules saved whole, the output layer not
    adapted), held in the teacher's precision (--teacher-precision auto, or the student's), not in
    4 bits and not sharded (--fsdp shards the base, the teacher's output layer must be whole).
    Otherwise the teacher is loaded as a model of its own."""
    from rlkit.training.memory_plan import resolved_precision

    if not (config.lora and config.teacher and config.model) or config.load_in_4bit or config.fsdp:
        return None
    student_dtype = "bf16" if resolved_precision(config) == "bf16" else "fp32"  # TrainingRun.weights_dtype
    if config.teacher_precision not in ("auto", student_dtype):
        return None
    try:
        teacher, student = resolve_source(config.teacher), resolve_source(config.model)
    except InputError:  # said in full by the checks that run before any weights load
        return None
    if not same_weights(base_of(teacher), base_of(student)):
        return None
    if teacher.adapter_dir is None:
        return TeacherOnBase(None)
    adapter = adapter_config(Path(teacher.adapter_dir))
    targets = adapter.get("target_modules") or []
    plain = (
        adapter.get("peft_type") == "LORA"
        and not adapter.get("modules_to_save")
        and not adapter.get("trainable_token_indices")
        and not adapter.get("use_dora")
        and "lm_head" not in (targets if isinstance(targets, list) else [targets])
    )
    return TeacherOnBase(teacher.adapter_dir) if plain else None


def load_teacher(
    plan: RunPlan, config: DistillConfig, run: TrainingRun, source: ModelSource, policy: torch.nn.Module
) -> tuple[Teacher, TeacherHead, str]:
    """The teacher, frozen, and its output layer, and how it is held: on the student's base where it
    can be (`teacher_on_student_base`), else its own model in --teacher-precision, sharded like a
    frozen reference under --fsdp (its output layer then a full copy)."""
    from rlkit.training.engine import shards_itself
    from rlkit.training.logprobs import output_layer_slot

    on_base = teacher_on_student_base(config)
    if on_base is not None:
        teacher = TeacherOnStudentBase(policy, on_base.adapter_dir)
        slot = output_layer_slot(policy)  # the base's own (None: not a plain Linear, logits come whole)
        how = "its adapter on the student's base" if on_base.adapter_dir else "the student's base, adapter off"
        return teacher, TeacherHead(slot[2] if slot is not None else None), f"{how}: no second copy"
    precision = plan.model("teacher").dtype  # type: ignore[union-attr]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision or "", run.weights_dtype
    )
    teacher = load_causal_lm(source, dtype, config.trust_remote_code).eval().requires_grad_(False)
    slot = output_layer_slot(teacher)
    head = slot[2] if slot is not None else None
    if head is not None and shards_itself(config, run.accelerator):  # a full copy, before FSDP shards it
        layer = head
        head = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype
        )
        head.load_state_dict(layer.state_dict())
        head.requires_grad_(False)
    teacher = sharded_like_policy(teacher, run, what="teacher")
    how = f"{next(teacher.parameters()).dtype}, a model of its own"
    return SeparateTeacher(teacher), TeacherHead(head).to(run.accelerator.device), how


# ---- the plan -----------------------------------------------------------------------------------------


def distill_plan(config: DistillConfig) -> RunPlan:
    """The student alone is trained, dropout off (TRL's disable_dropout: the distribution trained is
    the one sampled); the teacher frozen in --teacher-precision, sharded like a frozen reference
    under --fsdp, running a forward without gradient over every micro-batch; no reference; the
    student samples --generation-batch-size rows per `generate` call (default: a process's whole
    step in one call)."""
    rows = config.generation_batch_size or config.batch_size * config.grad_accum
    student = trained_policy(config, dropout=False, role="student")
    micro = MicroBatch(config.batch_size, config.max_length)
    generation = Generation(rows=rows, length=config.max_length, by="student")
    if teacher_on_student_base(config) is not None:  # no second copy of the base
        forward = NoGradForward("teacher forward (no grad, on the student's base)", by="student")
        return RunPlan("distill", (student,), micro, generation=generation, no_grad_forwards=(forward,))
    precision = None if config.teacher_precision == "auto" else config.teacher_precision
    teacher = Frozen(
        "teacher",
        config.teacher or "",
        dtype=precision,  # type: ignore[arg-type]
        sharded=True,
        note="frozen, no gradients",
    )
    return RunPlan(
        "distill",
        (student,),
        micro,
        frozen=(teacher,),
        generation=generation,
        no_grad_forwards=(NoGradForward("teacher forward (no grad)", by="teacher"),),
    )


# ---- the command -------------------------------------------------------------------------------------


def _check(config: DistillConfig) -> None:
    """What the options' declarations (bounds, choices) cannot say."""
    if not config.teacher:
        raise InputError("missing --teacher: the model to distil from (an HF dir, a LoRA adapter dir or a .gguf file)")
    if config.lmbda < 1 and config.num_generations > 1:
        raise InputError(
            f"--lmbda {config.lmbda} mixes in the data's own completions, one per prompt; give --num-generations 1"
        )
    if config.eval_data or config.eval_fraction:
        raise InputError("distill has no held-out loss to evaluate; measure the student with `rlkit eval`")
    if config.max_turns is not None and not (config.tools or config.env):
        raise InputError(f"--max-turns {config.max_turns} caps tool-calling rounds; give --tools or --env as well")


def run_distill(config: DistillConfig) -> Path | None:
    """Setup (tokenizer, prompts, teacher check, student, teacher), train with the engine, write OUT
    (None: --dry-run showed the plan)."""
    # 1. check what the options' declarations cannot; the run's plan (what --dry-run shows); open the run
    _check(config)
    plan = distill_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    world = run.accelerator.num_processes
    check_rollout_layout(config, world)
    # 2. the prompts (and their own completions for off-policy steps), the teacher's compatibility
    tokenizer = run.load_tokenizer()
    template, prompts, encoded, agents = rollout_prompts(config, tokenizer)  # agents: --tools / --env
    replies = recorded_replies(config, tokenizer, template, prompts) if config.lmbda < 1 else None
    prompts_per_step = prompts_per_rollout(config, world, len(prompts.conversations))
    teacher_source = check_teacher(config, run.source, tokenizer)
    steps = config.max_steps or config.epochs * (len(prompts.conversations) // prompts_per_step)
    info(
        f"prompts: {len(prompts.conversations)}; {steps} distillation steps of {prompts_per_step} prompts x "
        f"{config.num_generations} completions, {config.lmbda:g} of them on-policy"
    )
    # 3. the models: the student (trained), the teacher (frozen)
    policy = run.load_policy()
    if not plan.main.dropout:
        disable_dropout(policy)
    if not config.fsdp:  # decode-sized products ~2x faster on CPU, the same function (FSDP gathers
        column_major_frozen_linears(policy)  # row-major copies to sample from: left as they are)
    teacher, teacher_head, how = load_teacher(plan, config, run, teacher_source, policy)
    info(f"teacher: {config.teacher} (frozen; {how})")
    # 4. train: a rollout per step (Distillation.collect), one update on it
    inputs = RolloutInputs(run.accelerator, tokenizer, prompts, encoded, run)
    assert plan.generation is not None
    algorithm = Distillation(config, inputs, teacher, replies, plan.generation.rows, agents)
    objective = DistillObjective(config, teacher, teacher_head)
    loop = RolloutSteps(algorithm, config, run, objective, steps, epochs=1, mini_batches=1)
    default_lr = 1e-5 if config.lora else 1e-6
    metrics = run.train(DistillStudent(policy), objective, loop, default_lr, engine_config=loop.engine_config)
    metrics["distill_steps"] = steps
    # 5. OUT: the student, its card
    card = (
        "## Distillation\n\n"
        f"- teacher: `{config.teacher}` ({config.teacher_precision} precision)\n"
        f"- loss: generalized JSD, beta {config.beta} (0 forward KL, 1 reverse KL), temperature {config.temperature}\n"
        f"- on-policy fraction (lmbda): {config.lmbda}; {config.num_generations} completion(s) per prompt\n"
        + (f"- episodes: {agents.describe()}\n" if agents is not None else "")
        + f"- samples: `{SAMPLES_FILE}`\n\n"
    )
    return run.finish(
        tokenizer,
        chat_template=template.source,
        metrics=metrics,
        data_info={"counts": {"prompts": len(prompts.conversations)}},
        extra_card=card,
    )
