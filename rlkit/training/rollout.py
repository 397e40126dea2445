"""The on-policy seam: sample from the policy being trained, score, turn scores into advantages, update.

`RolloutSteps` is the engine's `StepSource` for every recipe whose data comes from the model it
trains. One RL step = one rollout followed by `epochs` passes over it in `mini_batches` shuffled
mini-batches, each pass's mini-batch one engine step (one optimizer update, itself accumulated
over `--grad-accum` micro-batches). A rollout runs four named phases, each a method:

    generate -> score -> advantages -> summary

and returns a `Rollout` (the tensors of the rollout; the updates' mini-batches are cut from
`Rollout.update_tensors()`). The engine keeps accumulation, clipping, NaN checks, SIGTERM,
checkpoints and `--resume`: a run resumed in the middle of an RL step collects a fresh rollout
for that step's remaining updates (checkpoints taken every N RL steps fall on step boundaries,
where resuming is exact).

How another recipe plugs in (PPO: rlkit.recipes.ppo; GRPO builds on the same parts):

- The trained module exposes `.policy` (the causal LM; a PEFT model with LoRA) and its forward
  `(input_ids, attention_mask, responses, temperature)` returns `(logprobs, entropy, values)`
  [B, R] for the response ending each left-padded row, `values` None without a value function
  (`rlkit.recipes.ppo.PolicyValue(policy, None, None, kl_coef)` is such a module).
- Pass the config (reads seed, batch_size, grad_accum, max_new_tokens, temperature, top_p, and
  top_k, sample_every, num_samples where it has them), the `TrainingRun`, the tokenizer, the
  conversations and their encoded prompt ids, a reward (`rlkit.scoring.Reward`; a function is
  called with TRL's keywords: the sampled ids, and the `columns` and `conversational` style of
  the prompts where the recipe passes them, as `rlkit.data.prompts.PromptRows` holds them),
  a `rlkit.preference.reference.Reference` measuring `response_logps(temperature)` (or None: no
  reference forward), the number of RL steps, `epochs`, `mini_batches` and `group_size` (G
  completions per prompt, laid out group by group: rows g*G .. g*G+G-1 share prompt g).
- Rows that come in groups sharing a prompt (GRPO) set `shared_prompts = True`: each distinct
  prompt of a chunk is prefilled once (`shared_prefix`); train `PolicyValue(...,
  shared_prompts=True)` and measure the reference with `response_logps(t, shared_prompts=True)`
  for the same in every forward (`grouped_response_logprobs`).
- Override `advantages(rollout, model)` (required: fill `rollout.advantages`, and `returns` when
  there is a value function); optionally `shape_scores` (penalties, normalisation), `reward_scores`
  (several rewards), `summary` (the step's logged metrics), `sample_rows` (the samples table)
  and `step_line` (the line printed after each RL step).

Under FSDP2 (`--fsdp`) a rollout runs on the gathered model (`gathered`): generation and the
reference call the policy around the root module whose hooks gather the parameters.

Masking: response tokens are those up to and including the first EOS (`first_eos_mask`);
everything after it (the padding `generate` emits once a row has finished) has mask 0.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from rlkit.console import console
from rlkit.data.formats import Messages
from rlkit.data.prompts import PromptRows
from rlkit.errors import RunError
from rlkit.hardware import release_freed_host_memory
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.output import resume_hint
from rlkit.preference.reference import LogpsSpec
from rlkit.scoring import RewardBatch, score_batch
from rlkit.tools.generation import left_pad
from rlkit.training.logprobs import (
    _output_layer_slot,
    _output_layer_swapped,
    _ResponseLogpHead,
    positions_from_mask,
    response_logprobs,
)
from rlkit.training.samples import SAMPLES_FILE, show_samples


def response_logps(temperature: float, shared_prompts: bool = False) -> LogpsSpec:
    """What a rollout's reference measures (`rlkit.preference.reference` holds the strategies): the
    [B, R] log-probs of the responses that end a rollout's rows, at the sampling temperature.
    `shared_prompts` (GRPO): each distinct prompt of a batch runs once (`grouped_response_logprobs`),
    as the policy's forward does, so a reference equal to the policy measures what it measures."""
    logprobs = grouped_response_logprobs if shared_prompts else response_logprobs

    def measure(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        ids, mask, responses = batch["input_ids"], batch["attention_mask"], batch["responses"]
        return logprobs(model, ids, mask, responses, temperature, want_entropy=False)[0]

    return LogpsSpec(measure, unit="rollouts")


def _fsdp_units(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (HF then turns the KV cache off in training)."""
    from rlkit.scoring import unwrap_peft

    hf = unwrap_peft(model)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(hf), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(hf, name, False))  # transformers 5.x renamed it


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a model's forward and `generate` take a KV cache by: `cache` from transformers 5.x
    (`past_key_values`, deprecated there, before)."""
    from rlkit.scoring import unwrap_peft

    hf = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"


def shared_prefix(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, torch.Tensor, torch.Tensor, int] | None:
    """The KV cache of each distinct left-padded prompt row of `ids` but its last token, computed once
    and repeated for every row that has that prompt: (cache, the rows' ids and mask without the
    columns no row uses, prefix width); None when no two neighbouring rows share a prompt, when the
    cache cannot be used (gradient checkpointing turns HF's cache off) or a prefix would be empty.

    GRPO's G completions of a prompt are G neighbouring rows, so a rollout (or a micro-batch of one)
    holds each prompt G times: the prompt's tokens, often most of a row, run once instead of G
    times, in the prefill before sampling and in the forward of every update. Gradients reach the
    prompt's tokens through the repeated cache (indexing is differentiable), summed over the group.
    """
    if ids.shape[0] < 2 or _checkpointing(model):
        return None
    unique, inverse = torch.unique_consecutive(ids, dim=0, return_inverse=True)
    if unique.shape[0] == ids.shape[0]:
        return None
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    ids, mask = ids[:, first:], mask[:, first:]
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=ids.device), (inverse[1:] != inverse[:-1]).nonzero()[:, 0] + 1]
    )
    prefix_ids, prefix_mask = ids[starts, :-1], mask[starts, :-1]
    if prefix_ids.shape[1] == 0 or not bool(prefix_mask.any(dim=1).all()):
        return None
    out = model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=positions_from_mask(prefix_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(inverse)
    return cache, ids, mask, prefix_ids.shape[1]


def grouped_response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`response_logprobs` for rows that share prompts (GRPO's groups): each distinct prompt runs once
    (`shared_prefix`), then every row's last prompt token and response on top of its cache.

    The same log-probs up to float rounding (the attention sums in another order), at about the
    cost of the responses alone when the prompts are long; rows with no neighbour sharing their
    prompt, or a model the fused head or the cache does not fit, take `response_logprobs` as it is.
    So does a model with FSDP units: the prompt's keys and values leave each block beside its
    output, where FSDP2's pre-backward hook (which gathers the block again for its backward) never
    sees them, so the backward would reach a freed block. (Generation's shared prefill, without a
    backward, still runs under FSDP.)
    """
    width = responses.shape[1]
    shared = None
    if _output_layer_slot(model) is not None and not _fsdp_units(model):
        shared = shared_prefix(model, input_ids[:, :-width], attention_mask[:, :-width])
    if shared is None:
        return response_logprobs(model, input_ids, attention_mask, responses, temperature, want_entropy)
    cache, _, prompt_mask, prefix = shared
    scale = 1.0 / temperature if temperature > 0 else 1.0
    suffix = input_ids[:, -(width + 1) :]  # the last prompt token predicts the first response token
    mask = torch.cat([prompt_mask, attention_mask[:, -width:]], dim=1)
    positions = positions_from_mask(mask)[:, prefix:]
    with _output_layer_swapped(model, lambda head: _ResponseLogpHead(head, responses, scale, want_entropy)):
        out = model(
            input_ids=suffix,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=width + 1,
            **{cache_keyword(model): cache},
        )
    logps, entropy = out.logits.unbind(-1)
    return logps, entropy.detach(), out


def first_eos_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R]: 1 up to and including the first EOS, or everywhere when there is none; has_eos [B])."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    width = responses.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), width - 1)
    mask = torch.arange(width, device=responses.device).unsqueeze(0) <= first.unsqueeze(1)
    return mask.long(), has_eos


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every FSDP2 unit of `model` holds its full parameters on every process; resharded after.

    A rollout calls the policy around its root module: `generate` on the causal LM inside it, the
    LoRA reference with the adapter switched off. The root's forward hooks, which all-gather the
    parameters the root holds (embeddings, head, final norm, PPO's value head), never run there, and
    the blocks' own hooks would gather and free every block once per generated token. So the whole
    model is gathered once for the rollout, as FSDP's `summon_full_params` did, and each unit's
    reshard-after-forward is off until it is sharded again for the updates (then back on: FSDP2's
    default, and the engine's). A model without FSDP units (one process, DDP, DeepSpeed) is left as
    it is.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or units[0] is not model:
        yield
        return
    # FSDP2 takes as its root the first unit to run a forward: a block's, were the rollout (a
    # generate) the first thing to run; initialising the root here makes `model` the root
    model._get_fsdp_state()._lazy_init()
    blocks = units[1:]
    for unit in blocks:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in blocks:
            unit.set_reshard_after_forward(True, recurse=False)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sample from a generator seeded with `seed` and leave the running one as it was (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass
class Rollout:
    """One process's share of a rollout. Token tensors are [B, R] over response tokens (B rows,
    `query_*` [B, P] left-padded prompts); each phase fills its fields."""

    indices: list[int]
    conversations: list[Messages]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    # the rollout-time forward: the policy's log-probs and entropy, values (None: no value function),
    # the reference's log-probs (None: no reference)
    old_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    # score: the texts, the reward as returned [B], the scores the advantages use [B]
    completions: list[str] = field(default_factory=list)
    raw_scores: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    # advantages: per-token rewards (if the estimator uses them), advantages, value targets
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # what a recipe adds for its summary: per-row tensors (e.g. the KL penalty), scalars (the mean KL)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    # the phases' wall times
    timings: dict[str, float] = field(default_factory=dict)
    # per-row tensors the updates need besides the standard ones (GRPO's loss mask), cut into mini-batches too
    update_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, torch.ones_like(self.responses)], dim=1)

    def update_tensors(self) -> dict[str, torch.Tensor]:
        """What the updates' mini-batches are cut from (row-aligned; absent parts left out)."""
        tensors = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "responses": self.responses,
            "response_mask": self.response_mask,
            "old_logprobs": self.old_logprobs,
            "old_values": self.values,
            "ref_logprobs": self.ref_logprobs,
            "advantages": self.advantages,
            "returns": self.returns,
        }
        return {**{k: v for k, v in tensors.items() if v is not None}, **self.update_extras}


