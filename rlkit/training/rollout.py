"""The on-policy rollout as stages over typed records: sample -> forward -> score -> estimate.

Every recipe whose data comes from the model it trains (ppo, grpo; distill samples the same way)
collects a rollout by calling these stages in order, each returning a frozen record the next
reads:

    sample(...)          -> Samples        prompt and response token ids, the per-token loss mask, texts
    rollout_forward(...) -> RolloutForward the policy's log-probs, entropy and values, the reference's
    score_samples(...)   -> [B, K] scores  every reward, called as TRL calls reward functions
    (the recipe's own)   -> Scored         each reward's scores, the combined and the shaped one
    (the recipe's own)   -> Advantages     the estimator's advantages (and returns), the update's mask

and a `Rollout` holds the four; the updates' mini-batches are cut from `Rollout.update_tensors()`.
Nothing passes between stages except these records: no string-keyed side channels, no field one
stage sets for another. `rlkit.training.rollout_steps.RolloutSteps` adapts a recipe's rollout to
the engine (mini-batches of each update, the step's metrics, the samples table).

The loss mask is a per-token field of `Samples` (`response_mask`): 1 on the tokens the policy
sampled, 0 on padding and, in multi-turn episodes, on the tokens a tool or the template added.
Single-turn sampling sets it to "up to and including the first EOS" (`first_eos_mask`).

Under FSDP2 (`--fsdp`) a rollout runs on the gathered model (`gathered`): generation and the
reference call the policy around the root module whose hooks gather the parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlkit.data.formats import Messages
from rlkit.data.prompts import PromptRows
from rlkit.errors import InputError, RlkitError, RunError
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.output import resume_hint
from rlkit.preference.reference import LogpsSpec, Reference
from rlkit.scoring import RewardBatch, RewardSet
from rlkit.tools.generation import cached_start, left_pad
from rlkit.training.fast_sampling import warper_kwargs
from rlkit.training.logprobs import prompt_cached_logprobs


def rollout_reference_spec(temperature: float) -> LogpsSpec:
    """What a rollout's reference measures (`rlkit.preference.reference` holds the strategies): the
    [B, R] log-probs of the responses that end a rollout's rows, at the sampling temperature, the
    prompts' shared tokens run once (`prompt_cached_logprobs`) as the policy's forward runs them, so
    a reference equal to the policy measures what it measures."""

    def measure(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        ids, mask, responses = batch["input_ids"], batch["attention_mask"], batch["responses"]
        return prompt_cached_logprobs(model, ids, mask, responses, temperature, want_entropy=False)[0]

    return LogpsSpec(measure, unit="rollouts")


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


# ---- the records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """Stage 1's result: one process's rows, each a left-padded prompt [B, P] and the response the
    policy sampled after it [B, R].

    `response_mask` is the per-token loss mask: 1 on the tokens the policy sampled (the only ones
    log-probs, ratios, KL and entropy count), 0 elsewhere. `completion_ids` are the response's
    ids up to where its mask ends (TRL's `completion_ids`), `completions` their text.
    """

    indices: list[int]
    conversations: list[Messages]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    completion_ids: list[list[int]]
    completions: list[str]
    generation_s: float

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, torch.ones_like(self.responses)], dim=1)


@dataclass(frozen=True)
class RolloutForward:
    """Stage 2's result, the same forward the updates run without a gradient, [B, R] each: the
    policy's log-probs and entropy (None where a recipe needs neither), the values (None: no value
    function), the reference's log-probs (None: no reference)."""

    old_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    values: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    forward_s: float


@dataclass(frozen=True)
class Scored:
    """Stage 3's result: each reward's scores [B, K] (NaN where a function said None), the combined
    reward [B] (what is logged as the reward), and the shaped one [B] the estimator reads
    (penalties, normalisation, a KL in the reward); `metrics` what shaping logs."""

    per_reward: torch.Tensor
    combined: torch.Tensor
    shaped: torch.Tensor
    metrics: Mapping[str, float]
    scoring_s: float