class RolloutSteps:
    """The engine's `StepSource` for on-policy RL: a rollout at the start of every RL step, then its mini-batches."""

    #: names the RL step in logs ("ppo step 3", "samples at PPO step 3")
    name = "rl"
    #: rows share prompts (GRPO's groups): each distinct prompt's prefill runs once (`shared_prefix`)
    shared_prompts = False

    def __init__(
        self,
        config: Any,
        run: Any,
        tokenizer: Any,
        conversations: list[Messages],
        prompt_ids: list[list[int]],
        reward: Any,
        reference: Any,
        objective: Any,
        rl_steps: int,
        *,
        epochs: int,
        mini_batches: int,
        group_size: int = 1,
        columns: list[dict[str, Any]] | None = None,
        conversational: bool = False,
    ):
        self.c, self.run, self.acc = config, run, run.accelerator
        self.tokenizer, self.reward, self.reference, self.objective = tokenizer, reward, reference, objective
        self.conversations, self.prompt_ids = conversations, prompt_ids
        # what reward functions get besides the texts (`rlkit.scoring.RewardBatch`)
        self.prompt_rows = PromptRows(conversations, columns or [{} for _ in conversations], conversational)
        self.mini_batches, self.group_size = mini_batches, group_size
        self.updates = epochs * mini_batches
        self.total_steps = self.steps_per_epoch = rl_steps * self.updates
        self.rollout_size = config.batch_size * config.grad_accum * mini_batches
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_step = -1
        self.pending: dict[str, float] = {}
        self.training_s = 0.0
        self._t_batches = time.time()
        self._last_step = -1

    # ---- StepSource -----------------------------------------------------------------------
    def batches(self, step: int, model: torch.nn.Module) -> list[dict[str, Any]]:
        rl_step, update = divmod(step, self.updates)
        if self.buffer is None or self.buffer_step != rl_step:
            self.buffer = self.rollout(rl_step, model).update_tensors()
            self.buffer_step = rl_step
            self.training_s = 0.0
        epoch, mb = divmod(update, self.mini_batches)
        order = torch.randperm(
            self.rollout_size, generator=torch.Generator().manual_seed(self.c.seed * 1000003 + rl_step * 101 + epoch)
        )
        if self.mini_batches == 1:
            order = torch.arange(self.rollout_size)  # one mini-batch: the rollout itself, in rollout order
        size = self.rollout_size // self.mini_batches
        chosen = order[mb * size : (mb + 1) * size]
        micro = []
        bs = self.c.batch_size
        for a in range(self.c.grad_accum):
            idx = chosen[a * bs : (a + 1) * bs].to(self.acc.device)
            batch = {k: v.index_select(0, idx) for k, v in self.buffer.items()}
            batch["num_tokens"] = int(batch["response_mask"].sum())
            micro.append(batch)
        self._last_step = step
        release_freed_host_memory(self.acc.device)  # the rollout's KV caches and logits
        self._t_batches = time.time()
        return micro

    @property
    def engine_config(self) -> Any:
        """The config the engine runs with: its steps are optimizer updates, `updates` of them per RL
        step, so --max-steps (here already the number of RL steps) and --save-every, both given in RL
        steps, are converted once, here, for every recipe on the seam."""
        return replace(self.c, max_steps=self.total_steps, save_every=self.c.save_every * self.updates)

    def step_metrics(self) -> dict[str, float]:
        self.training_s += time.time() - self._t_batches
        rl_step, update = divmod(self._last_step, self.updates)
        metrics: dict[str, float] = {f"{self.name}_step": rl_step + 1}
        if update == self.updates - 1:  # the RL step is complete: its summary
            metrics.update(self.pending)
            metrics.update(self.objective.take_means())
            gen, total = (
                self.pending.get("time/generation_s", 0.0),
                self.pending.get("time/rollout_s", 0.0) + self.training_s,
            )
            metrics["time/training_s"] = self.training_s
            metrics["time/generation_share"] = gen / max(total, 1e-9)
            metrics[f"{self.name}_tokens_per_s"] = self.pending.get("response_tokens", 0.0) / max(total, 1e-9)
            if self.acc.is_main_process:
                console.print(self.step_line(rl_step, metrics, gen))
        return metrics

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float) -> str:
        """The line printed after each RL step (the KL where the recipe logs one)."""
        nan = float("nan")
        kl = f"kl {metrics['kl']:.3f}  " if "kl" in metrics else ""
        return (
            f"{self.name} step {rl_step + 1}: score {metrics.get('score/mean', nan):.3f} ± {metrics.get('score/std', nan):.3f}  "
            f"{kl}entropy {metrics.get('entropy', nan):.3f}  len {metrics.get('response_length', nan):.1f}  "
            f"gen {generation_s:.1f}s train {self.training_s:.1f}s"
        )

    # ---- the rollout ------------------------------------------------------------------------
    def _prompt_indices(self, rl_step: int) -> list[int]:
        """This process's rows' prompts: each epoch a seeded permutation, each prompt `group_size` times in a row."""
        world, rank = self.acc.num_processes, self.acc.process_index
        prompts = self.rollout_size // self.group_size
        per_step = prompts * world
        per_epoch = max(1, len(self.conversations) // per_step)
        epoch, k = divmod(rl_step, per_epoch)
        order = torch.randperm(
            len(self.conversations), generator=torch.Generator().manual_seed(self.c.seed + epoch)
        ).tolist()
        start = k * per_step + rank * prompts
        return [order[(start + i) % len(order)] for i in range(prompts) for _ in range(self.group_size)]

    @torch.no_grad()
    def rollout(self, rl_step: int, model: torch.nn.Module) -> Rollout:
        """generate -> score -> advantages -> summary (and the samples table), with the module in eval mode."""
        wrapper = self.acc.unwrap_model(model)
        was_training = wrapper.training
        wrapper.eval()
        t0 = time.time()
        with gathered(wrapper):
            rollout = self.generate(rl_step, wrapper)
            self.forward(rollout, wrapper)
            self.score(rollout)
            self.advantages(rollout, wrapper)
        wrapper.train(was_training)
        rollout.timings["rollout_s"] = time.time() - t0
        self.pending = self.summary(rollout)
        self._samples(rl_step, rollout)
        return rollout

    def generate(self, rl_step: int, wrapper: torch.nn.Module) -> Rollout:
        """Sample a response per row with the KV cache and the LoRA weights folded in (base-model decoding speed)."""
        c, acc, tok = self.c, self.acc, self.tokenizer
        t0 = time.time()
        indices = self._prompt_indices(rl_step)
        query_ids, query_mask = left_pad([self.prompt_ids[i] for i in indices], tok.pad_token_id)
        query_ids, query_mask = query_ids.to(acc.device), query_mask.to(acc.device)
        sample = c.temperature > 0
        top_k = getattr(c, "top_k", 0) or None
        responses = []
        with lora_merged_for_generation(wrapper.policy) as generator:
            chunk = self.generation_chunk()
            for start in range(0, len(indices), chunk):
                ids, mask = query_ids[start : start + chunk], query_mask[start : start + chunk]
                with seeded(self.sample_seed(rl_step, start), acc.device), acc.autocast():
                    cache = None
                    shared = shared_prefix(generator, ids, mask) if self.shared_prompts else None
                    if shared is not None:  # each distinct prompt's prefill once; generate goes on from it
                        cache, ids, mask, _ = shared
                    out = generator.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        **({cache_keyword(generator): cache} if cache is not None else {}),
                        max_new_tokens=c.max_new_tokens,
                        do_sample=sample,
                        temperature=c.temperature if sample else None,
                        top_p=c.top_p if sample else None,
                        top_k=top_k if sample else None,
                        eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id,
                        use_cache=True,
                    )
                responses.append(out[:, ids.shape[1] :])
        width = max(r.shape[1] for r in responses)
        responses = torch.cat([F.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses])
        response_mask, has_eos = first_eos_mask(responses, tok.eos_token_id)
        rollout = Rollout(
            indices, [self.conversations[i] for i in indices], query_ids, query_mask, responses, response_mask, has_eos
        )
        rollout.timings["generation_s"] = time.time() - t0
        return rollout

    def generation_chunk(self) -> int:
        """Rows sampled per `generate` call (default: --batch-size, PPO's generation chunk)."""
        return self.c.batch_size

    def sample_seed(self, rl_step: int, start: int) -> int | None:
        """The seed the chunk of rows from `start` is sampled with (None: the running generator, PPO's way).

        A recipe that returns one makes sampling independent of what ran before and of how the
        rows are split over processes (GRPO: two processes sample what one does; resume too)."""
        return None

    def forward(self, rollout: Rollout, wrapper: torch.nn.Module) -> None:
        """Log-probs, entropy, values and reference log-probs: the same forward the updates run, no gradient."""
        c, acc = self.c, self.acc
        t0 = time.time()
        input_ids, attention_mask, responses = rollout.input_ids, rollout.attention_mask, rollout.responses
        logprobs, entropies, values, ref_logprobs = [], [], [], []
        for start in range(0, len(rollout.indices), c.batch_size):
            sl = slice(start, start + c.batch_size)
            with acc.autocast():
                lp, ent, v = wrapper(input_ids[sl], attention_mask[sl], responses[sl], c.temperature)
                if self.reference is not None:
                    rows = {
                        "input_ids": input_ids[sl],
                        "attention_mask": attention_mask[sl],
                        "responses": responses[sl],
                    }
                    ref_logprobs.append(self.reference.logps(wrapper.policy, rows))
            logprobs.append(lp)
            entropies.append(ent)
            if v is not None:
                values.append(v)
        rollout.old_logprobs, rollout.entropy = torch.cat(logprobs), torch.cat(entropies)
        rollout.values = torch.cat(values) if values else None
        rollout.ref_logprobs = torch.cat(ref_logprobs) if ref_logprobs else None
        rollout.timings["forward_s"] = time.time() - t0

    def score(self, rollout: Rollout) -> None:
        """Decode each response up to its first EOS and score it; `shape_scores` makes the scores used.

        A reward function gets the token ids through the first EOS (the tokens trained, TRL's
        `completion_ids`), the prompts' other columns and their style (`rlkit.scoring.RewardBatch`).
        A reward that fails names the last checkpoint, which it left intact, to resume from."""
        tok = self.tokenizer
        t0 = time.time()
        ids = [row[:m] for row, m in zip(rollout.responses.tolist(), rollout.response_mask.sum(1).tolist())]
        for kept in ids:
            text = tok.decode([t for t in kept if t != tok.eos_token_id], skip_special_tokens=True)
            rollout.completions.append(text.strip())
        rows = self.prompt_rows
        batch = RewardBatch(
            rollout.conversations,
            rollout.completions,
            rows.conversational,
            ids,
            rows.keyword_columns(rollout.indices),
        )
        try:
            scores = self.reward_scores(batch)
        except RunError as err:
            raise RunError(f"{err}; fix it and {resume_hint(self.run.run_dir)}") from None
        rollout.raw_scores = torch.as_tensor(scores, dtype=torch.float32).to(self.acc.device)
        rollout.scores = self.shape_scores(rollout)
        rollout.timings["scoring_s"] = time.time() - t0

    def reward_scores(self, batch: RewardBatch) -> torch.Tensor | list[float]:
        """The reward of each completion (default: the one reward's; GRPO weighs several)."""
        return score_batch(self.reward, batch)

    def shape_scores(self, rollout: Rollout) -> torch.Tensor:
        """The scores the advantages are computed from (default: the reward's, unchanged)."""
        assert rollout.raw_scores is not None
        return rollout.raw_scores.clone()

    def advantages(self, rollout: Rollout, wrapper: torch.nn.Module) -> None:
        """Fill `rollout.advantages` (and `returns` with a value function): the recipe's estimator."""
        raise NotImplementedError(f"{type(self).__name__} must define advantages()")

    # ---- the summary ------------------------------------------------------------------------
    def across(self) -> Any:
        """Sum over processes (None with one): statistics of every process's rollout, as one process would have them."""
        return (lambda t: self.acc.reduce(t, reduction="sum")) if self.acc.num_processes > 1 else None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows (equal-sized shares), in rank order."""
        return self.acc.gather(tensor) if self.acc.num_processes > 1 else tensor

    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The logged metrics of the whole rollout, every process's sequences and tokens."""
        assert rollout.raw_scores is not None and rollout.entropy is not None
        across, mask = self.across(), rollout.response_mask
        all_scores = self.gather(rollout.raw_scores)
        token_sums = torch.stack(
            [torch.where(mask.bool(), rollout.entropy, 0).sum(), mask.sum().to(rollout.entropy.dtype)]
        )
        entropy_sum, n_all_tokens = (across(token_sums) if across else token_sums).tolist()
        t = rollout.timings
        return {
            "score/mean": float(all_scores.mean()),
            "score/std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
            "entropy": entropy_sum / max(n_all_tokens, 1.0),
            "response_length": n_all_tokens / len(all_scores),
            "eos_rate": float(self.gather(rollout.has_eos.float()).mean()),
            "response_tokens": float(mask.sum(1).float().sum()),
            "time/generation_s": t["generation_s"],
            "time/forward_s": t["forward_s"],
            "time/scoring_s": t["scoring_s"],
            "time/rollout_s": t["rollout_s"],
            "generation_tokens_per_s": float(rollout.responses.numel()) / max(t["generation_s"], 1e-9),
        }

    # ---- samples ------------------------------------------------------------------------------
    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        """The samples table's rows (written to the samples file as they are, with the step)."""
        assert rollout.raw_scores is not None
        return [
            {"prompt": messages[-1]["content"], "response": completion, "score": score}
            for messages, completion, score in zip(
                rollout.conversations, rollout.completions, rollout.raw_scores.tolist()
            )
        ]

    def _samples(self, rl_step: int, rollout: Rollout) -> None:
        c = self.c
        if not c.sample_every or rl_step % c.sample_every != 0 or not self.acc.is_main_process:
            return
        if self.run.run_dir is None:
            return
        rows = self.sample_rows(rollout)[: c.num_samples]
        show_samples(
            f"samples at {self.name.upper()} step {rl_step + 1}", rl_step + 1, rows, self.run.run_dir / SAMPLES_FILE
        )