@dataclass(frozen=True)
class Advantages:
    """Stage 4's result: the advantages ([B] per sequence or [B, R] per token), the value targets
    (None without a value function), the mask the update's loss counts [B, R] (the response mask,
    less whatever the estimator drops: truncated completions, zero-variance groups), and the
    estimator's logged numbers (the KL and its coefficient, advantage statistics)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None
    loss_mask: torch.Tensor
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Rollout:
    """A whole rollout of one process: the four stages' records and its wall time. `scored` and
    `advantages` are None for a recipe without rewards (distillation: the teacher grades the tokens
    in the update itself)."""

    samples: Samples
    forward: RolloutForward
    scored: Scored | None
    advantages: Advantages | None
    rollout_s: float

    def update_tensors(self) -> dict[str, torch.Tensor]:
        """What the updates' mini-batches are cut from (row-aligned; absent parts left out)."""
        s, f, a = self.samples, self.forward, self.advantages
        tensors = {
            "input_ids": s.input_ids,
            "attention_mask": s.attention_mask,
            "responses": s.responses,
            "response_mask": s.response_mask,
            "loss_mask": a.loss_mask if a is not None else None,
            "old_logprobs": f.old_logprobs,
            "old_values": f.values,
            "ref_logprobs": f.ref_logprobs,
            "advantages": a.advantages if a is not None else None,
            "returns": a.returns if a is not None else None,
        }
        return {k: v for k, v in tensors.items() if v is not None}


@dataclass(frozen=True)
class RolloutInputs:
    """What every stage reads and no stage changes: the accelerator, the tokenizer, the prompt
    records (conversations and their other columns) with their encoded ids, and the run (its dir,
    for the checkpoint a failing reward names)."""

    accelerator: Any
    tokenizer: Any
    prompts: PromptRows
    prompt_ids: list[list[int]]
    run: Any

    def across(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sum over processes (None with one): statistics of every process's rollout, as one process would have them."""
        acc = self.accelerator
        return (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows (equal-sized shares), in rank order."""
        return self.accelerator.gather(tensor) if self.accelerator.num_processes > 1 else tensor


@dataclass(frozen=True)
class RolloutSampling:
    """How stage 1 samples: lengths and the sampling distribution, `chunk` rows per `generate` call,
    whether rows come in groups sharing a prompt (each distinct prompt's prefill then runs once),
    and `seed(rl_step, start)`: the seed the chunk of rows from `start` is sampled with (None: the
    running generator, PPO's way; a recipe that seeds makes sampling independent of what ran
    before and of how the rows are split over processes, so two processes sample what one does
    and a resumed run what the uninterrupted one did)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    chunk: int
    shared_prompts: bool = False
    seed: Callable[[int, int], int | None] | None = None
    fast_warpers: bool = False  # sample through rlkit.training.fast_sampling.SamplingWarper (numpy's sort)


def check_rollout_layout(config: Any, world: int) -> None:
    """Refuse a rollout that cannot be laid out group by group (grpo, distill): the global batch
    (batch-size x grad-accum x processes rows) must hold whole groups of --num-generations, and
    --generation-batch-size must divide a process's share."""
    c, local = config, config.batch_size * config.grad_accum
    global_batch = local * world
    if global_batch % c.num_generations:
        raise InputError(
            f"the global batch of {global_batch} completions (batch-size {c.batch_size} x grad-accum "
            f"{c.grad_accum} x {world} processes) is not a multiple of --num-generations {c.num_generations}; "
            "change one of them"
        )
    if c.generation_batch_size and local % c.generation_batch_size:
        raise InputError(
            f"--generation-batch-size {c.generation_batch_size} does not divide a process's rollout of {local} "
            f"completions (batch-size {c.batch_size} x grad-accum {c.grad_accum})"
        )


def prompts_per_rollout(config: Any, world: int, n_prompts: int) -> int:
    """The distinct prompts one rollout takes; refused when the data has fewer than that."""
    global_batch = config.batch_size * config.grad_accum * world
    per_step = global_batch // config.num_generations
    if n_prompts < per_step:
        raise InputError(
            f"{n_prompts} usable prompts are fewer than one rollout's {per_step} "
            f"(global batch {global_batch} / --num-generations {config.num_generations}); lower --batch-size or --grad-accum"
        )
    return per_step


# ---- stage 1: sample ---------------------------------------------------------------------------


def prompt_indices(
    n_prompts: int, rl_step: int, seed: int, rollout_size: int, group_size: int, rank: int, world: int
) -> list[int]:
    """This process's rows' prompts at RL step `rl_step`: each epoch a seeded permutation of the
    prompts; the global rollout (`rollout_size` x `world` rows) takes the next prompts of it, each
    `group_size` times in a row, and this process its `rank`-th slice (a group may span processes)."""
    prompts_per_step = rollout_size * world // group_size
    per_epoch = max(1, n_prompts // prompts_per_step)
    epoch, k = divmod(rl_step, per_epoch)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    prompts = [order[(k * prompts_per_step + i) % len(order)] for i in range(prompts_per_step)]
    rows = [p for p in prompts for _ in range(group_size)]
    return rows[rank * rollout_size : (rank + 1) * rollout_size]


def generate_rows(
    inputs: RolloutInputs,
    generator: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    how: RolloutSampling,
    seed: int | None,
    max_new_tokens: int,
    shared_prompts: bool,
) -> torch.Tensor:
    """The tokens `generate` samples after each left-padded row of `ids` [B, W] (EOS, then padding,
    where a row stops early), from a generator seeded with `seed` (None: the running one), under
    autocast; with `shared_prompts` each distinct prompt's prefill runs once and `generate` goes on
    from its cache, and otherwise the tokens all rows start with do (`left_padded_prefix`: the
    same tokens up to float rounding). One `generate` call: single-turn sampling makes one per
    chunk, multi-turn episodes (`rlkit.training.episodes`) one per turn."""
    acc, tok = inputs.accelerator, inputs.tokenizer
    do_sample = how.temperature > 0
    warping: dict[str, Any] = {"temperature": None, "top_p": None, "top_k": None}
    if do_sample:
        warping = {"temperature": how.temperature, "top_p": how.top_p, "top_k": how.top_k}
    if do_sample and how.fast_warpers:
        warping = warper_kwargs(how.temperature, how.top_k, how.top_p)
    with seeded(seed, acc.device), acc.autocast(), torch.no_grad():
        cache, ids, mask = cached_start(generator, ids, mask, shared_prompts)
        out = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            **cache,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **warping,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
        )
    return out[:, ids.shape[1] :]


def sample(
    inputs: RolloutInputs, wrapper: torch.nn.Module, indices: list[int], rl_step: int, how: RolloutSampling
) -> Samples:
    """A response per row, sampled with the KV cache and the LoRA weights folded in (base-model
    decoding speed), masked up to its first EOS and decoded."""
    acc, tok = inputs.accelerator, inputs.tokenizer
    t0 = time.time()
    query_ids, query_mask = left_pad([inputs.prompt_ids[i] for i in indices], tok.pad_token_id)
    query_ids, query_mask = query_ids.to(acc.device), query_mask.to(acc.device)
    responses = []
    with lora_merged_for_generation(wrapper.policy) as generator:
        for start in range(0, len(indices), how.chunk):
            ids, mask = query_ids[start : start + how.chunk], query_mask[start : start + how.chunk]
            seed = how.seed(rl_step, start) if how.seed is not None else None
            responses.append(
                generate_rows(inputs, generator, ids, mask, how, seed, how.max_new_tokens, how.shared_prompts)
            )
    width = max(r.shape[1] for r in responses)
    responses = torch.cat([F.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses])
    response_mask, has_eos = first_eos_mask(responses, tok.eos_token_id)
    ids = [row[:m] for row, m in zip(responses.tolist(), response_mask.sum(1).tolist())]
    texts = [tok.decode([t for t in kept if t != tok.eos_token_id], skip_special_tokens=True).strip() for kept in ids]
    return Samples(
        indices,
        [inputs.prompts.conversations[i] for i in indices],
        query_ids,
        query_mask,
        responses,
        response_mask,
        has_eos,
        ids,
        texts,
        time.time() - t0,
    )


# ---- stage 2: the rollout-time forward ---------------------------------------------------------


def rollout_forward(
    inputs: RolloutInputs,
    wrapper: torch.nn.Module,
    samples: Samples,
    batch_size: int,
    temperature: float,
    reference: Reference | None,
    policy: bool = True,
) -> RolloutForward:
    """Log-probs, entropy, values (the trained module's forward) and the reference's log-probs: the
    same forward the updates run, no gradient, `batch_size` rows at a time. `policy` False skips the
    trained module's forward (GRPO with one update per rollout: the update's own log-probs are the
    rollout's); `reference` None skips the reference's."""
    acc = inputs.accelerator
    t0 = time.time()
    input_ids, attention_mask, responses = samples.input_ids, samples.attention_mask, samples.responses
    logprobs, entropies, values, ref_logprobs = [], [], [], []
    for start in range(0, len(samples.indices), batch_size):
        sl = slice(start, start + batch_size)
        with acc.autocast():
            if policy:
                lp, ent, v = wrapper(input_ids[sl], attention_mask[sl], responses[sl], temperature)
                logprobs.append(lp)
                entropies.append(ent)
                if v is not None:
                    values.append(v)
            if reference is not None:
                rows = {"input_ids": input_ids[sl], "attention_mask": attention_mask[sl], "responses": responses[sl]}
                ref_logprobs.append(reference.logps(wrapper.policy, rows))
    return RolloutForward(
        torch.cat(logprobs) if logprobs else None,
        torch.cat(entropies) if entropies else None,
        torch.cat(values) if values else None,
        torch.cat(ref_logprobs) if ref_logprobs else None,
        time.time() - t0,
    )


# ---- stage 3: score ----------------------------------------------------------------------------


def score_samples(inputs: RolloutInputs, samples: Samples, rewards: RewardSet) -> torch.Tensor:
    """Every reward on this process's completions: [B, K] (NaN where a function said None).

    A reward function gets the token ids through the mask's end (the tokens trained, TRL's
    `completion_ids`), the prompts' other columns and their style (`rlkit.scoring.RewardBatch`).
    Whatever one raises or returns wrong, on any process, stops every process with its one line,
    naming the last checkpoint (left intact) to resume from."""
    from accelerate.utils import gather_object

    rows = inputs.prompts
    batch = RewardBatch(
        samples.conversations,
        samples.completions,
        rows.conversational,
        samples.completion_ids,
        rows.keyword_columns(samples.indices),
    )
    problem, scores = None, None
    try:
        scores = rewards(batch)
    except RlkitError as err:
        problem = str(err)
    if inputs.accelerator.num_processes > 1:
        problems = [p for p in gather_object([problem]) if p]
        problem = problems[0] if problems else None
    if problem is not None:
        raise RunError(f"{problem}; fix it and {resume_hint(inputs.run.run_dir)}") from None
    assert scores is not None
    return scores.to(inputs.accelerator.device)


# ---- the summary every recipe shares -----------------------------------------------------------


def entropy_and_length(inputs: RolloutInputs, samples: Samples, entropy: torch.Tensor) -> tuple[float, float]:
    """(the mean entropy per sampled token, the mean number of sampled tokens per row) over every process."""
    across, mask = inputs.across(), samples.response_mask
    token_sums = torch.stack([torch.where(mask.bool(), entropy, 0).sum(), mask.sum().to(entropy.dtype)])
    entropy_sum, n_tokens = (across(token_sums) if across else token_sums).tolist()
    rows = len(samples.indices) * inputs.accelerator.num_processes
    return entropy_sum / max(n_tokens, 1.0), n_tokens / rows
